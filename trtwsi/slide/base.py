"""The Slide contract every reader implements.

Coordinates follow OpenSlide: ``read_region(x, y, w, h, level)`` takes the top-left corner
``(x, y)`` in **level-0** pixels and the size ``(w, h)`` in **that level's** pixels. Pixels are
always RGB ``uint8`` arrays of shape ``(h, w, 3)`` (see :func:`trtwsi.slide.color.to_rgb_uint8`).

Regions may cross the slide border: the part outside the level is filled with ``Slide.fill``
(255 = white, the colour of empty glass under a brightfield scanner).

File tiles that fail to decode are not fatal by default (``on_error="record"``): the pixels of
the bad tile are left at ``fill``, a :class:`~trtwsi.errors.TileReadError` is appended to
``Slide.read_errors`` and a warning is issued once per tile. ``on_error="raise"`` raises instead.
"""

from __future__ import annotations

import threading
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from trtwsi.errors import RegionError, TileReadError

OnError = Literal["record", "raise"]

#: Refuse single reads above this many pixels (3 bytes each): a guard against absurd requests.
MAX_REGION_PIXELS = 1 << 31


#: :meth:`Slide.thumbnail` may read a pyramid level down to this fraction of the thumbnail size
#: (and enlarge it) instead of decoding a level up to 4x larger in each dimension.
THUMBNAIL_LEVEL_SLACK = 0.9

#: A thumbnail source level over this many pixels is reduced block by block
#: (:meth:`Slide._reduced_level`) instead of being read whole: a tiled 40000² slide without a
#: pyramid peaked at 4.7 GB, a 100000² one raised RegionError.
THUMBNAIL_DIRECT_PIXELS = 1 << 24

#: Side (level px) of the blocks :meth:`Slide._reduced_level` reads: 2048² RGB = 12 MiB.
THUMBNAIL_BLOCK = 2048


def level_downsample(w0: int, h0: int, w: int, h: int) -> float:
    """Downsample of a ``w``×``h`` level under a ``w0``×``h0`` level 0, as OpenSlide computes it:
    the mean of the width and height ratios, ``(w0 / w + h0 / h) / 2``."""
    return (w0 / w + h0 / h) / 2.0


@dataclass(frozen=True)
class Level:
    """One pyramid level. ``downsample``: level-0 px per level px, the mean of the width and
    height ratios (OpenSlide's way, :func:`level_downsample`)."""

    width: int
    height: int
    downsample: float
    tile_width: int | None = None  # file tile size, None for strips / in-memory
    tile_height: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


