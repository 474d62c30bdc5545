"""trtwsi.plan.tissue: section detection, ordering, masks and tissue fractions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from trtwsi.errors import TilingError
from trtwsi.plan.tissue import (
    Section,
    estimate_background,
    find_sections,
    full_slide_section,
    reading_order,
    tissue_feature,
)
from trtwsi.slide import ArraySlide
from trtwsi.synthetic import GLASS_RGB, Scene, make_array


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def _glass(h, w, seed=0, rgb=(245, 244, 247)):
    """Empty glass of colour ``rgb`` with the synthetic slides' noise (std ~1.6)."""
    img = Scene(w, h, seed=seed, n_sections=0).render(0, 0, w, h).astype(np.int16)
    img += np.array(rgb, np.int16) - np.rint(GLASS_RGB).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(
    scope="module", params=[(1, 3), (8, 6), (7, 2)], ids=lambda p: f"seed{p[0]}-n{p[1]}"
)
def synthetic(request):
    seed, n = request.param
    img, gt = make_array(4000, 3000, seed=seed, n_sections=n)
    slide = ArraySlide(img, mpp=0.5)
    return slide, gt, Scene(4000, 3000, seed=seed, n_sections=n), find_sections(slide)


# --- on synthetic multi-section slides ---------------------------------------------------------
def test_finds_as_many_sections_as_generated(synthetic):
    _, gt, _, found = synthetic
    assert len(found) == len(gt.sections)
    assert [s.index for s in found] == list(range(len(found)))


def test_each_generated_section_is_covered_by_its_found_section(synthetic):
    _, gt, _, found = synthetic
    # the generator lists sections in the documented reading order too, so index i matches i
    for g, s in zip(gt.sections, found, strict=True):
        gx, gy, gw, gh = g
        x, y, w, h = s.bbox
        assert x <= gx and y <= gy and gx + gw <= x + w and gy + gh <= y + h, (g, s.bbox)
        assert _iou(g, s.bbox) > 0.7, (g, s.bbox)


def test_masks_cover_the_true_tissue(synthetic):
    _, _, scene, found = synthetic
    S = scene.lattice
    truth = scene.tissue_mask()
    ii, jj = np.nonzero(truth)
    px, py = (jj + 0.5) * S, (ii + 0.5) * S  # level-0 centres of true tissue cells
    hit = np.zeros(len(px), bool)
    for s in found:
        hit |= s.contains(px, py)
    assert hit.mean() > 0.999
    # areas: detected tissue (before padding) close to the truth
    for s, area in zip(found, scene.section_areas, strict=True):
        assert s.area == pytest.approx(area, rel=0.05)
    # and glass far from tissue is not in any mask
    far = cv2.distanceTransform((~truth).astype(np.uint8), cv2.DIST_L2, 5) * S > 200
    fi, fj = np.nonzero(far)
    for s in found:
        assert not s.contains((fj + 0.5) * S, (fi + 0.5) * S).any()


def test_mask_geometry_matches_its_docstring(synthetic):
    slide, _, _, found = synthetic
    for s in found:
        x, y, w, h = s.bbox
        d = s.mask_downsample
        assert s.mask.dtype == bool
        assert s.mask.shape == (int(np.ceil(h / d)), int(np.ceil(w / d)))
        assert x >= 0 and y >= 0 and x + w <= slide.width and y + h <= slide.height
        assert 0 < s.area <= w * h


# --- ordering ----------------------------------------------------------------------------------
def test_reading_order_rows_then_columns():
    boxes = {
        "a": (100, 120, 300, 200),  # row 1, left
        "b": (500, 100, 300, 220),  # row 1, right, starts higher than a: still after a
        "c": (900, 130, 200, 150),  # row 1
        "d": (50, 500, 400, 300),  # row 2, right ...
        "e": (600, 480, 100, 100),  # ... overlapping d's extent only partly but enough
        "f": (10, 1000, 100, 100),  # row 3
    }
    names = list(boxes)
    rng = np.random.default_rng(0)
    for _ in range(5):  # independent of the input order
        perm = rng.permutation(len(names))
        order = reading_order([boxes[names[i]] for i in perm])
        assert [names[perm[i]] for i in order] == ["a", "b", "c", "d", "e", "f"]
    # a box overlapping a row by less than half the smaller height starts its own row
    order = reading_order([(0, 0, 100, 100), (500, 70, 100, 100)])
    assert order == [0, 1]
    order = reading_order([(500, 0, 100, 100), (0, 70, 100, 100)])
    assert order == [0, 1]  # the second one is a row below, although it is further left
    order = reading_order([(500, 0, 100, 100), (0, 40, 100, 100)])
    assert order == [1, 0]  # same row (60 % overlap): left first
    assert reading_order([]) == []


