"""TiffSlide against source pixels and against other decoders (tifffile asarray, OpenSlide)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile

from tests.slide.conftest import (
    BORDER_REGIONS,
    MPP,
    NDPI_H,
    NDPI_MPP,
    NDPI_W,
    H,
    W,
    expected_region,
    segment_location,
    set_segment_bytecount,
    texture,
)
from trtwsi.errors import RegionError, SlideError
from trtwsi.slide.base import area_reduce
from trtwsi.slide.color import to_rgb_uint8
from trtwsi.slide.tiff import DEFAULT_MAX_THREADS, TiffSlide

#: JPEG (Q=90) of the test texture vs its source, per sample: mean |error| (measured 1.9–2.5)
#: and 99.9th percentile (measured 8–17).
JPEG_MEAN_TOL = 3.5
JPEG_P999_TOL = 24


def assert_jpeg_close(got: np.ndarray, source: np.ndarray) -> None:
    err = np.abs(got.astype(np.int16) - source)
    assert err.mean() < JPEG_MEAN_TOL, err.mean()
    assert np.percentile(err, 99.9) <= JPEG_P999_TOL, np.percentile(err, 99.9)


def level_pixels(path, level: int) -> np.ndarray:
    """Whole level decoded by tifffile's own asarray (first plane), RGB uint8."""
    with tifffile.TiffFile(path) as t:
        series = next(s for s in t.series if s.name.lower() not in ("thumbnail", "label", "macro"))
        a = series.levels[level].asarray()
    while a.ndim > 3:
        a = a[0]
    return to_rgb_uint8(a)


# --- lossless files: exact against the source ------------------------------------------------
LOSSLESS = [
    ("deflate_pages_tif", "pyramidal-tiff", 3, None),
    ("lzw_tif", "tiff", 1, MPP),
    ("strip_tif", "tiff", 1, None),
    ("strip_lzw_tif", "tiff", 1, None),
    ("ome_file", "ome-tiff", 3, MPP),
    ("vips_plain_tif", "tiff", 1, None),
    ("vips_tiled_lzw_tif", "tiff", 1, None),
]


@pytest.mark.parametrize(("fixture", "fmt", "nlevels", "mpp"), LOSSLESS)
def test_lossless_levels_and_pixels(request, src_levels, fixture, fmt, nlevels, mpp):
    path = request.getfixturevalue(fixture)
    with TiffSlide(path, threads=2) as s:
        assert s.format == fmt
        assert s.mpp == pytest.approx(mpp) if mpp else s.mpp is None
        assert s.dimensions == (W, H)
        assert s.level_count == nlevels
        for lv, ref in zip(s.levels, src_levels, strict=False):
            assert (lv.height, lv.width) == ref.shape[:2]
            assert lv.downsample == (W / lv.width + H / lv.height) / 2  # OpenSlide's rule
        for level in range(nlevels):
            ds = s.levels[level].downsample
            for x, y, w, h in BORDER_REGIONS:
                got = s.read_region(x, y, w, h, level=level)
                want = expected_region(src_levels[level], x, y, w, h, ds)
                np.testing.assert_array_equal(got, want, err_msg=f"level {level} {(x, y, w, h)}")


def test_tile_geometry_reported(deflate_pages_tif, strip_tif, vips_tiled_lzw_tif):
    with TiffSlide(deflate_pages_tif) as s:
        assert [(lv.tile_width, lv.tile_height) for lv in s.levels] == [(256, 256)] * 3
        assert [lv.downsample for lv in s.levels] == [1.0, 2.0, 4.0]
    with TiffSlide(strip_tif) as s:
        assert (s.levels[0].tile_width, s.levels[0].tile_height) == (None, None)
    with TiffSlide(vips_tiled_lzw_tif) as s:
        assert (s.levels[0].tile_width, s.levels[0].tile_height) == (128, 128)


