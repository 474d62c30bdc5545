"""ArraySlide (in-memory slides) and the Slide base contract it shares with every reader."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tests.slide.conftest import expected_region, texture
from trtwsi.errors import CorruptSlideError, RegionError
from trtwsi.slide import ArraySlide
from trtwsi.slide.color import to_rgb_uint8


@pytest.fixture(scope="module")
def big():
    return texture(2100, 4100, seed=11)


def test_pyramid_levels_for_large_array(big):
    s = ArraySlide(big, mpp=0.5)
    # /4 steps until the longer side is < 1024: 4100 -> 1025 -> 256
    assert [(lv.width, lv.height) for lv in s.levels] == [(4100, 2100), (1025, 525), (256, 131)]
    # OpenSlide: mean of the width and height ratios
    assert [lv.downsample for lv in s.levels] == pytest.approx(
        [1.0, (4100 / 1025 + 2100 / 525) / 2, (4100 / 256 + 2100 / 131) / 2]
    )
    assert s.levels[0].tile_width is None
    lvl1 = cv2.resize(big, (1025, 525), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(s.read_region(0, 0, 1025, 525, level=1), lvl1)
    x, y = 4000, 2000  # level-0 coordinates of a level-1 read past the bottom-right
    np.testing.assert_array_equal(
        s.read_region(x, y, 64, 64, level=1), expected_region(lvl1, x, y, 64, 64, 4.0)
    )


def test_small_array_single_level():
    s = ArraySlide(texture(100, 200))
    assert s.level_count == 1 and s.format == "array" and s.mpp is None


def test_borders(big):
    s = ArraySlide(big)
    for x, y, w, h in [(-5, -5, 10, 10), (4095, 2095, 10, 10), (5000, 0, 3, 3), (0, 0, 1, 1)]:
        np.testing.assert_array_equal(s.read_region(x, y, w, h), expected_region(big, x, y, w, h))


def test_thumbnail(big):
    s = ArraySlide(big)
    th = s.thumbnail(512)
    assert th.shape == (262, 512, 3) and th.dtype == np.uint8
    ref = cv2.resize(big, (512, 262), interpolation=cv2.INTER_AREA)
    assert np.abs(th.astype(np.int16) - ref).mean() < 2  # from level 1, not level 0
    # no upscaling beyond the slide
    assert s.thumbnail(10_000).shape == big.shape


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[..., 0],  # gray (H, W)
        lambda a: a[..., :1],  # (H, W, 1)
        lambda a: np.dstack([a, np.zeros(a.shape[:2], np.uint8)]),  # RGBA, alpha dropped
        lambda a: a.astype(np.uint16) * 257,  # 16-bit -> top byte
        lambda a: a.astype(np.float32) / 255,  # float in [0, 1]
    ],
    ids=["gray", "gray1", "rgba", "uint16", "float"],
)
def test_sample_conversion(make):
    a = texture(30, 40)
    data = make(a)
    s = ArraySlide(data)
    np.testing.assert_array_equal(s.read_region(0, 0, 40, 30), to_rgb_uint8(data))


def test_empty_array_rejected():
    with pytest.raises(CorruptSlideError, match="empty"):
        ArraySlide(np.zeros((0, 10, 3), np.uint8))


def test_region_errors():
    s = ArraySlide(texture(50, 50))
    with pytest.raises(RegionError, match="level 3"):
        s.read_region(0, 0, 10, 10, level=3)
    with pytest.raises(RegionError, match="positive"):
        s.read_region(0, 0, 0, 10)
    with pytest.raises(RegionError, match="out buffer"):
        s.read_region(0, 0, 10, 10, out=np.zeros((10, 11, 3), np.uint8))
    with pytest.raises(RegionError, match="out buffer"):
        s.read_region(0, 0, 10, 10, out=np.zeros((10, 10, 3), np.float32))
    with pytest.raises(RegionError, match="limit"):
        s.read_region(0, 0, 1 << 16, 1 << 16)


def test_best_level_for_downsample(big):
    s = ArraySlide(big)
    assert s.best_level_for_downsample(1.0) == 0
    assert s.best_level_for_downsample(3.9) == 0
    assert s.best_level_for_downsample(4.0) == 1
    assert s.best_level_for_downsample(100) == 2


def test_from_file_rejects_non_image(tmp_path):
    from trtwsi.errors import UnsupportedFormatError

    path = tmp_path / "fake.png"
    path.write_bytes(b"not a png")
    with pytest.raises(UnsupportedFormatError, match=r"fake\.png"):
        ArraySlide.from_file(path)


def test_pyramid_levels_are_made_on_first_read_the_same_as_before(big):
    """Opening makes no level (a region run over level 0 never pays for them); the first read
    of a level makes it and the ones above it, equal to area-averaging 4x level by level, once
    even when 8 threads read at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    s = ArraySlide(big)
    assert len(s.levels) == 3 and s._images[1] is None and s._images[2] is None
    s.read_region(0, 0, 64, 64)
    assert s._images[1] is None
    l1 = cv2.resize(big, (s.levels[1].width, s.levels[1].height), interpolation=cv2.INTER_AREA)
    l2 = cv2.resize(l1, (s.levels[2].width, s.levels[2].height), interpolation=cv2.INTER_AREA)
    lv = s.levels[2]
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda _: s.read_region(0, 0, lv.width, lv.height, level=2), range(8)))
    for o in outs:
        np.testing.assert_array_equal(o, l2)
    np.testing.assert_array_equal(s._images[1], l1)
