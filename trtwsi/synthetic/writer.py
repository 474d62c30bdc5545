"""Writers of synthetic scenes: pyramidal JPEG TIFF / Aperio-SVS-like files (never holding
level 0 in memory) with a ground-truth sidecar, and small in-memory arrays."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from trtwsi.synthetic.scene import _BLOCK, Scene
from trtwsi.synthetic.truth import GroundTruth, sidecar_path


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------
def make_array(width: int, height: int, seed: int = 0, **kw) -> tuple[np.ndarray, GroundTruth]:
    """Render a whole (small) scene into memory: RGB uint8 ``(height, width, 3)`` and its truth.

    ``kw`` are :class:`Scene` parameters.
    """
    scene = Scene(width, height, seed=seed, **kw)
    return scene.render(0, 0, width, height), scene.ground_truth()


def _level_dims(width: int, height: int, levels: int | None) -> list[tuple[int, int]]:
    dims = [(width, height)]
    if levels is None:
        while max(dims[-1]) > 2000:
            w, h = dims[-1]
            dims.append((math.ceil(w / 4), math.ceil(h / 4)))
    else:
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        for _ in range(levels - 1):
            w, h = dims[-1]
            if w == 1 and h == 1:
                break
            dims.append((math.ceil(w / 4), math.ceil(h / 4)))
    return dims


def _down4(img: np.ndarray) -> np.ndarray:
    """Area-average 4×4 blocks, the last partial block edge-replicated (→ ceil(h/4), ceil(w/4))."""
    h, w = img.shape[:2]
    ph, pw = (-h) % 4, (-w) % 4
    if ph or pw:
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_REPLICATE)
    return cv2.resize(img, ((w + pw) // 4, (h + ph) // 4), interpolation=cv2.INTER_AREA)


class _Level0Writer:
    """Renders level 0 strip by strip (one row of file tiles at a time, in worker threads), yields
    its tiles in TIFF order and fills the 4× downsampled level 1 as a side effect."""

    def __init__(self, scene: Scene, tile: int, level1: np.ndarray | None, threads: int):
        self.scene, self.tile, self.level1 = scene, tile, level1
        self.ntx = math.ceil(scene.width / tile)
        self.nty = math.ceil(scene.height / tile)
        self.threads = threads

    def _strip(self, ty: int) -> np.ndarray:
        s, t = self.scene, self.tile
        y0 = ty * t
        out = np.empty((t, self.ntx * t, 3), np.uint8)
        for bx in range(0, self.ntx * t, _BLOCK[0]):
            bw = min(_BLOCK[0], self.ntx * t - bx)
            for by in range(0, t, _BLOCK[1]):
                bh = min(_BLOCK[1], t - by)
                out[by : by + bh, bx : bx + bw] = s.render(bx, y0 + by, bw, bh)
        if self.level1 is not None:
            rows = min(t, s.height - y0)
            small = _down4(out[:rows, : s.width])
            r0 = y0 // 4
            self.level1[r0 : r0 + small.shape[0]] = small[: self.level1.shape[0] - r0]
        return out

    def tiles(self) -> Iterator[np.ndarray]:
        t = self.tile
        with ThreadPoolExecutor(self.threads) as ex:
            pending = [ex.submit(self._strip, ty) for ty in range(min(self.threads + 1, self.nty))]
            for ty in range(self.nty):
                strip = pending.pop(0).result()
                nxt = ty + len(pending) + 1
                if nxt < self.nty:
                    pending.append(ex.submit(self._strip, nxt))
                # contiguous copies (tifffile would make them anyway): a tile waiting in the
                # encoder's batch must not keep its whole strip alive
                for tx in range(self.ntx):
                    yield np.ascontiguousarray(strip[:, tx * t : (tx + 1) * t])
                del strip


def _svs_description(width, height, mpp, tile, quality, lw=None, lh=None) -> str:
    head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
    if lw is not None:
        head = f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> {lw}x{lh} - "
    else:
        head += f"({tile}x{tile}) JPEG/RGB Q={quality}"
    mag = 10.0 / mpp
    mag_s = f"{mag:.0f}" if abs(mag - round(mag)) < 1e-6 else f"{mag:.4g}"
    return (
        f"{head}|AppMag = {mag_s}|MPP = {mpp:.6g}|Filename = trtwsi-synthetic"
        f"|ScanScope ID = TRTWSI|OriginalWidth = {width}|OriginalHeight = {height}"
    )


def make_slide(
    path: str | os.PathLike,
    width: int,
    height: int,
    seed: int = 0,
    *,
    n_sections: int = 3,
    mpp: float = 0.5,
    tile: int = 256,
    quality: int = 90,
    levels: int | None = None,
    flavor: str = "tiff",
    extra_objects: Sequence[tuple[float, float, int]] | None = None,
    threads: int | None = None,
    **scene_kw,
) -> GroundTruth:
    """Write a synthetic slide as a tiled, JPEG-compressed, pyramidal TIFF; returns its truth.

    Level 0 is rendered and compressed strip by strip (one row of ``tile``-px file tiles at a
    time), never held whole; level 1 (4× smaller, ~1/16 of level 0's bytes) is accumulated while
    level 0 is written (in a temporary memory-mapped file when over 512 MiB), deeper levels are
    4× area-averaged from it. Levels: downsample 4 per level until the longer side is ≤ 2000 px
    (``levels``: the total number instead).

    ``flavor``:

    - ``"tiff"``: level 0 in the first IFD with the others as its SubIFDs (like OME-TIFF /
      ``bfconvert`` pyramids), ``ResolutionUnit = CENTIMETER`` and ``X/YResolution`` =
      10⁴ / mpp px per cm (scaled per level), so readers find the MPP.
    - ``"svs"``: Aperio layout: page 0 = level 0 with an ``ImageDescription`` starting
      ``Aperio Image Library`` and carrying ``|AppMag = …|MPP = …``; page 1 = a small stripped
      thumbnail (as in every real SVS, and where tifffile's SVS parser expects it); pages 2… =
      the lower levels, tiled, as consecutive pages.

    JPEG tiles are YCbCr 4:2:0 (tifffile's default for RGB JPEG, like scanners write). The
    ground truth is saved next to the slide as ``<stem>.gt.json`` (:func:`sidecar_path`).
    ``threads``: rendering threads (default: CPU count, at most 4); JPEG encoding uses as many.
    """
    import tifffile

    if flavor not in ("tiff", "svs"):
        raise ValueError(f"flavor must be 'tiff' or 'svs', got {flavor!r}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (JPEG in TIFF), got {tile}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    path = Path(path)
    scene = Scene(
        width,
        height,
        seed=seed,
        n_sections=n_sections,
        mpp=mpp,
        extra_objects=extra_objects,
        **scene_kw,
    )
    dims = _level_dims(scene.width, scene.height, levels)
    threads = threads or min(4, os.cpu_count() or 1)
    tmpdir = None
    level1 = None
    if len(dims) > 1 or flavor == "svs":  # (an SVS thumbnail is made from it too)
        w1, h1 = math.ceil(scene.width / 4), math.ceil(scene.height / 4)
        if w1 * h1 * 3 > 512 << 20:
            tmpdir = tempfile.TemporaryDirectory(dir=path.parent, prefix=".trtwsi-")
            level1 = np.lib.format.open_memmap(
                Path(tmpdir.name) / "level1.npy", mode="w+", dtype=np.uint8, shape=(h1, w1, 3)
            )
        else:
            level1 = np.empty((h1, w1, 3), np.uint8)
    writer = _Level0Writer(scene, tile, level1, threads)
    opts = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(quality)},
        maxworkers=threads,
        buffersize=8 << 20,  # tifffile encodes this many bytes of tiles per batch
    )
    bigtiff = scene.width * scene.height * 3 > (1 << 32) - (1 << 25)
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
            if flavor == "tiff":
                res = 1e4 / scene.mpp
                tif.write(
                    writer.tiles(),
                    shape=(scene.height, scene.width, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    subifds=len(dims) - 1,
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    description="trtwsi synthetic slide",
                    metadata=None,
                    software="trtwsi.synthetic",
                    **opts,
                )
                prev = level1
                for k in range(1, len(dims)):
                    img = prev if k == 1 else _down4(prev)
                    ds = scene.width / dims[k][0]
                    tif.write(
                        img,
                        tile=(tile, tile),
                        subfiletype=1,
                        resolution=(res / ds, res / ds),
                        resolutionunit="CENTIMETER",
                        metadata=None,
                        **opts,
                    )
                    prev = img
            else:
                desc0 = _svs_description(scene.width, scene.height, scene.mpp, tile, quality)
                tif.write(
                    writer.tiles(),
                    shape=(scene.height, scene.width, 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    description=desc0,
                    metadata=None,
                    software="trtwsi.synthetic",
                    **opts,
                )
                pyramid = [level1]
                for _k in range(2, len(dims)):
                    pyramid.append(_down4(pyramid[-1]))
                smallest = level1  # thumbnail: ≤ 768 px, from the ¼ image
                while max(smallest.shape[:2]) > 4 * 768:
                    smallest = _down4(smallest)
                ts = min(1.0, 768 / max(smallest.shape[:2]))
                thumb = cv2.resize(
                    smallest,
                    (max(1, round(smallest.shape[1] * ts)), max(1, round(smallest.shape[0] * ts))),
                    interpolation=cv2.INTER_AREA,
                )
                tif.write(
                    thumb,
                    description=_svs_description(
                        scene.width,
                        scene.height,
                        scene.mpp,
                        tile,
                        quality,
                        thumb.shape[1],
                        thumb.shape[0],
                    ),
                    metadata=None,
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={"level": int(quality)},
                    rowsperstrip=16 * math.ceil(thumb.shape[0] / 16),
                )
                if len(dims) > 1:
                    for k, img in enumerate(pyramid, start=1):
                        tif.write(
                            img,
                            tile=(tile, tile),
                            description=_svs_description(
                                scene.width, scene.height, scene.mpp, tile, quality, *dims[k]
                            ),
                            metadata=None,
                            **opts,
                        )
    finally:
        del level1
        if tmpdir is not None:
            tmpdir.cleanup()
    gt = scene.ground_truth()
    gt.params.update({"tile": tile, "quality": quality, "flavor": flavor, "levels": len(dims)})
    gt.save(sidecar_path(path))
    return gt