# --- JPEG files: exact against other decoders, close to the source ---------------------------
JPEG_FILES = [
    # fixture, format, level count, mpp, downsamples
    ("jpeg_subifd_tif", "pyramidal-tiff", 3, 0.5, [1.0, 2.0, 4.0]),
    ("svs_file", "aperio-svs", 2, MPP, [1.0, 4.0]),
    ("vips_pyramid_tif", "pyramidal-tiff", 4, MPP, [1.0, 2.0, 4.0, (W / 187 + H / 125) / 2]),
]


@pytest.mark.parametrize(("fixture", "fmt", "nlevels", "mpp", "downsamples"), JPEG_FILES)
def test_jpeg_levels_match_tifffile_and_source(
    request, src_levels, fixture, fmt, nlevels, mpp, downsamples
):
    path = request.getfixturevalue(fixture)
    with TiffSlide(path, threads=2) as s:
        assert s.format == fmt
        assert s.level_count == nlevels
        assert [lv.downsample for lv in s.levels] == pytest.approx(downsamples)
        assert s.mpp == pytest.approx(mpp)
        for level in range(nlevels):
            ref = level_pixels(path, level)
            lv = s.levels[level]
            assert ref.shape[:2] == (lv.height, lv.width)
            whole = s.read_region(0, 0, lv.width, lv.height, level=level)
            np.testing.assert_array_equal(whole, ref)  # same pixels as tifffile's own decode
            for x, y, w, h in BORDER_REGIONS:
                got = s.read_region(x, y, w, h, level=level)
                want = expected_region(ref, x, y, w, h, lv.downsample)
                np.testing.assert_array_equal(got, want, err_msg=f"level {level} {(x, y, w, h)}")
        # and close to the source pixels (JPEG loss only)
        assert_jpeg_close(s.read_region(0, 0, W, H), src_levels[0])


@pytest.mark.parametrize("fixture", ["svs_file", "vips_pyramid_tif", "jpeg_subifd_tif"])
def test_jpeg_matches_openslide_exactly(request, fixture):
    """OpenSlide (its own libjpeg + cairo) decodes the same files to the same pixels at every
    level it sees with an integer downsample (it ignores SubIFDs: level 0 only there)."""
    from trtwsi.slide.openslide_reader import OpenSlideSlide

    path = request.getfixturevalue(fixture)
    with TiffSlide(path) as t, OpenSlideSlide(path) as o:
        checked = 0
        for level, lv in enumerate(o.levels):
            if lv.downsample != int(lv.downsample):
                continue  # OpenSlide interpolates fractional level offsets
            assert t.levels[level].width == lv.width
            for x, y, w, h in [*BORDER_REGIONS[:9], (0, 0, lv.width, lv.height)]:
                np.testing.assert_array_equal(
                    t.read_region(x, y, w, h, level),
                    o.read_region(x, y, w, h, level),
                    err_msg=f"level {level} {(x, y, w, h)}",
                )
            checked += 1
        assert checked >= 1


def test_svs_metadata(svs_file):
    with TiffSlide(svs_file) as s:
        assert s.format == "aperio-svs"
        assert s.mpp == pytest.approx(0.25)
        assert s.properties["objective_power"] == 20
        assert s.properties["vendor"] == "aperio"
        assert s.properties["aperio.ScanScope ID"] == "SS1234"
        assert set(s.properties["associated_images"]) == {"Thumbnail", "Label", "Macro"}
        # the thumbnail page (between level 0 and level /4) is not a level
        assert [lv.width for lv in s.levels] == [1500, 375]


def test_ome_metadata_units(ome_file):
    with TiffSlide(ome_file) as s:
        assert s.format == "ome-tiff"
        assert s.mpp == pytest.approx(0.25)  # 250 nm
        assert s.properties["ome.Pixels.PhysicalSizeXUnit"] == "nm"


def test_mpp_from_resolution_tags(jpeg_subifd_tif, lzw_tif, strip_tif, deflate_pages_tif):
    with TiffSlide(jpeg_subifd_tif) as s:
        assert s.mpp == pytest.approx(0.5)  # centimeter unit
    with TiffSlide(lzw_tif) as s:
        assert s.mpp == pytest.approx(0.25)  # inch unit
    with TiffSlide(strip_tif) as s:
        assert s.mpp is None  # 72 dpi: a default, not a microscope
    with TiffSlide(deflate_pages_tif) as s:
        assert s.mpp is None  # tifffile's unitless 1/1


