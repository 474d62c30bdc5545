"""open_slide dispatch: arrays, ordinary images, TIFF family, OpenSlide formats, bad paths."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from tests.slide.conftest import texture
from trtwsi.errors import SlideNotFoundError, UnsupportedFormatError
from trtwsi.slide import ArraySlide, Slide, open_slide
from trtwsi.slide.openslide_reader import OpenSlideSlide
from trtwsi.slide.tiff import TiffSlide


def test_ndarray():
    img = texture(60, 80)
    s = open_slide(img, mpp=0.5)
    assert isinstance(s, ArraySlide)
    assert s.dimensions == (80, 60) and s.mpp == 0.5
    np.testing.assert_array_equal(s.read_region(0, 0, 80, 60), img)


def test_slide_passes_through(svs_file):
    with TiffSlide(svs_file) as s:
        assert open_slide(s) is s


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".JPEG", ".bmp"])
def test_ordinary_images_through_array_slide(tmp_path, suffix):
    img = texture(120, 90)
    path = tmp_path / f"img{suffix}"
    assert cv2.imwrite(str(path), img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    s = open_slide(path, mpp=0.25)
    assert isinstance(s, ArraySlide)
    assert s.format == suffix.lower().lstrip(".")
    assert s.path == path and s.mpp == 0.25
    got = s.read_region(0, 0, 90, 120)
    if suffix.lower() in (".png", ".bmp"):
        np.testing.assert_array_equal(got, img)  # lossless, RGB order kept
    else:
        assert np.abs(got.astype(np.int16) - img).mean() < 4


def test_png_with_alpha_and_16_bit(tmp_path):
    img = texture(50, 40)
    rgba16 = np.dstack([img, np.full((50, 40), 255, np.uint8)]).astype(np.uint16) * 257
    path = tmp_path / "rgba16.png"
    cv2.imwrite(str(path), rgba16[:, :, [2, 1, 0, 3]])
    s = open_slide(path)
    np.testing.assert_array_equal(s.read_region(0, 0, 40, 50), img)  # (v*257) >> 8 == v


@pytest.mark.parametrize(
    "fixture", ["svs_file", "ome_file", "vips_pyramid_tif", "strip_tif", "ndpi_file"]
)
def test_tiff_family_to_tiff_slide(request, fixture):
    path = request.getfixturevalue(fixture)
    s = open_slide(path, threads=2, on_error="raise")
    try:
        assert isinstance(s, TiffSlide)
        assert s.threads == 2 and s.on_error == "raise"
    finally:
        s.close()


def test_tiff_detected_by_header_not_extension(tmp_path, svs_file):
    path = tmp_path / "slide.data"
    shutil.copy(svs_file, path)
    with open_slide(path) as s:
        assert isinstance(s, TiffSlide) and s.format == "aperio-svs"


def test_unknown_extension_goes_to_openslide(tmp_path, vms_file):
    """A non-TIFF file with an extension open_slide does not know: OpenSlide identifies it."""
    key = vms_file.parent / "slide.ini"
    shutil.copy(vms_file, key)
    with open_slide(key) as s:
        assert isinstance(s, OpenSlideSlide) and s.format == "hamamatsu"
    with open_slide(vms_file) as s:  # .vms is an OpenSlide-only suffix
        assert isinstance(s, OpenSlideSlide)


def test_unknown_extension_not_a_slide(tmp_path):
    path = tmp_path / "readme.xyz"
    path.write_text("hello")
    with pytest.raises(UnsupportedFormatError, match=r"readme\.xyz"):
        open_slide(path)


def test_directory(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="directory"):
        open_slide(tmp_path)


def test_missing(tmp_path):
    with pytest.raises(SlideNotFoundError, match=r"missing\.svs"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
        open_slide(str(tmp_path / "missing.svs"))


def test_all_readers_are_slides(svs_file):
    for cls in (ArraySlide, TiffSlide, OpenSlideSlide):
        assert issubclass(cls, Slide)
