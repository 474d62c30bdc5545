"""trtwsi.plan.tissue_nd: the array-module tissue path (CuPy on the GPU) against OpenCV (the oracle).

The "numpy" backend runs the very code the GPU runs, with NumPy/SciPy, so the CPU tests check the
algorithm; the ``gpu`` tests check that CuPy gives the same sections as OpenCV.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from trtwsi.errors import TilingError
from trtwsi.plan.tissue import find_sections
from trtwsi.plan.tissue_nd import array_modules, component_stats, otsu_threshold
from trtwsi.slide import ArraySlide
from trtwsi.synthetic import Scene, make_array


def _why_no_gpu() -> str | None:
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        import cupyx.scipy.ndimage  # noqa: F401
    except Exception as e:
        return f"needs CuPy and a CUDA GPU: {type(e).__name__}: {e}"
    return None


_NO_GPU = _why_no_gpu()
gpu = pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or "")


def _slides():
    out = []
    for seed, n in [(1, 3), (8, 6), (7, 2)]:
        img, _ = make_array(3000, 2200, seed=seed, n_sections=n)
        out.append(pytest.param(ArraySlide(img, mpp=0.5), id=f"seed{seed}-n{n}"))
    # fragments: two 20 µm apart (one section), one far away; and pale glass only
    glass = Scene(3000, 2000, seed=3, n_sections=0).render(0, 0, 3000, 2000)
    frag = glass.copy()
    for x0, x1 in [(300, 900), (940, 1400), (2000, 2600)]:
        cv2.rectangle(frag, (x0, 500), (x1, 1400), (225, 170, 205), -1)
    cv2.rectangle(frag, (500, 800), (600, 900), (245, 244, 247), -1)  # a hole to fill
    out.append(pytest.param(ArraySlide(frag, mpp=0.5), id="fragments"))
    out.append(pytest.param(ArraySlide(glass, mpp=0.5), id="glass"))
    return out


SLIDES = _slides()


def _assert_same_sections(ref, got, min_iou=0.99):
    assert len(got) == len(ref)
    for a, b in zip(ref, got, strict=True):
        assert a.index == b.index
        assert np.allclose(a.bbox, b.bbox, atol=2 * a.mask_downsample)
        assert a.mask_downsample == b.mask_downsample
        assert abs(a.area - b.area) <= 0.01 * a.area
        if a.mask.shape == b.mask.shape:
            inter = np.logical_and(a.mask, b.mask).sum()
            union = np.logical_or(a.mask, b.mask).sum()
            assert inter / union >= min_iou


@pytest.mark.parametrize("slide", SLIDES)
@pytest.mark.parametrize("merge", [None, 0])
def test_numpy_path_matches_opencv(slide, merge):
    kw = {"max_size": 1024, "merge_distance": merge}
    _assert_same_sections(find_sections(slide, **kw), find_sections(slide, backend="numpy", **kw))


@pytest.mark.parametrize("backend", ["numpy", "cv2"])
def test_a_step_profile_changes_no_section(backend):
    """steps= (bench/probe_start.py's profile) records each step's seconds and finds what the
    plain call finds."""
    slide = SLIDES[0].values[0]
    steps: dict = {}
    got = find_sections(slide, max_size=1024, backend=backend, steps=steps)
    want = find_sections(slide, max_size=1024, backend=backend)
    assert [(s.bbox, s.area) for s in got] == [(s.bbox, s.area) for s in want]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)
    names = ["sections"]
    if backend == "numpy":
        names = ["upload", "background", "feature", "median", "threshold", "morphology",
                 "holes_label", "holes_fill", "label", "merge_grow", "merge_groups", "stats",
                 "crop_select", "crop_grow", "crop_download", "sections"]  # fmt: skip
    assert list(steps) == names
    assert all(v >= 0.0 for v in steps.values())


@pytest.mark.parametrize("seed", range(8))
def test_section_mask_resampling_equals_fancy_indexing(seed):
    """resample_rows_cols (two takes over the in-range runs) gives what np.ix_ indexing gave,
    with source rows/columns before, inside and after the source, repeated or skipped."""
    from trtwsi.plan.tissue import resample_rows_cols

    rng = np.random.default_rng(seed)
    for _ in range(50):
        src = rng.random(tuple(int(v) for v in rng.integers(1, 60, 2))) < 0.4
        ii = np.sort(rng.integers(-5, src.shape[0] + 5, int(rng.integers(0, 80))))
        jj = np.sort(rng.integers(-5, src.shape[1] + 5, int(rng.integers(0, 80))))
        oki = (ii >= 0) & (ii < src.shape[0])
        okj = (jj >= 0) & (jj < src.shape[1])
        want = np.zeros((len(ii), len(jj)), bool)
        want[np.ix_(oki, okj)] = src[np.ix_(ii[oki], jj[okj])]
        np.testing.assert_array_equal(resample_rows_cols(src, ii, jj), want)


def _grow_cases(seed: int):
    """Random masks (specks to blobs, some touching the border) and pads on both sides of
    DISK_PAD_MAX, exact square roots and values just under an integer included."""
    rng = np.random.default_rng(seed)
    pads = [0.4, 1.0, 1.5, 2.0, 2.2, 2.5, 3.0, 5**0.5, 8**0.5, 4.0, 5.7, 7.999, 8.0, 9.5, 12.0]
    for pad in pads:
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        m = rng.random((h, w)) < rng.uniform(0.001, 0.2)
        m[int(rng.integers(0, h)), int(rng.integers(0, w))] = True  # never empty
        if seed % 2:
            m = cv2.dilate(m.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        yield m, float(pad)


@pytest.mark.parametrize("seed", range(6))
def test_grow_is_the_distance_transform_threshold(seed):
    """grow() (a disk dilation up to DISK_PAD_MAX) marks exactly the pixels whose Euclidean
    distance to the mask is <= pad, as scipy's distance transform says."""
    import scipy.ndimage as sndi

    from trtwsi.plan.tissue_nd import DISK_PAD_MAX, grow

    assert DISK_PAD_MAX < 9.5
    for m, pad in _grow_cases(seed):
        want = sndi.distance_transform_edt(~m) <= pad
        np.testing.assert_array_equal(grow(m, pad, np, sndi), want, err_msg=f"pad {pad}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seed", range(6))
def test_grow_on_the_gpu_is_the_distance_transform_threshold(seed):
    import cupy
    import cupyx.scipy.ndimage as cndi
    import scipy.ndimage as sndi

    from trtwsi.plan.tissue_nd import grow

    for m, pad in _grow_cases(seed):
        want = sndi.distance_transform_edt(~m) <= pad
        got = grow(cupy.asarray(m), pad, cupy, cndi).get()
        np.testing.assert_array_equal(got, want, err_msg=f"pad {pad}")


@pytest.mark.parametrize("seed", range(20))
def test_otsu_matches_opencv(seed):
    rng = np.random.default_rng(seed)
    # bimodal, unimodal and sparse images
    kind = seed % 3
    if kind == 0:
        img = np.concatenate([rng.normal(20, 5, 5000), rng.normal(120 + seed, 25, 3000)])
    elif kind == 1:
        img = rng.normal(128, 30 + seed, 8000)
    else:
        img = rng.choice([3, 17, 200 + seed], size=500, p=[0.5, 0.3, 0.2]).astype(float)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(1, -1)
    t, _ = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert otsu_threshold(np.bincount(img.ravel(), minlength=256)) == int(t)


def test_otsu_of_a_flat_image_is_zero():
    assert otsu_threshold(np.bincount(np.full(100, 7), minlength=256)) == 0


def test_unknown_backend_is_refused():
    with pytest.raises(TilingError, match="backend"):
        find_sections(SLIDES[0].values[0], backend="opencl")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("slide", SLIDES)
def test_cupy_path_matches_opencv(slide):
    _assert_same_sections(find_sections(slide), find_sections(slide, backend="cupy"))


def _random_labels(seed: int):
    """A random binary image (blobs, specks, thin lines, border-touching), labelled 8-connected by
    OpenCV: (labels int32, n, OpenCV's stats)."""
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 300, 2)
    m = (rng.random((h, w)) < rng.uniform(0.001, 0.6)).astype(np.uint8)
    if seed % 2:
        m = cv2.dilate(m, np.ones((3, 3), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    return labels.astype(np.int32), n, stats.astype(np.int64)


@pytest.mark.parametrize("seed", range(12))
def test_component_stats_match_opencv(seed):
    labels, n, want = _random_labels(seed)
    got = component_stats(labels, n, np)
    assert got.dtype == np.int64 and got.shape == (n, 5)
    assert np.array_equal(got[1:], want[1:])  # row 0 (the background) is not used
    assert got[0, 4] == want[0, 4]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(12))
def test_component_stats_on_the_gpu_match_opencv(seed):
    cp, _ = array_modules("cupy")
    labels, n, want = _random_labels(seed)
    got = component_stats(cp.asarray(labels), n, cp)
    assert isinstance(got, np.ndarray)
    assert np.array_equal(got[1:], want[1:])
    assert got[0, 4] == want[0, 4]