def test_mpp_argument_overrides(svs_file, strip_tif):
    with TiffSlide(svs_file, mpp=0.5) as s:
        assert s.mpp == 0.5
        assert s.properties["mpp_x"] == pytest.approx(0.25)  # what the file says stays visible
    with TiffSlide(strip_tif, mpp=0.3) as s:
        assert s.mpp == 0.3
    with pytest.raises(ValueError, match="mpp"):
        TiffSlide(strip_tif, mpp=-1)


# --- NDPI ------------------------------------------------------------------------------------
def test_ndpi_levels_mpp_and_pixels(ndpi_file, ndpi_src):
    with TiffSlide(ndpi_file, threads=2) as s:
        assert s.format == "hamamatsu-ndpi"
        assert s.dimensions == (NDPI_W, NDPI_H)
        assert [lv.downsample for lv in s.levels] == [1.0, 4.0]
        assert (s.levels[0].tile_width, s.levels[0].tile_height) == (128, 8)  # restart intervals
        assert s.mpp == pytest.approx(NDPI_MPP, rel=1e-6)
        assert s.properties["objective_power"] == 20
        assert s.properties["associated_images"] == ["Macro"]
        for level in range(2):
            ref = level_pixels(ndpi_file, level)
            lv = s.levels[level]
            np.testing.assert_array_equal(s.read_region(0, 0, lv.width, lv.height, level), ref)
            for x, y, w, h in [
                (-7, 3, 50, 40),
                (1000, 760, 100, 100),
                (130, 9, 1, 1),
                (0, 0, 300, 200),
            ]:
                want = expected_region(ref, x, y, w, h, lv.downsample)
                np.testing.assert_array_equal(s.read_region(x, y, w, h, level), want)
            assert_jpeg_close(ref, ndpi_src[level])


def test_ndpi_matches_openslide(ndpi_file):
    from trtwsi.slide.openslide_reader import OpenSlideSlide

    with TiffSlide(ndpi_file) as t, OpenSlideSlide(ndpi_file) as o:
        assert o.format == "hamamatsu"
        assert o.mpp == pytest.approx(t.mpp)
        for level, lv in enumerate(t.levels):
            # OpenSlide adds JPEG-scaled levels; compare the ones that are file pages
            olevel = next(i for i, ol in enumerate(o.levels) if ol.width == lv.width)
            for x, y, w, h in [
                (0, 0, lv.width, lv.height),
                (-40, 100, 90, 70),
                (1000, 700, 50, 90),
            ]:
                np.testing.assert_array_equal(
                    t.read_region(x, y, w, h, level), o.read_region(x, y, w, h, olevel)
                )


# --- out= buffers ----------------------------------------------------------------------------
def test_out_buffer_and_strided_view(deflate_pages_tif, src_levels):
    with TiffSlide(deflate_pages_tif, threads=2) as s:
        out = np.zeros((300, 400, 3), np.uint8)
        got = s.read_region(1300, 800, 400, 300, out=out)
        assert got is out
        np.testing.assert_array_equal(out, expected_region(src_levels[0], 1300, 800, 400, 300))

        big = np.full((1000, 1200, 3), 7, np.uint8)
        view = big[100:400, 50:550]  # rows are not contiguous: a view into a larger buffer
        assert not view.flags.c_contiguous
        got = s.read_region(-100, 300, 500, 300, level=1, out=view)
        assert got is view
        np.testing.assert_array_equal(
            view, expected_region(src_levels[1], -100, 300, 500, 300, 2.0)
        )
        # nothing outside the view was touched
        assert (big[:100] == 7).all() and (big[400:] == 7).all()
        assert (big[:, :50] == 7).all() and (big[:, 550:] == 7).all()


