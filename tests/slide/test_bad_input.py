"""Broken files give typed errors whose message names the file, the value seen and the fix."""

from __future__ import annotations

import os
import shutil
import tracemalloc
import warnings

import numpy as np
import pytest
import tifffile

from tests.slide.conftest import (
    W,
    patch_tag,
    segment_location,
    set_segment_bytecount,
    texture,
)
from trtwsi.errors import (
    CorruptSlideError,
    SlideNotFoundError,
    TileReadError,
    UnsupportedFormatError,
)
from trtwsi.slide import open_slide
from trtwsi.slide.tiff import TiffSlide


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


@pytest.fixture
def small_tiled(tmp_path):
    path = tmp_path / "small.tif"
    tifffile.imwrite(
        path, texture(512, 768), tile=(256, 256), compression="zlib", photometric="rgb"
    )
    return path


def test_missing_file(tmp_path):
    with pytest.raises(SlideNotFoundError, match=r"nope\.svs"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideNotFoundError, match=r"nope\.tif"):
        TiffSlide(tmp_path / "nope.tif")


def test_truncated_tiff(tmp_path, small_tiled):
    data = small_tiled.read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) // 2])
    fds = _open_fds()
    with pytest.raises(CorruptSlideError) as e:
        open_slide(path)
    msg = str(e.value)
    assert "cut.tif" in msg and "truncated" in msg
    assert f"only {len(data) // 2} bytes" in msg  # the value seen
    assert "copy or export it again" in msg  # the fix
    assert _open_fds() == fds  # nothing leaked by the failed open


def test_truncated_inside_the_header(tmp_path, small_tiled):
    path = tmp_path / "cut_header.tif"
    path.write_bytes(small_tiled.read_bytes()[:6])
    with pytest.raises(CorruptSlideError, match=r"cut_header\.tif"):
        TiffSlide(path)


def test_non_image_renamed_tif(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("these are my notes, not a slide\n" * 20)
    with pytest.raises(UnsupportedFormatError) as e:
        TiffSlide(path)
    msg = str(e.value)
    assert "notes.tif" in msg and "not a TIFF" in msg and "b'these a" in msg
    # through open_slide: not a TIFF → OpenSlide, which does not recognise it either
    with pytest.raises(UnsupportedFormatError, match=r"notes\.tif"):
        open_slide(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(UnsupportedFormatError, match=r"empty\.svs"):
        TiffSlide(path)
    with pytest.raises(UnsupportedFormatError, match=r"empty\.svs"):
        open_slide(path)


def test_tiff_magic_then_garbage(tmp_path):
    path = tmp_path / "garbage.tif"
    path.write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(5000))
    with pytest.raises(CorruptSlideError, match=r"garbage\.tif"):
        open_slide(path)


@pytest.mark.parametrize("layout", ["tiled", "one-strip"])
def test_absurd_dimensions_raise_without_allocating(tmp_path, layout):
    """10⁷ × 10⁷ px declared over a few hundred kB: CorruptSlideError at open, never a huge
    allocation (decided at open from the offsets/byte counts, nothing is decoded)."""
    path = tmp_path / f"absurd_{layout}.tif"
    img = texture(512, 768)
    if layout == "tiled":
        tifffile.imwrite(path, img, tile=(256, 256), compression="zlib", photometric="rgb")
    else:
        tifffile.imwrite(path, img, rowsperstrip=512, compression="zlib", photometric="rgb")
    patch_tag(path, "ImageWidth", 10**7)
    patch_tag(path, "ImageLength", 10**7)
    if layout == "one-strip":
        patch_tag(path, "RowsPerStrip", 10**7)
    tracemalloc.start()
    try:
        with pytest.raises(CorruptSlideError) as e:
            open_slide(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert path.name in msg and "10000000x10000000" in msg and "corrupt" in msg
    assert peak < 64 * 2**20


def test_unsupported_compression(tmp_path, small_tiled):
    path = tmp_path / "thunderscan.tif"
    shutil.copy(small_tiled, path)
    patch_tag(path, "Compression", 32809)
    with pytest.raises(UnsupportedFormatError) as e:
        open_slide(path)
    msg = str(e.value)
    assert "thunderscan.tif" in msg and "32809" in msg and "THUNDERSCAN" in msg
    assert "vips tiffsave" in msg  # the fix


def test_unsupported_photometric_cmyk(tmp_path):
    path = tmp_path / "cmyk.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(
        path, rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), photometric="separated"
    )
    with pytest.raises(UnsupportedFormatError) as e:
        TiffSlide(path)
    assert "cmyk.tif" in str(e.value) and "SEPARATED" in str(e.value)


