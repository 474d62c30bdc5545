"""Tile grids over a slide region, and chunking of tiles into read regions.

Three pixel frames appear here:

- **level-0 px**: the slide's full-resolution pixels; every tile and chunk position is given in it;
- **read-level px**: pixels of ``read_level``, the pyramid level tiles are read from;
- **model px**: the detector's input (``tile_size`` × ``tile_size``).

``scale`` = model px per level-0 px. Without a target ``mpp`` tiles are read at level 0 and one
model pixel is one slide pixel (``scale == 1``). With ``mpp`` (µm per model px) and a known
``slide.mpp``, a tile covers ``tile_l0 = round(tile_size * mpp / slide.mpp)`` level-0 px, read
from the deepest level that does not upsample (see :class:`TileGrid`), and the model input is
that read resized to ``tile_size``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trtwsi.errors import TilingError

if TYPE_CHECKING:
    from trtwsi.plan.tissue import Section
    from trtwsi.slide.base import Slide

#: A pyramid level may be this much coarser than asked (1 %) and still be chosen for reading:
#: pyramids whose level sizes were rounded down have downsamples like 4.003 for a nominal 4.
LEVEL_TOLERANCE = 0.01


@dataclass(frozen=True, eq=False)
class Chunk:
    """Neighbouring tiles read as one region, so overlapping pixels are read once.

    ``region``: ``(x, y, w, h)`` level-0 px covered by the chunk's tiles. ``level``: the read
    level. ``read_size``: ``(w, h)`` of the read in read-level px: read it with
    ``slide.read_region(x, y, *read_size, level=level)``. ``tile_indices``: (M,) int64 indices
    into :attr:`TileGrid.tiles`, ascending. ``offsets``: (M, 2) int64 ``(x, y)`` of each tile's
    top-left inside the read, in read-level px; tile ``k`` is
    ``pixels[oy : oy + read_size, ox : ox + read_size]`` with ``read_size`` =
    :attr:`TileGrid.read_size`, identical to reading that tile directly.
    """

    region: tuple[int, int, int, int]
    level: int
    read_size: tuple[int, int]
    tile_indices: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.tile_indices)

    def windows(self, read_size: int) -> np.ndarray:
        """``(M, 4)`` int64 ``(x, y, w, h)`` of each tile inside the read, in read-level px
        (``read_size``: :attr:`TileGrid.read_size`): the ``only`` of
        :meth:`~trtwsi.slide.Slide.read_region`, so that a read skips the file tiles that no
        tile of the chunk touches."""
        sizes = np.full((len(self.offsets), 2), int(read_size), np.int64)
        return np.concatenate([self.offsets.astype(np.int64), sizes], axis=1)

    def __repr__(self) -> str:
        return (
            f"Chunk(region={self.region}, level={self.level}, read_size={self.read_size}, "
            f"tiles={len(self.tile_indices)})"
        )


def _overlap_px(overlap, tile_size: int) -> int:
    """Overlap in model px from a ratio in [0, 1) or a whole number of px (see TileGrid)."""
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real):
        raise TilingError(
            f"overlap must be a ratio in [0, 1) or a whole number of pixels, got {overlap!r}"
        )
    ov = float(overlap)
    if not math.isfinite(ov) or ov < 0:
        raise TilingError(f"overlap must be >= 0, got {overlap!r}")
    if isinstance(overlap, numbers.Integral):
        px = int(overlap)
    elif ov < 1:
        px = round(ov * tile_size)
    elif ov == 1:
        raise TilingError(
            "overlap=1.0 is not a ratio in [0, 1) (it would be the whole tile); for 1 pixel "
            "pass the int 1"
        )
    elif ov.is_integer():
        px = int(ov)
    else:
        raise TilingError(
            f"overlap={overlap!r} is neither a ratio in [0, 1) nor a whole number of pixels"
        )
    if px >= tile_size:
        raise TilingError(
            f"overlap={overlap!r} gives {px} px, not less than the tile ({tile_size} px): "
            "the stride would be zero or negative; use a ratio < 1 or fewer pixels"
        )
    return px


def axis_positions(start: int, length: int, tile: int, stride: int, limit: int) -> np.ndarray:
    """Tile origins along one axis (level-0 px), SAHI style.

    Tiles start at ``start`` every ``stride`` px; the last one is shifted back to end exactly at
    ``start + length``. A region shorter than a tile gets one tile anchored at ``start``, moved
    back to end at ``limit`` (the slide edge) if it would cross it, but never before 0.
    """
    if length <= tile:
        return np.array([max(0, min(start, limit - tile))], np.int64)
    last = start + length - tile
    pos = list(range(start, last, stride))
    pos.append(last)
    return np.array(pos, np.int64)


class TileGrid:
    """Overlapping, full-size tiles covering a slide region (SAHI-style slicing).

    ``region``: None (the whole slide), a :class:`~trtwsi.plan.tissue.Section` (its bbox; its mask
    drives background skipping) or ``(x, y, w, h)`` level-0 px (clipped to the slide).

    ``tile_size``: model input px. ``overlap``: a float in [0, 1) is a fraction of the tile;
    a whole number is model px (an int, or an integral float ≥ 2 such as 32.0 as parsed from a
    command line; 1.0 is refused as ambiguous). The stride is ``tile_size - overlap`` model px. ``mpp``: target µm per model px (needs
    ``slide.mpp``); None reads level 0 at one model px per slide px.

    Placement, per axis: tiles start at the region's origin every stride; the last row/column is
    shifted back so it ends exactly at the region's end: every tile is full-size and inside the
    region. When the region is shorter than one tile, a single tile is anchored at the region's
    origin, shifted back to stay inside the slide if that crosses the slide's edge. When the
    slide itself is smaller than a tile, that tile starts at 0 and extends past the slide;
    ``read_region`` fills the outside with ``slide.fill`` (white glass).

    Background skipping (Section regions only): ``min_tissue=0.0`` (default) drops tiles with no
    tissue at all in the section's mask; ``min_tissue > 0`` drops tiles whose tissue fraction
    (:meth:`Section.tissue_fractions`) is below it; ``None`` keeps every tile.

    Attributes (level-0 px unless stated): ``tiles`` (N, 4) int64 ``(x, y, w, h)`` in row-major
    order (w = h = ``tile_l0``); ``cells`` (N, 2) int64 ``(row, col)`` grid position of each
    tile; ``grid_shape`` ``(rows, cols)`` before skipping; ``tissue`` (N,) float64 tissue fraction
    per tile (None without a Section); ``region``; ``tile_l0``; ``stride_l0``; ``overlap_l0``;
    ``overlap`` and ``stride`` (model px); ``scale`` (model px per level-0 px); ``read_level``,
    ``read_downsample`` and ``read_size`` (tile side in read-level px).

    The read level is the deepest level whose downsample ≤ ``tile_l0 / tile_size`` × 1.01 (a
    1 % tolerance for pyramids whose level sizes were rounded), so reads never upsample by more
    than that.

    Raises :class:`~trtwsi.errors.TilingError` (naming the value) for a non-positive tile size,
    an overlap that leaves no stride, ``mpp`` ≤ 0 or ``mpp`` without a slide mpp, a region that
    misses the slide, or ``min_tissue`` outside [0, 1].
    """

    def __init__(
        self,
        slide: Slide,
        region: Section | tuple[int, int, int, int] | None = None,
        tile_size: int = 640,
        overlap: float | int = 0.2,
        *,
        mpp: float | None = None,
        min_tissue: float | None = 0.0,
    ):
        from trtwsi.plan.tissue import Section

        if isinstance(tile_size, bool) or not isinstance(tile_size, numbers.Integral):
            raise TilingError(f"tile_size must be a whole number of pixels, got {tile_size!r}")
        if tile_size < 1:
            raise TilingError(f"tile_size must be >= 1 px, got {tile_size}")
        self.slide = slide
        self.tile_size = int(tile_size)
        self.overlap = _overlap_px(overlap, self.tile_size)
        self.stride = self.tile_size - self.overlap

        # --- resolution -------------------------------------------------------------------
        self.mpp = None if mpp is None else float(mpp)
        if self.mpp is not None:
            if not math.isfinite(self.mpp) or self.mpp <= 0:
                raise TilingError(f"mpp must be a positive number of µm per px, got {mpp!r}")
            if not slide.mpp:
                raise TilingError(
                    f"mpp={mpp} was requested but the slide's own mpp is unknown, so the tile "
                    "size in slide pixels cannot be computed; pass the slide's mpp "
                    "(open_slide(path, mpp=...)) or leave mpp=None to tile at level 0"
                )
            self.tile_l0 = max(1, round(self.tile_size * self.mpp / slide.mpp))
        else:
            self.tile_l0 = self.tile_size
        self.scale = self.tile_size / self.tile_l0
        self.overlap_l0 = round(self.overlap * self.tile_l0 / self.tile_size)
        self.stride_l0 = self.tile_l0 - self.overlap_l0
        if self.stride_l0 < 1:
            raise TilingError(
                f"overlap={overlap!r} leaves no stride at this resolution "
                f"(tile {self.tile_l0} level-0 px, overlap {self.overlap_l0} px)"
            )
        target = self.tile_l0 / self.tile_size  # level-0 px per model px
        self.read_level = 0
        for i, lv in enumerate(slide.levels):
            if lv.downsample <= target * (1 + LEVEL_TOLERANCE):
                self.read_level = i
        self.read_downsample = float(slide.levels[self.read_level].downsample)
        self.read_size = max(1, round(self.tile_l0 / self.read_downsample))

        # --- region -----------------------------------------------------------------------
        self.section: Section | None = None
        if region is None:
            rx, ry, rw, rh = 0, 0, slide.width, slide.height
        elif isinstance(region, Section):
            self.section = region
            rx, ry, rw, rh = region.bbox
        else:
            try:
                rx, ry, rw, rh = (int(v) for v in region)
            except (TypeError, ValueError):
                raise TilingError(
                    f"region must be None, a Section or (x, y, w, h), got {region!r}"
                ) from None
            if rw <= 0 or rh <= 0:
                raise TilingError(f"region {region!r} has a non-positive size")
        x0, y0 = max(rx, 0), max(ry, 0)
        x1, y1 = min(rx + rw, slide.width), min(ry + rh, slide.height)
        if x0 >= x1 or y0 >= y1:
            raise TilingError(
                f"region {(rx, ry, rw, rh)} does not intersect the slide "
                f"({slide.width}x{slide.height} px)"
            )
        self.region = (x0, y0, x1 - x0, y1 - y0)

        if min_tissue is not None and not (
            isinstance(min_tissue, numbers.Real) and 0 <= float(min_tissue) <= 1
        ):
            raise TilingError(f"min_tissue must be in [0, 1] or None, got {min_tissue!r}")
        self.min_tissue = None if min_tissue is None else float(min_tissue)

        # --- tiles ------------------------------------------------------------------------
        t, s = self.tile_l0, self.stride_l0
        xs = axis_positions(x0, x1 - x0, t, s, slide.width)
        ys = axis_positions(y0, y1 - y0, t, s, slide.height)
        self.grid_shape = (len(ys), len(xs))
        rows, cols = np.meshgrid(np.arange(len(ys)), np.arange(len(xs)), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
        tiles = np.stack(
            [xs[cols], ys[rows], np.full(rows.size, t), np.full(rows.size, t)], 1
        ).astype(np.int64)
        cells = np.stack([rows, cols], 1).astype(np.int64)
        self.tissue: np.ndarray | None = None
        if self.section is not None:
            frac = self.section.tissue_fractions(tiles)
            if self.min_tissue is not None:
                keep = frac > 0 if self.min_tissue == 0 else frac >= self.min_tissue
                tiles, cells, frac = tiles[keep], cells[keep], frac[keep]
            self.tissue = frac
        self.tiles: np.ndarray = tiles
        self.cells: np.ndarray = cells

    # --- sequence protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        for row in self.tiles.tolist():
            yield tuple(row)

    def __getitem__(self, i: int) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in self.tiles[i])

    def __repr__(self) -> str:
        return (
            f"<TileGrid {len(self)} tiles of {self.tile_size} px (= {self.tile_l0} level-0 px, "
            f"level {self.read_level} read {self.read_size} px), overlap {self.overlap} px, "
            f"region {self.region}>"
        )

    # --- chunks ------------------------------------------------------------------------------
    def chunks(self, max_pixels: int = 4096 * 4096, max_tiles: int | None = None) -> list[Chunk]:
        """Group the tiles into read regions (blocks of ``ky × kx`` neighbouring grid cells).

        A chunk holds at most ``max_tiles`` tiles and its read covers at most ``max_pixels``
        read-level px (a single tile larger than that forms a chunk alone). Blocks are as square
        as the limits allow, then widened (wide reads follow the file's tile rows). Every tile is
        in exactly one chunk; chunks come in row-major block order. Returns ``list[Chunk]``.
        """
        if max_pixels < 1:
            raise TilingError(f"max_pixels must be >= 1, got {max_pixels}")
        if max_tiles is not None and max_tiles < 1:
            raise TilingError(f"max_tiles must be >= 1 or None, got {max_tiles}")
        if len(self.tiles) == 0:
            return []
        ds = self.read_downsample
        rs = self.read_size
        step = self.stride_l0 / ds

        def span(k: int) -> float:  # read-level extent of k consecutive tiles (upper bound)
            return rs + (k - 1) * step + 1

        def fits(kx: int, ky: int) -> bool:
            if max_tiles is not None and kx * ky > max_tiles:
                return False
            return span(kx) * span(ky) <= max_pixels

        rows, cols = self.grid_shape
        k = 1
        while k < max(rows, cols) and fits(k + 1, k + 1):
            k += 1
        ky = min(k, rows)
        kx = k
        while kx < cols and fits(kx + 1, ky):
            kx += 1
        kx = min(kx, cols)

        key = (self.cells[:, 0] // ky) * (cols // kx + 1) + self.cells[:, 1] // kx
        order = np.argsort(key, kind="stable")
        skey = key[order]
        bounds = np.flatnonzero(np.diff(skey)) + 1
        out = []
        for idx in np.split(order, bounds):
            idx = np.sort(idx)
            t = self.tiles[idx]
            cx, cy = int(t[:, 0].min()), int(t[:, 1].min())
            ox = np.floor(t[:, 0] / ds).astype(np.int64) - math.floor(cx / ds)
            oy = np.floor(t[:, 1] / ds).astype(np.int64) - math.floor(cy / ds)
            w_l0 = int((t[:, 0] + t[:, 2]).max()) - cx
            h_l0 = int((t[:, 1] + t[:, 3]).max()) - cy
            out.append(
                Chunk(
                    region=(cx, cy, w_l0, h_l0),
                    level=self.read_level,
                    read_size=(int(ox.max()) + rs, int(oy.max()) + rs),
                    tile_indices=idx.astype(np.int64),
                    offsets=np.stack([ox, oy], 1),
                )
            )
        return out