# --- sample layouts --------------------------------------------------------------------------
def _layouts():
    rgb = texture(300, 500, seed=5)
    rng = np.random.default_rng(5)
    gray = rgb[..., 1].copy()
    rgba = np.dstack([rgb, rng.integers(0, 256, (300, 500), dtype=np.uint8)])
    u16 = (rgb.astype(np.uint16) << 8) | rng.integers(0, 256, rgb.shape, dtype=np.uint16)
    g16 = u16[..., 0].copy()
    f32 = gray.astype(np.float32) / 255.0
    cmap = rng.integers(0, 65536, (3, 256), dtype=np.uint16)
    palette_rgb = (cmap >> 8).astype(np.uint8).T[gray]
    return [
        # id, data written, write kwargs, expected RGB
        ("rgba", rgba, {"photometric": "rgb", "extrasamples": "unassalpha"}, rgb),
        ("gray8", gray, {"photometric": "minisblack"}, to_rgb_uint8(gray)),
        ("gray16", g16, {"photometric": "minisblack"}, to_rgb_uint8(g16)),
        ("rgb16", u16, {"photometric": "rgb"}, to_rgb_uint8(u16)),
        ("float32", f32, {"photometric": "minisblack"}, to_rgb_uint8(f32)),
        ("miniswhite", gray, {"photometric": "miniswhite"}, to_rgb_uint8(255 - gray)),
        ("palette", gray, {"photometric": "palette", "colormap": cmap}, palette_rgb),
        (
            "planar",
            np.moveaxis(rgb, -1, 0).copy(),
            {"photometric": "rgb", "planarconfig": "separate"},
            rgb,
        ),
    ]


LAYOUTS = _layouts()


@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "stripped"])
@pytest.mark.parametrize(("name", "data", "kw", "want"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_sample_layouts_converted(tmp_path, name, data, kw, want, tiled):
    path = tmp_path / f"{name}.tif"
    layout = {"tile": (128, 128)} if tiled else {"rowsperstrip": 64}
    tifffile.imwrite(path, data, compression="zlib", **layout, **kw)
    with TiffSlide(path, threads=2) as s:
        assert s.dimensions == (500, 300)
        for x, y, w, h in [
            (0, 0, 500, 300),
            (-20, 250, 100, 100),
            (127, 63, 3, 3),
            (499, 299, 1, 1),
        ]:
            np.testing.assert_array_equal(
                s.read_region(x, y, w, h), expected_region(want, x, y, w, h)
            )
        assert not s.read_errors


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_uncompressed_strips_read_only_touched_rows(tmp_path, byteorder):
    """Uncompressed strips take the row path: narrow (row by row), wide (row block), one row;
    16-bit samples in both byte orders."""
    rng = np.random.default_rng(2)
    data = rng.integers(0, 65536, (700, 900, 3), dtype=np.uint16)
    path = tmp_path / "raw16.tif"
    tifffile.imwrite(path, data, rowsperstrip=700, byteorder=byteorder, photometric="rgb")
    want = to_rgb_uint8(data)
    with TiffSlide(path) as s:
        assert s._io[0].kind == "raw-rows"
        for x, y, w, h in [(10, 20, 30, 500), (0, 5, 900, 40), (-5, 699, 20, 5), (450, 350, 1, 1)]:
            np.testing.assert_array_equal(
                s.read_region(x, y, w, h), expected_region(want, x, y, w, h)
            )


def test_volumetric_tiles_fall_back_to_tifffile(tmp_path):
    vol = np.stack([texture(200, 300, seed=i) for i in range(4)])  # (Z, Y, X, S)
    path = tmp_path / "volume.tif"
    tifffile.imwrite(path, vol, tile=(2, 64, 64), photometric="rgb", compression="zlib")
    with TiffSlide(path) as s:
        assert s._io[0].kind == "fallback"
        assert s.dimensions == (300, 200)
        np.testing.assert_array_equal(
            s.read_region(-5, 10, 100, 300), expected_region(vol[0], -5, 10, 100, 300)
        )


def test_sparse_tile_reads_as_fill(tmp_path, src):
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, src, tile=(256, 256), compression="zlib", photometric="rgb")
    set_segment_bytecount(path, 7, 0)  # tile (row 1, col 1): 6 tiles across
    with TiffSlide(path) as s:
        got = s.read_region(0, 0, W, H)
    want = src.copy()
    want[256:512, 256:512] = 255
    np.testing.assert_array_equal(got, want)
    assert s.read_errors == []


def test_only_touched_tiles_are_decoded(tmp_path, src):
    """A region away from a corrupt tile reads cleanly: its bytes were never decoded."""
    path = tmp_path / "one_bad.tif"
    tifffile.imwrite(path, src, tile=(256, 256), compression="zlib", photometric="rgb")
    offset, count = segment_location(path, 7)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * count)
    with TiffSlide(path, threads=2) as s:
        np.testing.assert_array_equal(s.read_region(600, 0, 500, 1000), src[:, 600:1100])
        assert s.read_errors == []
        with pytest.warns(RuntimeWarning, match="tile"):
            s.read_region(300, 300, 10, 10)
        assert [e.tile for e in s.read_errors] == [(1, 1)]