def test_strip_bytecount_too_small_for_uncompressed(tmp_path):
    path = tmp_path / "short_strip.tif"
    tifffile.imwrite(path, texture(100, 100), rowsperstrip=100, photometric="rgb")
    set_segment_bytecount(path, 0, 1000)  # 100 rows × 300 bytes are needed
    with pytest.raises(CorruptSlideError, match=r"short_strip\.tif.*1000 bytes"):
        TiffSlide(path)


# --- corrupt JPEG tiles ----------------------------------------------------------------------
def _corrupt(src_path, dst_path, how: str, index: int) -> None:
    shutil.copy(src_path, dst_path)
    offset, count = segment_location(dst_path, index)
    if how == "bytecount":
        set_segment_bytecount(dst_path, index, 20)
        return
    with open(dst_path, "r+b") as f:
        f.seek(offset)
        if how == "junk":
            f.write(np.random.default_rng(1).bytes(count))
        elif how == "soi":
            f.write(b"\x00\x00")  # the JPEG start-of-image marker


@pytest.mark.parametrize("how", ["junk", "soi", "bytecount"])
@pytest.mark.parametrize("fixture", ["svs_file", "vips_pyramid_tif"])
def test_corrupt_jpeg_tile_recorded_and_filled(request, tmp_path, fixture, how):
    good = request.getfixturevalue(fixture)
    bad = tmp_path / f"bad_{how}_{good.name}"
    _corrupt(good, bad, how, index=7)  # level 0, tile (row 1, col 1): 6 tiles across
    with TiffSlide(good) as s:
        want = s.read_region(0, 0, W, 1000)
    with TiffSlide(bad, threads=2) as s:
        with pytest.warns(RuntimeWarning, match=r"tile \(row 1, col 1\)"):
            got = s.read_region(0, 0, W, 1000)
        assert len(s.read_errors) == 1
        err = s.read_errors[0]
        assert isinstance(err, TileReadError)
        assert (err.level, err.tile, err.region) == (0, (1, 1), (256, 256, 256, 256))
        assert bad.name in str(err) and "filled with 255" in str(err)
        # the bad tile is fill, every other pixel equals the intact file's
        assert (got[256:512, 256:512] == 255).all()
        mask = np.ones(got.shape[:2], bool)
        mask[256:512, 256:512] = False
        np.testing.assert_array_equal(got[mask], want[mask])
        # a second read reports the same tile once
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s.read_region(300, 300, 50, 50)
        assert len(s.read_errors) == 1


def test_corrupt_jpeg_tile_raises_with_on_error_raise(tmp_path, svs_file):
    bad = tmp_path / "bad.svs"
    _corrupt(svs_file, bad, "junk", index=7)
    with TiffSlide(bad, on_error="raise", threads=2) as s:
        np.testing.assert_array_equal(s.read_region(0, 0, 256, 256).shape, (256, 256, 3))
        with pytest.raises(TileReadError) as e:
            s.read_region(0, 0, 600, 600)  # many tiles in the pool, one of them bad
        assert e.value.tile == (1, 1) and e.value.level == 0
        with pytest.raises(TileReadError):
            s.read_region(300, 300, 10, 10)  # single tile, inline path
    bad_open = open_slide(bad, on_error="raise")
    assert bad_open.on_error == "raise"
    bad_open.close()


def test_corrupt_strip_reported_by_strip_index(tmp_path):
    path = tmp_path / "bad_strip.tif"
    img = texture(300, 200)
    tifffile.imwrite(path, img, rowsperstrip=100, compression="zlib", photometric="rgb")
    offset, count = segment_location(path, 1)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * count)
    with TiffSlide(path) as s, pytest.warns(RuntimeWarning, match="strip 1"):
        got = s.read_region(0, 0, 200, 300)
    assert s.read_errors[0].tile == (1, 0)
    assert (got[100:200] == 255).all()
    np.testing.assert_array_equal(got[:100], img[:100])
    np.testing.assert_array_equal(got[200:], img[200:])