def test_found_sections_follow_the_documented_order(synthetic):
    _, _, _, found = synthetic
    boxes = [s.bbox for s in found]
    assert reading_order(boxes) == list(range(len(boxes)))


# --- robustness --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rgb",
    [(245, 244, 247), (250, 246, 232), (236, 240, 248), (255, 255, 255)],
    ids=["neutral", "yellowish", "bluish", "white"],
)
def test_blank_slide_gives_no_sections(rgb):
    slide = ArraySlide(_glass(1500, 2000, rgb=rgb), mpp=0.5)
    assert find_sections(slide) == []
    blank = ArraySlide(np.full((300, 400, 3), 255, np.uint8))
    assert find_sections(blank) == []


def test_dust_and_pen_marks_are_ignored():
    img, gt = make_array(4000, 3000, seed=1, n_sections=3)
    scene = Scene(4000, 3000, seed=1, n_sections=3)
    truth = scene.tissue_mask()
    # find glass spots far from tissue for the debris
    far = cv2.distanceTransform((~truth).astype(np.uint8), cv2.DIST_L2, 5) * scene.lattice > 300
    fi, fj = np.nonzero(far)
    pick = np.random.default_rng(0).choice(len(fi), 3, replace=False)
    spots = [(int((fj[k] + 0.5) * scene.lattice), int((fi[k] + 0.5) * scene.lattice)) for k in pick]
    img = img.copy()
    cv2.circle(img, spots[0], 45, (35, 35, 38), -1)  # black dust / dirt: big but neutral
    cv2.line(
        img,
        (spots[1][0] - 150, spots[1][1]),
        (spots[1][0] + 150, spots[1][1] + 40),
        (60, 60, 60),
        12,
    )  # dark grey pen stroke
    cv2.circle(img, spots[2], 8, (70, 90, 200), -1)  # small coloured speck: under min area
    slide = ArraySlide(img, mpp=0.5)
    found = find_sections(slide)
    assert len(found) == len(gt.sections)
    for s in found:
        for x, y in spots:
            assert not s.contains(x, y)


def test_close_fragments_merge_and_far_ones_do_not():
    img = _glass(2000, 3000, seed=3)
    colour = (225, 170, 205)
    cv2.rectangle(img, (300, 500), (900, 1400), colour, -1)
    cv2.rectangle(img, (940, 500), (1400, 1400), colour, -1)  # 40 px = 20 µm gap: same section
    cv2.rectangle(img, (2000, 500), (2600, 1400), colour, -1)  # 600 px away: another section
    slide = ArraySlide(img, mpp=0.5)
    found = find_sections(slide)
    assert len(found) == 2
    x, _, w, _ = found[0].bbox
    assert x <= 300 and x + w >= 1400
    assert found[0].contains(600, 900) and found[0].contains(1200, 900)
    assert not found[0].contains(920, 450)  # the mask is not the bbox: outside the fragments
    # without merging, the fragments are separate sections
    assert len(find_sections(slide, merge_distance=0)) == 3


def test_minimum_area_and_units():
    img = _glass(2000, 3000, seed=4)
    colour = (225, 170, 205)
    cv2.rectangle(img, (300, 500), (1300, 1500), colour, -1)  # 1 Mpx = 0.25 mm²
    cv2.circle(img, (2300, 1000), 60, colour, -1)  # ~11 000 px² = 2 800 µm²: debris
    with_mpp = ArraySlide(img, mpp=0.5)
    assert len(find_sections(with_mpp)) == 1
    assert len(find_sections(with_mpp, min_area_um2=1000)) == 2
    assert len(find_sections(with_mpp, min_area_px=5000)) == 2
    no_mpp = ArraySlide(img)
    assert len(find_sections(no_mpp)) == 1  # px default
    with pytest.raises(TilingError, match="min_area_um2"):
        find_sections(no_mpp, min_area_um2=1000)
    with pytest.raises(TilingError, match="pad"):
        find_sections(with_mpp, pad=-1)