# --- only= (the parts a caller will use) -----------------------------------------------------
def _random_parts(rng, w, h, k):
    """k rectangles (x, y, w, h) in a w × h region, some reaching past its edges."""
    x = rng.integers(-100, w, k)
    y = rng.integers(-100, h, k)
    return np.stack([x, y, rng.integers(1, 400, k), rng.integers(1, 400, k)], 1)


@pytest.mark.parametrize(
    "fixture", ["svs_file", "jpeg_subifd_tif", "deflate_pages_tif", "strip_tif", "vips_pyramid_tif"]
)
@pytest.mark.parametrize("threads", [1, 4])
def test_only_parts_have_the_pixels_of_a_full_read(request, fixture, threads):
    """Tiled JPEG/deflate, strips and an uncompressed level: inside the parts the pixels equal
    a full read's; regions partly off the level keep the fill there."""
    rng = np.random.default_rng(3)
    with TiffSlide(request.getfixturevalue(fixture), threads=threads) as s:
        for x, y, w, h, level in [(0, 0, W, H, 0), (-60, 130, 900, 700, 0), (200, 90, 500, 400, 1)]:
            if level >= len(s.levels):
                continue
            want = s.read_region(x, y, w, h, level=level)
            parts = _random_parts(rng, w, h, 5)
            got = s.read_region(x, y, w, h, level=level, only=parts)
            for px, py, pw, ph in parts:
                y0, y1, x0, x1 = max(py, 0), min(py + ph, h), max(px, 0), min(px + pw, w)
                if y0 < y1 and x0 < x1:  # (a part wholly off the region is ignored)
                    np.testing.assert_array_equal(got[y0:y1, x0:x1], want[y0:y1, x0:x1])


def test_only_decodes_just_the_tiles_its_parts_touch(svs_file, monkeypatch):
    """256² JPEG tiles: one part inside tile (1, 1) of a 4 × 3-tile region decodes that tile
    alone; no part decodes nothing and leaves ``out`` as it was."""
    decoded = []
    real = TiffSlide._decode_jpeg

    def counting(self, io, data):
        decoded.append(len(data))
        return real(self, io, data)

    monkeypatch.setattr(TiffSlide, "_decode_jpeg", counting)
    with TiffSlide(svs_file, threads=2) as s:
        s.read_region(0, 0, 1024, 768)
        assert len(decoded) == 12
        decoded.clear()
        got = s.read_region(0, 0, 1024, 768, only=[(300, 280, 100, 90)])
        assert len(decoded) == 1
        np.testing.assert_array_equal(got[280:370, 300:400], s.read_region(300, 280, 100, 90))
        decoded.clear()
        out = np.full((768, 1024, 3), 7, np.uint8)
        s.read_region(0, 0, 1024, 768, out=out, only=np.zeros((0, 4), int))
        assert decoded == [] and (out == 7).all()


