"""OpenSlideSlide: the Slide contract over OpenSlide (also the oracle of test_tiff.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import tifffile

from tests.slide.conftest import (
    BORDER_REGIONS,
    MPP,
    VMS_H,
    VMS_W,
    W,
    expected_region,
    set_segment_bytecount,
)
from trtwsi.errors import SlideError, SlideNotFoundError, UnsupportedFormatError
from trtwsi.slide.openslide_reader import OpenSlideSlide, openslide_available
from trtwsi.slide.tiff import TiffSlide

pytestmark = pytest.mark.skipif(not openslide_available(), reason="openslide extra not installed")


def test_available():
    assert openslide_available() is True


def test_svs_levels_mpp_properties(svs_file):
    with OpenSlideSlide(svs_file) as s:
        assert s.format == "aperio"
        assert s.dimensions == (W, 1000)
        assert [lv.downsample for lv in s.levels] == [1.0, 4.0]
        assert (s.levels[0].tile_width, s.levels[0].tile_height) == (256, 256)
        assert s.mpp == pytest.approx(MPP)
        assert s.properties["objective_power"] == 20
        assert s.properties["vendor"] == "aperio"
        assert s.properties["aperio.AppMag"] == "20"  # OpenSlide's own, as strings
    with OpenSlideSlide(svs_file, mpp=0.3) as s:
        assert s.mpp == 0.3


def test_lossless_pixels_exact(deflate_pages_tif, src_levels):
    """Pixels through OpenSlide equal the source at every level and border case."""
    with OpenSlideSlide(deflate_pages_tif) as s:
        assert s.level_count == 3
        for level in range(3):
            ds = s.levels[level].downsample
            for x, y, w, h in BORDER_REGIONS:
                np.testing.assert_array_equal(
                    s.read_region(x, y, w, h, level),
                    expected_region(src_levels[level], x, y, w, h, ds),
                )


def test_out_buffer(deflate_pages_tif, src_levels):
    with OpenSlideSlide(deflate_pages_tif) as s:
        big = np.zeros((400, 400, 3), np.uint8)
        view = big[50:250, 100:300]
        assert s.read_region(1400, -50, 200, 200, out=view) is view
        np.testing.assert_array_equal(view, expected_region(src_levels[0], 1400, -50, 200, 200))
        assert (big[:50] == 0).all() and (big[250:] == 0).all()


def test_missing_tile_alpha_becomes_fill(tmp_path, src):
    """OpenSlide returns transparent (alpha 0) pixels for a missing tile: they read as 255, the
    same as TiffSlide's sparse tiles."""
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, src, tile=(256, 256), compression="zlib", photometric="rgb")
    set_segment_bytecount(path, 7, 0)
    with OpenSlideSlide(path) as o, TiffSlide(path) as t:
        got = o.read_region(0, 0, W, 1000)
        assert (got[256:512, 256:512] == 255).all()
        np.testing.assert_array_equal(got[:256], src[:256])
        np.testing.assert_array_equal(got, t.read_region(0, 0, W, 1000))


def test_vms_non_tiff_format(vms_file, vms_src):
    """A format tifffile cannot read at all (VMS: INI + JPEGs)."""
    with OpenSlideSlide(vms_file) as s:
        assert s.format == "hamamatsu"
        assert s.dimensions == (VMS_W, VMS_H)
        assert s.mpp == pytest.approx(0.22)
        whole = s.read_region(0, 0, VMS_W, VMS_H)
        jpeg = cv2.imread(str(vms_file.parent / "image.jpg"))[:, :, ::-1]
        np.testing.assert_array_equal(whole, jpeg)  # same as libjpeg via OpenCV
        assert np.abs(whole.astype(np.int16) - vms_src).mean() < 3.5
        edge = s.read_region(700, 480, 100, 100)
        np.testing.assert_array_equal(edge, expected_region(jpeg, 700, 480, 100, 100))


def test_unsupported_and_missing(tmp_path):
    junk = tmp_path / "junk.xyz"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(UnsupportedFormatError, match=r"junk\.xyz"):
        OpenSlideSlide(junk)
    with pytest.raises(SlideNotFoundError, match=r"gone\.mrxs"):
        OpenSlideSlide(tmp_path / "gone.mrxs")


def test_close(svs_file):
    s = OpenSlideSlide(svs_file)
    s.read_region(0, 0, 10, 10)
    s.close()
    with pytest.raises(SlideError, match="closed"):
        s.read_region(0, 0, 10, 10)
    s.close()
    s.__del__()
