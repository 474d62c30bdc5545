"""trtwsi.plan.grid: tile placement, coverage, resolution, validation and chunking."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from trtwsi.errors import TilingError
from trtwsi.plan.grid import Chunk, TileGrid
from trtwsi.plan.tissue import Section, find_sections, full_slide_section
from trtwsi.slide import ArraySlide
from trtwsi.slide.base import Level, Slide
from trtwsi.synthetic import make_array


class PyramidSlide(Slide):
    """An in-memory slide with the given downsamples (area-averaged levels)."""

    def __init__(self, image: np.ndarray, downsamples=(1, 2, 4, 8), mpp=0.25):
        super().__init__()
        h, w = image.shape[:2]
        self._images, self.levels = [], []
        for d in downsamples:
            lw, lh = max(1, round(w / d)), max(1, round(h / d))
            img = image if d == 1 else cv2.resize(image, (lw, lh), interpolation=cv2.INTER_AREA)
            self._images.append(img)
            self.levels.append(Level(lw, lh, w / lw))
        self.mpp = mpp
        self.format = "pyramid-test"

    def _read_level(self, level, x, y, w, h, out):
        out[...] = self._images[level][y : y + h, x : x + w]


@pytest.fixture(scope="module")
def tissue_slide():
    img, _ = make_array(4000, 3000, seed=1, n_sections=3)
    slide = ArraySlide(img, mpp=0.5)
    return slide, find_sections(slide)


@pytest.fixture(scope="module")
def pyramid():
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    img = cv2.resize(low, (3000, 2300), interpolation=cv2.INTER_CUBIC)
    return PyramidSlide(img)


def _covered(grid: TileGrid, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    hit = np.zeros(len(xs), bool)
    for x, y, w, h in grid.tiles:
        hit |= (xs >= x) & (xs < x + w) & (ys >= y) & (ys < y + h)
    return hit


# --- coverage and placement --------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [0.2, 0, 16])
def test_every_tissue_pixel_of_a_section_is_covered(tissue_slide, overlap):
    slide, sections = tissue_slide
    assert len(sections) == 3
    for s in sections:
        grid = TileGrid(slide, s, tile_size=128, overlap=overlap)
        assert len(grid) < grid.grid_shape[0] * grid.grid_shape[1]  # glass tiles were skipped
        ii, jj = np.nonzero(s.mask)
        d = s.mask_downsample
        x, y = s.bbox[0] + (jj + 0.5) * d, s.bbox[1] + (ii + 0.5) * d
        inside = (x < s.bbox[0] + s.bbox[2]) & (y < s.bbox[1] + s.bbox[3])
        assert _covered(grid, x[inside], y[inside]).all()
        # every dropped tile really had no tissue
        full = TileGrid(slide, s, tile_size=128, overlap=overlap, min_tissue=None)
        kept = {tuple(t) for t in grid.tiles.tolist()}
        dropped = np.array([t for t in full.tiles.tolist() if tuple(t) not in kept])
        if len(dropped):
            assert (s.tissue_fractions(dropped) == 0).all()


def test_tiles_are_full_size_inside_the_slide_and_row_major(tissue_slide):
    slide, sections = tissue_slide
    for region in [None, *sections, (100, 50, 2000, 1500), (3500, 2700, 1000, 1000)]:
        grid = TileGrid(slide, region, tile_size=640, overlap=0.25)
        t = grid.tiles
        assert t.dtype == np.int64 and t.shape[1] == 4
        assert (t[:, 2] == 640).all() and (t[:, 3] == 640).all()
        assert (t[:, 0] >= 0).all() and (t[:, 1] >= 0).all()
        assert (t[:, 0] + t[:, 2] <= slide.width).all()
        assert (t[:, 1] + t[:, 3] <= slide.height).all()
        order = np.lexsort((t[:, 0], t[:, 1]))
        np.testing.assert_array_equal(order, np.arange(len(t)))
        assert len(grid) == len(t) == len(list(grid))
        assert grid[0] == tuple(int(v) for v in t[0])


def test_region_grid_covers_the_region_exactly_and_shifts_the_last_tiles():
    slide = ArraySlide(np.full((3000, 4000, 3), 240, np.uint8))
    grid = TileGrid(slide, (100, 200, 1500, 1000), tile_size=640, overlap=0)
    xs, ys = np.unique(grid.tiles[:, 0]), np.unique(grid.tiles[:, 1])
    # stride 640: 100, 740, then the last column shifted back to end at 1600 (not 1380)
    assert xs.tolist() == [100, 740, 960]
    assert ys.tolist() == [200, 560]
    assert grid.grid_shape == (2, 3)
    # with overlap the regular stride holds until the shifted last tile
    g = TileGrid(slide, (0, 0, 4000, 640), tile_size=640, overlap=0.25)
    xs = np.unique(g.tiles[:, 0])
    assert (np.diff(xs)[:-1] == 480).all() and 0 < np.diff(xs)[-1] <= 480
    assert xs[-1] + 640 == 4000
    # a region that is exactly a whole number of strides gets no duplicate tile
    g = TileGrid(slide, (0, 0, 640 + 2 * 480, 640), tile_size=640, overlap=160)
    assert np.unique(g.tiles[:, 0]).tolist() == [0, 480, 960]


def test_small_regions_and_small_slides():
    slide = ArraySlide(np.full((3000, 4000, 3), 240, np.uint8))
    # smaller than a tile: anchored at the region's origin ...
    g = TileGrid(slide, (1000, 1000, 50, 60), tile_size=640)
    assert g.tiles.tolist() == [[1000, 1000, 640, 640]]
    # ... shifted back inside the slide at its far edges
    g = TileGrid(slide, (3900, 2950, 50, 30), tile_size=640)
    assert g.tiles.tolist() == [[3360, 2360, 640, 640]]
    # a region reaching outside the slide is clipped to it
    g = TileGrid(slide, (-500, -500, 1200, 1200), tile_size=640, overlap=0)
    assert g.region == (0, 0, 700, 700)
    assert g.tiles[:, :2].tolist() == [[0, 0], [60, 0], [0, 60], [60, 60]]
    # a slide smaller than a tile: one tile from (0, 0) past the slide, padded with fill on read
    small = ArraySlide(np.full((200, 300, 3), 10, np.uint8))
    g = TileGrid(small, tile_size=640)
    assert g.tiles.tolist() == [[0, 0, 640, 640]]
    px = small.read_region(*g[0][:2], g.read_size, g.read_size, level=g.read_level)
    assert (px[:200, :300] == 10).all() and (px[200:] == 255).all() and (px[:, 300:] == 255).all()


# --- overlap -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overlap, px", [(0.2, 128), (0.25, 160), (0, 0), (0.0, 0), (64, 64), (64.0, 64), (1, 1)]
)
def test_overlap_ratio_and_pixel_forms(overlap, px):
    slide = ArraySlide(np.full((3000, 4000, 3), 240, np.uint8))
    g = TileGrid(slide, tile_size=640, overlap=overlap)
    assert g.overlap == px and g.stride == 640 - px and g.stride_l0 == 640 - px
    xs = np.unique(g.tiles[:, 0])
    assert (np.diff(xs)[:-1] == 640 - px).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"overlap": 640}, "640"),
        ({"overlap": 700}, "700"),
        ({"overlap": -0.1}, "-0.1"),
        ({"overlap": -5}, "-5"),
        ({"overlap": 1.0}, "1.0"),
        ({"overlap": 12.5}, "12.5"),
        ({"overlap": "0.2"}, "'0.2'"),
        ({"overlap": True}, "True"),
        ({"tile_size": 0}, "0"),
        ({"tile_size": 640.0}, "640.0"),
        ({"mpp": -1.0}, "-1.0"),
        ({"mpp": 0.0}, "0.0"),
        ({"min_tissue": 1.5}, "1.5"),
        ({"region": (5000, 0, 100, 100)}, "5000"),
        ({"region": (0, 0, 0, 100)}, "non-positive"),
        ({"region": "everything"}, "everything"),
    ],
)
def test_invalid_arguments_raise_tiling_error_naming_the_value(kwargs, match):
    slide = ArraySlide(np.full((3000, 4000, 3), 240, np.uint8), mpp=0.5)
    args = {"tile_size": 640, **kwargs}
    with pytest.raises(TilingError, match=match):
        TileGrid(slide, **args)


def test_mpp_without_slide_mpp_is_an_error():
    slide = ArraySlide(np.full((300, 400, 3), 240, np.uint8))
    with pytest.raises(TilingError, match=r"mpp=0\.5.*slide's own mpp is unknown"):
        TileGrid(slide, tile_size=64, mpp=0.5)


# --- resolution --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mpp, tile_l0, level, read_size",
    [
        (None, 640, 0, 640),  # no target: level 0, one model px per slide px
        (0.25, 640, 0, 640),  # the slide's own resolution
        (0.5, 1280, 1, 640),  # 2x coarser: level 1 (downsample 2)
        (0.75, 1920, 1, 960),  # 3x: deepest level not coarser than asked is 2x
        (1.0, 2560, 2, 640),  # 4x: level 2
        (0.4, 1024, 0, 1024),  # 1.6x: level 0
        (4.0, 10240, 3, 1280),  # 16x: deepest level is 8x
        (0.125, 320, 0, 320),  # finer than the slide: read 320 level-0 px, upsampled by the model
    ],
)
def test_mpp_scaling_and_read_level(pyramid, mpp, tile_l0, level, read_size):
    g = TileGrid(pyramid, tile_size=640, overlap=0.25, mpp=mpp)
    assert g.tile_l0 == tile_l0
    assert g.scale == pytest.approx(640 / tile_l0)
    assert g.read_level == level and g.read_size == read_size
    # never (noticeably) upsamples, unless the model asks for more than level 0 has
    assert g.read_downsample <= max(1.0, tile_l0 / 640 * 1.01)
    assert g.overlap_l0 == round(160 * tile_l0 / 640)
    if len(g) > 1:
        assert (g.tiles[:, 2] == tile_l0).all()


def test_read_level_tolerates_rounded_pyramids():
    img = np.full((4003, 4003, 3), 200, np.uint8)
    slide = PyramidSlide(img, downsamples=(1, 4), mpp=0.25)  # level 1: 1001 px, ds 3.999
    assert TileGrid(slide, tile_size=500, mpp=1.0).read_level == 1
    slide.levels[1] = Level(1000, 1000, 4.003)  # rounded down: ds 4.003, within 1 %
    assert TileGrid(slide, tile_size=500, mpp=1.0).read_level == 1
    slide.levels[1] = Level(950, 950, 4.2)  # 5 % coarser than asked: not used
    assert TileGrid(slide, tile_size=500, mpp=1.0).read_level == 0


# --- background skipping -----------------------------------------------------------------------
def test_min_tissue_thresholds(tissue_slide):
    slide, sections = tissue_slide
    s = sections[0]
    every = TileGrid(slide, s, tile_size=128, overlap=0, min_tissue=None)
    any_tissue = TileGrid(slide, s, tile_size=128, overlap=0)
    half = TileGrid(slide, s, tile_size=128, overlap=0, min_tissue=0.5)
    assert len(every) == every.grid_shape[0] * every.grid_shape[1]
    assert len(half) < len(any_tissue) < len(every)
    assert (any_tissue.tissue > 0).all() and (half.tissue >= 0.5).all()
    np.testing.assert_allclose(half.tissue, s.tissue_fractions(half.tiles))
    # plain rectangles and the full-slide section skip nothing
    assert TileGrid(slide, s.bbox, tile_size=128, overlap=0).tissue is None
    assert len(TileGrid(slide, s.bbox, tile_size=128, overlap=0)) == len(every)
    full = TileGrid(slide, full_slide_section(slide), tile_size=256, overlap=0)
    assert len(full) == len(TileGrid(slide, None, tile_size=256, overlap=0))


def test_section_mask_drives_skipping():
    slide = ArraySlide(np.full((1000, 1000, 3), 240, np.uint8))
    mask = np.zeros((10, 10), bool)
    mask[0, 0] = True  # only the top-left 100x100 level-0 px are tissue
    sec = Section(index=0, bbox=(0, 0, 1000, 1000), mask=mask, mask_downsample=100.0, area=10000)
    g = TileGrid(slide, sec, tile_size=200, overlap=0)
    assert g.tiles.tolist() == [[0, 0, 200, 200]]
    assert g.tissue.tolist() == [0.25]


# --- chunks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mpp", [None, 0.5, 1.0])
@pytest.mark.parametrize(
    "limits", [{}, {"max_pixels": 1500**2}, {"max_tiles": 3}, {"max_pixels": 1}]
)
def test_chunks_partition_the_tiles_and_contain_them(pyramid, mpp, limits):
    g = TileGrid(pyramid, tile_size=320, overlap=0.2, mpp=mpp)
    chunks = g.chunks(**limits)
    assert all(isinstance(c, Chunk) for c in chunks)
    idx = np.concatenate([c.tile_indices for c in chunks])
    assert sorted(idx.tolist()) == list(range(len(g)))  # every tile in exactly one chunk
    for c in chunks:
        cx, cy, cw, ch = c.region
        t = g.tiles[c.tile_indices]
        assert (t[:, 0] >= cx).all() and (t[:, 1] >= cy).all()
        assert (t[:, 0] + t[:, 2] <= cx + cw).all() and (t[:, 1] + t[:, 3] <= cy + ch).all()
        assert c.level == g.read_level
        assert c.offsets.shape == (len(c), 2) and (c.offsets >= 0).all()
        assert (c.offsets + g.read_size <= np.array(c.read_size)).all()
        if "max_tiles" in limits:
            assert len(c) <= limits["max_tiles"]
        if "max_pixels" in limits and len(c) > 1:
            assert c.read_size[0] * c.read_size[1] <= limits["max_pixels"]
    if limits.get("max_pixels") == 1:
        assert all(len(c) == 1 for c in chunks)
    if not limits:
        assert len(chunks) < len(g)  # tiles really are grouped


@pytest.mark.parametrize("mpp", [None, 0.5, 0.75])
def test_chunk_crops_equal_direct_tile_reads(pyramid, mpp):
    g = TileGrid(pyramid, (130, 70, 2500, 2000), tile_size=256, overlap=0.3, mpp=mpp)
    rs = g.read_size
    for c in g.chunks(max_pixels=900**2):
        px = pyramid.read_region(c.region[0], c.region[1], *c.read_size, level=c.level)
        for k, (ox, oy) in zip(c.tile_indices, c.offsets, strict=True):
            x, y, _, _ = g[int(k)]
            direct = pyramid.read_region(x, y, rs, rs, level=g.read_level)
            np.testing.assert_array_equal(px[oy : oy + rs, ox : ox + rs], direct)


def test_chunks_of_an_empty_grid_and_bad_limits(tissue_slide):
    slide, _ = tissue_slide
    mask = np.zeros((10, 10), bool)
    sec = Section(index=0, bbox=(0, 0, 1000, 1000), mask=mask, mask_downsample=100.0, area=0)
    g = TileGrid(slide, sec, tile_size=200)
    assert len(g) == 0 and g.chunks() == []
    with pytest.raises(TilingError, match="max_pixels"):
        TileGrid(slide, tile_size=200).chunks(max_pixels=0)
    with pytest.raises(TilingError, match="max_tiles"):
        TileGrid(slide, tile_size=200).chunks(max_tiles=0)


def test_chunk_windows_are_its_tiles_inside_the_read():
    """Chunk.windows(read_size): (x, y, w, h) of each tile in the read, which is what
    read_region(only=) takes; reading only them gives every tile's pixels."""
    img = np.random.default_rng(0).integers(0, 255, (3000, 4000, 3), np.uint8)
    grid = TileGrid(ArraySlide(img), (0, 0, 4000, 3000), tile_size=640, overlap=0.2)
    for c in grid.chunks(max_pixels=2000 * 2000):
        win = c.windows(grid.read_size)
        assert win.shape == (len(c), 4) and win.dtype == np.int64
        assert (win[:, :2] == c.offsets).all() and (win[:, 2:] == grid.read_size).all()
        x, y, _, _ = c.region
        pix = ArraySlide(img).read_region(x, y, *c.read_size, only=win)
        for (ox, oy, w, h), t in zip(win, c.tile_indices, strict=True):
            tx, ty, tw, th = grid.tiles[t]
            np.testing.assert_array_equal(
                pix[oy : oy + h, ox : ox + w], img[ty : ty + th, tx : tx + tw]
            )