def test_a_corrupt_tile_outside_the_parts_is_never_read(tmp_path, src):
    """The glass of a chunk's bounding box is not decoded, so its bad tile costs nothing."""
    path = tmp_path / "one_bad.tif"
    tifffile.imwrite(path, src, tile=(256, 256), compression="zlib", photometric="rgb")
    offset, count = segment_location(path, 7)  # tile (row 1, col 1)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * count)
    with TiffSlide(path, threads=2) as s:
        got = s.read_region(0, 0, 1024, 1000, only=[(0, 0, 256, 1000), (600, 0, 400, 200)])
        np.testing.assert_array_equal(got[:, :256], src[:, :256])
        np.testing.assert_array_equal(got[:200, 600:1000], src[:200, 600:1000])
        assert s.read_errors == []


@pytest.mark.parametrize("only", [[(0, 0, 0, 5)], [(0, 0, 5, -1)], [1, 2, 3], "ab"])
def test_bad_only_is_refused(svs_file, only):
    with TiffSlide(svs_file) as s, pytest.raises(RegionError, match="only"):
        s.read_region(0, 0, 100, 100, only=only)


# --- threads ---------------------------------------------------------------------------------
def test_threads_1_and_4_give_same_pixels(vips_pyramid_tif):
    regions = [(0, 0, W, H), (-30, 17, 700, 900), (911, 433, 589, 567), (3, 5, 1, 1)]
    with TiffSlide(vips_pyramid_tif, threads=1) as a, TiffSlide(vips_pyramid_tif, threads=4) as b:
        for level in range(a.level_count):
            for x, y, w, h in regions:
                np.testing.assert_array_equal(
                    a.read_region(x, y, w, h, level), b.read_region(x, y, w, h, level)
                )
        assert a._pool is None  # threads=1 never starts a pool
        assert b._pool is not None


def test_single_tile_region_skips_the_pool(deflate_pages_tif):
    with TiffSlide(deflate_pages_tif, threads=4) as s:
        s.read_region(10, 10, 200, 200)  # inside tile (0, 0)
        assert s._pool is None
        s.read_region(10, 10, 300, 200)  # two tiles
        assert s._pool is not None


def test_concurrent_callers_share_the_pool(jpeg_subifd_tif):
    rng = np.random.default_rng(0)
    regions = [
        (int(rng.integers(-100, W)), int(rng.integers(-100, H)), 300, 300) for _ in range(24)
    ]
    with TiffSlide(jpeg_subifd_tif, threads=1) as serial:
        want = [serial.read_region(*r) for r in regions]
    with TiffSlide(jpeg_subifd_tif, threads=3) as s, ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda r: s.read_region(*r), regions))
    for g, w_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w_)


# --- lifetime --------------------------------------------------------------------------------
def test_close_releases_pool_and_fd(deflate_pages_tif):
    s = TiffSlide(deflate_pages_tif, threads=2)
    s.read_region(0, 0, 600, 600)
    pool, fd = s._pool, s._fd
    assert pool is not None
    s.close()
    assert s._pool is None and s._fd is None
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(RuntimeError):  # the executor is shut down
        pool.submit(int)
    with pytest.raises(SlideError, match="closed"):
        s.read_region(0, 0, 10, 10)
    s.close()  # idempotent
    s.__del__()


def test_context_manager_and_no_thread_leak(deflate_pages_tif):
    before = threading.active_count()
    for _ in range(3):
        with TiffSlide(deflate_pages_tif, threads=3) as s:
            s.read_region(0, 0, 1000, 1000)
    assert threading.active_count() == before


def test_threads_argument_validated(deflate_pages_tif):
    with pytest.raises(ValueError, match="threads"):
        TiffSlide(deflate_pages_tif, threads=0)
    with TiffSlide(deflate_pages_tif) as s:
        assert s.threads == min(os.cpu_count() or 1, DEFAULT_MAX_THREADS)


def test_info_and_repr(svs_file):
    with TiffSlide(svs_file) as s:
        info = s.info()
        assert info.format == "aperio-svs" and info.mpp == pytest.approx(0.25)
        assert [lv["downsample"] for lv in info.levels] == [1.0, 4.0]
        assert "aperio.svs" in repr(s)
        thumb = s.thumbnail(300)
        assert thumb.shape == (200, 300, 3) and thumb.dtype == np.uint8