def test_feature_ignores_neutral_absorption_and_background_tint():
    px = np.array(
        [[[245, 244, 247], [30, 30, 30], [120, 120, 121], [225, 170, 205], [250, 246, 232]]],
        np.uint8,
    )
    f = tissue_feature(px, background=np.array([245, 244, 247]))
    assert f[0, 0] <= 3 and f[0, 1] <= 3 and f[0, 2] <= 3  # glass, black dust, grey pen
    assert f[0, 3] >= 40  # pale pink tissue
    yellow = np.broadcast_to(np.array([250, 246, 232], np.uint8), (50, 50, 3))
    assert np.allclose(estimate_background(yellow), [250, 246, 232])
    assert tissue_feature(yellow).max() == 0


# --- Section geometry --------------------------------------------------------------------------
def _half_section():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # left half of the bbox is tissue
    return Section(index=0, bbox=(100, 200, 40, 40), mask=mask, mask_downsample=10.0, area=800)


def test_tissue_fraction_is_exact_for_partial_pixels():
    s = _half_section()
    assert s.tissue_fraction(100, 200, 40, 40) == pytest.approx(0.5)
    assert s.tissue_fraction(105, 200, 10, 40) == pytest.approx(1.0)
    assert s.tissue_fraction(115, 200, 10, 40) == pytest.approx(0.5)  # straddles the edge
    assert s.tissue_fraction(125, 210, 10, 10) == pytest.approx(0.0)
    # outside the bbox counts as non-tissue
    assert s.tissue_fraction(80, 200, 40, 40) == pytest.approx(0.5)
    assert s.tissue_fraction(0, 0, 50, 50) == 0.0
    fr = s.tissue_fractions(np.array([[100, 200, 20, 20], [120, 200, 20, 20], [90, 190, 20, 20]]))
    np.testing.assert_allclose(fr, [1.0, 0.0, 0.25])
    assert s.contains(105, 205) and not s.contains(125, 205) and not s.contains(99, 205)
    np.testing.assert_array_equal(
        s.contains([105, 125, 500], [205, 205, 205]), [True, False, False]
    )


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (257, 33), (600, 900)])
def test_integral_image_is_the_summed_area_table(shape):
    """The mask's summed-area table (OpenCV's) equals two float64 cumsums, for contiguous and
    strided masks; an empty mask gives zeros."""
    rng = np.random.default_rng(shape[0])
    big = rng.random((shape[0] * 2, shape[1])) > 0.4
    for mask in (big[: shape[0]], big[::2]):
        s = Section(0, (0, 0, shape[1], shape[0]), mask, 1.0, int(mask.sum()))
        want = np.zeros((shape[0] + 1, shape[1] + 1))
        want[1:, 1:] = mask.cumsum(0, dtype=np.float64).cumsum(1)
        got = s._integral_image()
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)
    empty = Section(0, (0, 0, 5, 5), np.zeros((0, 5), bool), 1.0, 0)
    np.testing.assert_array_equal(empty._integral_image(), np.zeros((1, 6)))


def test_full_slide_section():
    slide = ArraySlide(_glass(700, 1300))
    s = full_slide_section(slide)
    assert s.bbox == (0, 0, 1300, 700) and s.mask.all() and s.area == 1300 * 700
    assert s.tissue_fraction(0, 0, 1300, 700) == pytest.approx(1.0)
    assert s.tissue_fraction(1200, 600, 200, 200) == pytest.approx(0.25)  # half outside per axis


def test_sections_of_a_tiff_slide(tmp_path):
    from trtwsi import open_slide
    from trtwsi.synthetic import make_slide

    gt = make_slide(tmp_path / "s.tif", 5000, 3500, seed=5, n_sections=3)
    with open_slide(tmp_path / "s.tif") as slide:
        found = find_sections(slide, max_size=1024)
    assert len(found) == 3
    for g, s in zip(gt.sections, found, strict=True):
        assert _iou(g, s.bbox) > 0.7