def area_reduce(img: np.ndarray, f: int) -> np.ndarray:
    """``img`` ``(H, W, C)`` uint8 reduced ``f`` times by area averaging: ``(ceil(H / f),
    ceil(W / f), C)``, each pixel the rounded mean of its ``f × f`` block (the partial blocks
    of the last row and column: the mean of what they hold). OpenCV's whole-factor area path
    for the full blocks (it rounds halves up; so do the partial blocks)."""
    import cv2

    f = int(f)
    H, W = img.shape[:2]
    h, w = H // f, W // f
    out = np.empty((-(-H // f), -(-W // f), img.shape[2]), np.uint8)
    if h and w:
        out[:h, :w] = cv2.resize(img[: h * f, : w * f], (w, h), interpolation=cv2.INTER_AREA)
    c = img.shape[2]
    if W % f and h:
        out[:h, w] = np.floor(img[: h * f, w * f :].reshape(h, f, -1, c).mean((1, 2)) + 0.5)
    if H % f and w:
        out[h, :w] = np.floor(img[h * f :, : w * f].reshape(-1, w, f, c).mean((0, 2)) + 0.5)
    if H % f and W % f:
        out[h, w] = np.floor(img[h * f :, w * f :].reshape(-1, c).mean(0) + 0.5)
    return out


def region_parts(only) -> np.ndarray:
    """``only`` of :meth:`Slide.read_region` as a ``(K, 4)`` int64 array of ``(x, y, w, h)``;
    RegionError for another shape or an empty rectangle. Rectangles may reach past the region
    (they are clipped to it)."""
    try:
        a = np.asarray(only, dtype=np.int64).reshape(-1, 4)
    except (TypeError, ValueError) as e:
        raise RegionError(
            f"only must be (x, y, w, h) rectangles in the region's pixels, got {only!r:.200}"
        ) from e
    bad = (a[:, 2:] <= 0).any(axis=1)
    if bad.any():
        raise RegionError(f"only's rectangles need positive sizes, got {a[bad][:3].tolist()}")
    return a


def level_parts(only: np.ndarray, at: tuple[int, int], window) -> np.ndarray:
    """``only`` (:func:`region_parts`, region px) as ``(K, 4)`` int64 level-px boxes
    ``(x0, y0, x1, y1)`` (x1, y1 exclusive) clipped to ``window`` = the region's part inside
    the level, ``(x0, y0, x1, y1)`` level px; ``at``: the region's top-left in level px. Boxes
    left empty are dropped."""
    lo = only[:, :2] + at
    parts = np.concatenate(
        [np.maximum(lo, window[:2]), np.minimum(lo + only[:, 2:], window[2:])], axis=1
    )
    return parts[(parts[:, 0] < parts[:, 2]) & (parts[:, 1] < parts[:, 3])]


@dataclass
class SlideInfo:
    """Plain description of a slide, for `trtwsi info` and results metadata."""

    path: str | None
    format: str
    width: int
    height: int
    mpp: float | None
    levels: list[dict] = field(default_factory=list)
    properties: dict = field(default_factory=dict)


class Slide(ABC):
    """A whole-slide image readable region by region (never loaded whole).

    Subclasses set ``format``, ``path``, ``levels`` (level 0 first, strictly the full-resolution
    image), ``mpp`` (microns per level-0 pixel, None when the file does not say) and implement
    :meth:`_read_level`.
    """

    format: str = "unknown"
    path: Path | None = None
    levels: list[Level]
    mpp: float | None = None
    fill: int = 255

    def __init__(self, on_error: OnError = "record"):
        if on_error not in ("record", "raise"):
            raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
        self.on_error: OnError = on_error
        self.read_errors: list[TileReadError] = []
        self.properties: dict = {}
        self._errors_lock = threading.Lock()

    # --- geometry --------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def dimensions(self) -> tuple[int, int]:
        return (self.width, self.height)

    @property
    def level_count(self) -> int:
        return len(self.levels)

    def best_level_for_downsample(self, downsample: float) -> int:
        """Index of the deepest level whose downsample is <= ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    # --- pixels ----------------------------------------------------------------------------
    def read_region(
        self,
        x: int,
        y: int,
        w: int,
        h: int,
        level: int = 0,
        out: np.ndarray | None = None,
        *,
        only=None,
    ) -> np.ndarray:
        """Read a region as RGB uint8 ``(h, w, 3)``.

        ``x, y``: top-left in level-0 pixels (may be negative or beyond the slide); ``w, h``: size in
        level ``level`` pixels. ``out``: optional caller-provided C-contiguous-rows uint8 array of
        shape ``(h, w, 3)`` (e.g. a view into pinned memory) that is filled and returned.
        ``only``: the parts the caller will use, an ``(K, 4)`` int array-like of ``(x, y, w, h)``
        rectangles in the region's own pixels (read level, origin at its top-left): those pixels
        are exactly what a full read gives, the others are unspecified (a reader that decodes
        by file tile skips the tiles no rectangle touches: a chunk of model tiles reads only
        its tiles, not the glass of its bounding box).
        """
        x, y, w, h, level = self._check_region(x, y, w, h, level)
        if only is not None:
            only = region_parts(only)
        if out is None:
            out = np.empty((h, w, 3), dtype=np.uint8)
        elif out.shape != (h, w, 3) or out.dtype != np.uint8:
            raise RegionError(
                f"out buffer must be uint8 of shape {(h, w, 3)}, got {out.dtype} {out.shape}"
            )
        lx, ly, x0, y0, x1, y1 = self._level_window(x, y, w, h, level)
        if x0 >= x1 or y0 >= y1:
            out[...] = self.fill
            return out
        if (x0, y0, x1, y1) != (lx, ly, lx + w, ly + h):
            out[...] = self.fill
        view = out[y0 - ly : y1 - ly, x0 - lx : x1 - lx]
        if only is None:
            self._read_level(level, x0, y0, x1 - x0, y1 - y0, view)
        else:
            parts = level_parts(only, (lx, ly), (x0, y0, x1, y1))
            self._read_level_parts(level, x0, y0, x1 - x0, y1 - y0, view, parts)
        return out

    def _read_level_parts(
        self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray, parts: np.ndarray
    ) -> None:
        """:meth:`_read_level` where only ``parts`` will be used: ``(K, 4)`` int64 level-px
        boxes ``(x0, y0, x1, y1)`` (x1, y1 exclusive) inside the region. This default reads
        the whole region; readers that decode by file tile skip the tiles no part touches."""
        self._read_level(level, x, y, w, h, out)

    def _check_region(self, x, y, w, h, level) -> tuple[int, int, int, int, int]:
        """The region's numbers as ints; RegionError for a missing level, an empty region or
        one over :data:`MAX_REGION_PIXELS`."""
        x, y, w, h, level = int(x), int(y), int(w), int(h), int(level)
        if not 0 <= level < len(self.levels):
            raise RegionError(
                f"level {level} does not exist: this slide has levels 0..{len(self.levels) - 1}"
            )
        if w <= 0 or h <= 0:
            raise RegionError(f"region size must be positive, got w={w}, h={h}")
        if w * h > MAX_REGION_PIXELS:
            raise RegionError(
                f"region {w}x{h} = {w * h} px exceeds the {MAX_REGION_PIXELS} px limit of one read; "
                "read it in tiles (see trtwsi.plan.grid.TileGrid)"
            )
        return x, y, w, h, level

    def _level_window(self, x: int, y: int, w: int, h: int, level: int):
        """``(lx, ly, x0, y0, x1, y1)``: the region's top-left in level px (``x, y`` level-0 px,
        truncated toward -inf as OpenSlide does) and the part inside the level (x1, y1
        exclusive; empty when x0 >= x1 or y0 >= y1)."""
        lv = self.levels[level]
        lx = int(np.floor(x / lv.downsample))
        ly = int(np.floor(y / lv.downsample))
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lv.width), min(ly + h, lv.height)
        return lx, ly, x0, y0, x1, y1

    def jpeg_level(self, level: int) -> bool:
        """True when :meth:`compressed_region` gives JPEG streams for ``level``."""
        return False

    def compressed_region(self, x: int, y: int, w: int, h: int, level: int = 0, *, only=None):
        """The file tiles of a region as JPEG streams for a batch decoder
        (:class:`~trtwsi.slide.jpeg_stream.CompressedRegion`; arguments as :meth:`read_region`),
        or None when this slide or level cannot be read that way (then use ``read_region``)."""
        return None

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        """Fill ``out`` (uint8, ``(h, w, 3)``, possibly a strided view) with level pixels.

        The region ``x, y, w, h`` is in level coordinates and lies fully inside the level.
        Implementations report undecodable file tiles through :meth:`_tile_failed`.
        """

    def _tile_failed(self, err: TileReadError) -> None:
        """Record (or raise, with on_error='raise') a tile that failed to decode."""
        if self.on_error == "raise":
            raise err
        with self._errors_lock:
            key = (err.level, err.tile)
            if any((e.level, e.tile) == key for e in self.read_errors):
                return
            self.read_errors.append(err)
        warnings.warn(str(err), RuntimeWarning, stacklevel=3)

    def thumbnail_size(self, max_size: int = 1024) -> tuple[int, int]:
        """``(width, height)`` of :meth:`thumbnail` ``(max_size)``: the slide scaled so its longer
        side is at most ``max_size`` (never enlarged), each side at least 1 px."""
        if max_size <= 0:
            raise RegionError(f"max_size must be positive, got {max_size}")
        scale = min(1.0, max_size / max(self.width, self.height))
        return max(1, round(self.width * scale)), max(1, round(self.height * scale))

    def thumbnail(self, max_size: int = 1024, read_level=None) -> np.ndarray:
        """RGB uint8 image of the whole slide whose longer side is at most ``max_size``.

        ``read_level``: what reads level pixels (a callable with the signature of
        :meth:`_read_level`; default this slide's own), e.g. a reader pool's
        :meth:`~trtwsi.read.processes.ReaderPool.level_reader` that decodes in other processes.

        Reads the smallest level that is at least :data:`THUMBNAIL_LEVEL_SLACK` (90 %) of the
        thumbnail's size; a level under twice the thumbnail's size that halving keeps above
        that share is halved first (:func:`area_reduce`); a level over
        :data:`THUMBNAIL_DIRECT_PIXELS` is reduced by a whole factor block by block, so memory
        stays bounded on slides without a pyramid. Then resizes to the thumbnail size: area
        averaging when shrinking, bilinear for the few percent a slightly smaller image is
        enlarged. The slack
        matters for speed: a 31744² slide with levels 7936² and 1984² gives a 2048² thumbnail
        from the 1984² level (4 Mpx to decode) rather than the 7936² one (63 Mpx); a 63232²
        slide's 3952² level is halved (3 ms) and enlarged, where shrinking it by 1.93 took
        0.14 s on an H100 host's CPU.
        """
        import cv2

        tw, th = self.thumbnail_size(max_size)
        level = 0
        for i, lv in enumerate(self.levels):
            if lv.width >= THUMBNAIL_LEVEL_SLACK * tw and lv.height >= THUMBNAIL_LEVEL_SLACK * th:
                level = i
        lv = self.levels[level]
        read = read_level or self._read_level
        if lv.width * lv.height > THUMBNAIL_DIRECT_PIXELS:
            img = self._reduced_level(level, max(1, min(lv.width // tw, lv.height // th)), read)
        else:
            img = np.empty((lv.height, lv.width, 3), np.uint8)
            read(level, 0, 0, lv.width, lv.height, img)
            # a level under twice the thumbnail that the slack lets us halve: a whole-factor
            # shrink and a small enlargement (3 ms) instead of a fractional area shrink of the
            # whole level (0.14 s for 3952² -> 2048² on an H100 host)
            if lv.width < 2 * tw and lv.height < 2 * th:
                slack = min(
                    int(lv.width // (THUMBNAIL_LEVEL_SLACK * tw)),
                    int(lv.height // (THUMBNAIL_LEVEL_SLACK * th)),
                )
                if slack >= 2:
                    img = area_reduce(img, slack)
        if (img.shape[1], img.shape[0]) == (tw, th):
            return img
        shrink = img.shape[1] >= tw and img.shape[0] >= th
        return cv2.resize(
            img, (tw, th), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        )

    def _reduced_level(self, level: int, factor: int, read=None) -> np.ndarray:
        """Level ``level`` reduced ``factor`` times by area averaging, block by block.

        Returns RGB uint8 ``(ceil(H / factor), ceil(W / factor), 3)`` for a ``W``×``H`` level.
        Blocks of at most about :data:`THUMBNAIL_BLOCK` level px square (a multiple of
        ``factor``) are read with :meth:`_read_level` into one reused buffer and each reduced
        with ``cv2.INTER_AREA`` into its place, so peak memory is the output plus one block
        (~12 MiB), not the whole level. A partial last block of ``b`` px becomes
        ``ceil(b / factor)`` px.
        """
        import cv2

        read = read or self._read_level
        lv = self.levels[level]
        f = max(1, int(factor))
        block = f * max(1, THUMBNAIL_BLOCK // f)
        out = np.empty((-(-lv.height // f), -(-lv.width // f), 3), np.uint8)
        buf = np.empty((min(block, lv.height), min(block, lv.width), 3), np.uint8)
        for y in range(0, lv.height, block):
            bh = min(block, lv.height - y)
            for x in range(0, lv.width, block):
                bw = min(block, lv.width - x)
                view = buf[:bh, :bw]
                read(level, x, y, bw, bh, view)
                oy, ox = y // f, x // f
                oh, ow = -(-bh // f), -(-bw // f)
                dst = out[oy : oy + oh, ox : ox + ow]
                if f == 1:
                    dst[...] = view
                else:
                    dst[...] = cv2.resize(view, (ow, oh), interpolation=cv2.INTER_AREA)
        return out

    # --- description / lifetime ------------------------------------------------------------
    def info(self) -> SlideInfo:
        return SlideInfo(
            path=str(self.path) if self.path else None,
            format=self.format,
            width=self.width,
            height=self.height,
            mpp=self.mpp,
            levels=[
                {"width": lv.width, "height": lv.height, "downsample": lv.downsample}
                for lv in self.levels
            ],
            properties=dict(self.properties),
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles and threads."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.mpp:.4g}" if self.mpp else "None"
        name = self.path.name if self.path else "<array>"
        return (
            f"<{type(self).__name__} {name} {self.format} {self.width}x{self.height} "
            f"levels={len(self.levels)} mpp={mpp}>"
        )