@pytest.mark.parametrize(
    "fixture", ["svs_file", "vips_pyramid_tif", "jpeg_subifd_tif", "ndpi_file"]
)
def test_direct_jpeg_path_used_and_equal_to_tifffile(request, fixture):
    """8-bit RGB/YCbCr JPEG tiles (with JPEGTables, or an NDPI header) take the direct
    libjpeg-turbo path, whose pixels equal tifffile's decode of the same tile."""
    path = request.getfixturevalue(fixture)
    with TiffSlide(path) as s:
        io = s._io[0]
        assert io.jpeg is not None
        index = io.n_across + 1  # tile (1, 1)
        offset, count = int(io.offsets[index]), int(io.counts[index])
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(count)
        fast = s._decode_jpeg(io, data)
        assert fast is not None
        ref = io.page.decode(
            data, index, jpegtables=io.page.jpegtables, jpegheader=io.page.jpegheader
        )[0][0]
        np.testing.assert_array_equal(fast[: ref.shape[0], : ref.shape[1]], ref)


def test_thumbnail_reads_a_slightly_smaller_level_instead_of_a_much_larger_one(tmp_path):
    """A level within 10 % of the thumbnail size is enlarged (cheap) rather than a level up to
    4x larger per side being decoded and shrunk."""
    import cv2

    from trtwsi.synthetic import make_slide

    path = tmp_path / "pyr.tif"
    make_slide(path, 4096, 3072, seed=1, n_sections=1)
    with TiffSlide(path) as s:
        assert len(s.levels) >= 2
        lv = s.levels[1]
        near = int(lv.width / 0.95)  # level 1 is 95 % of this: read it and enlarge
        th = round(s.height * near / s.width)
        small = s.read_region(0, 0, lv.width, lv.height, level=1)
        want = cv2.resize(small, (near, th), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(s.thumbnail(near), want)
        far = int(lv.width / 0.8)  # level 1 is only 80 %: shrink level 0 instead
        th = round(s.height * far / s.width)
        big = s.read_region(0, 0, s.width, s.height, level=0)
        want = cv2.resize(big, (far, th), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(s.thumbnail(far), want)


def test_thumbnail_halves_a_level_just_under_twice_its_size_then_enlarges(tmp_path):
    """A level 1.93x the thumbnail (a 63232² slide's 3952² level for 2048²) is halved by
    whole-block averaging and enlarged by 3.6 %, instead of a slow fractional area shrink."""
    import cv2

    from trtwsi.synthetic import make_slide

    path = tmp_path / "pyr.tif"
    make_slide(path, 3952, 2964, seed=2, n_sections=1)
    with TiffSlide(path) as s:
        tw = 2048
        th = round(s.height * tw / s.width)
        big = s.read_region(0, 0, s.width, s.height, level=0)
        want = cv2.resize(area_reduce(big, 2), (tw, th), interpolation=cv2.INTER_LINEAR)
        got = s.thumbnail(tw)
        np.testing.assert_array_equal(got, want)
        direct = cv2.resize(big, (tw, th), interpolation=cv2.INTER_AREA)
        assert np.abs(got.astype(int) - direct).mean() < 1.5


@pytest.mark.parametrize("shape", [(8, 12, 3), (9, 13, 3), (1, 5, 3), (7, 1, 3), (2, 2, 3)])
@pytest.mark.parametrize("f", [1, 2, 3])
def test_area_reduce_is_the_rounded_block_mean(shape, f):
    rng = np.random.default_rng(f)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    H, W = shape[:2]
    want = np.empty((-(-H // f), -(-W // f), 3), np.uint8)
    for i in range(want.shape[0]):
        for j in range(want.shape[1]):
            block = img[i * f : (i + 1) * f, j * f : (j + 1) * f]
            want[i, j] = np.floor(block.mean((0, 1)) + 0.5)  # halves up, as OpenCV
    np.testing.assert_array_equal(area_reduce(img, f), want)
