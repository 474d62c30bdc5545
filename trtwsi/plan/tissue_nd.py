"""Tissue components with array-module ndimage operations: CuPy on the GPU, NumPy/SciPy on the CPU.

:func:`components` computes, from a slide thumbnail, what :func:`trtwsi.plan.tissue.find_sections`
needs before it assembles sections: the labelled tissue components and which ones merge into
one section. It runs the same steps as the OpenCV implementation in :mod:`trtwsi.plan.tissue`
(the oracle), written with ``xp`` (``numpy`` or ``cupy``) and ``ndi`` (``scipy.ndimage`` or
``cupyx.scipy.ndimage``) so that one code path is tested on the CPU and run on the GPU.

Differences from the OpenCV path, by design:

- the merge distance and the sections' pad use the exact Euclidean distance transform, OpenCV's
  path its 5×5 mask approximation (error up to ~2 % of the distance): components whose gap is
  within ~2 % of the merge distance can group differently, and a section mask's edge can move
  by a thumbnail pixel where the distance to the tissue is within ~2 % of the pad;
- component numbering differs (it never reaches the caller: sections are put in reading order).

Everything else (glass colour, feature, median, Otsu threshold, closing/opening with the same
5×5 ellipse, hole filling, 8-connected components) gives the same pixels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DISK_PAD_MAX",
    "Components",
    "array_modules",
    "component_stats",
    "components",
    "group_crop",
    "grow",
    "otsu_threshold",
]

_FLT_EPSILON = float(np.finfo(np.float32).eps)


class Components(NamedTuple):
    """The tissue components of a ``(th, tw)`` thumbnail.

    ``labels``: int32 ``(th, tw)``, 0 = background, 1..n-1 = components (8-connected), in the
    module that found them (a CuPy array stays on the device; :func:`group_crop` reads it
    there). ``stats``: host int64 ``(n, 5)``: left, top, width, height, area (thumbnail px), row
    0 unused (OpenCV's ``connectedComponentsWithStats`` layout). ``group_of``: host int64
    ``(n,)``, the merge group of each component (-1 for row 0): components of one group form
    one section.
    """

    labels: Any
    stats: np.ndarray
    group_of: np.ndarray


def group_crop(labels, comps: np.ndarray, box, pad: float, steps: dict | None = None) -> np.ndarray:
    """Host bool mask of the components ``comps`` (host label ids: one merge group) of
    ``labels`` (:attr:`Components.labels`) in the thumbnail crop ``box = (x0, y0, x1, y1)``
    (thumbnail px), grown by ``pad`` thumbnail px (pixels within that exact Euclidean distance
    of them), computed in the module of ``labels``. ``steps``: as :func:`components`'
    (``crop_select``, ``crop_grow``, ``crop_download``)."""
    xp, ndi = array_modules("numpy" if isinstance(labels, np.ndarray) else "cupy")
    mark = _step_marker(steps, xp)
    x0, y0, x1, y1 = box
    crop = xp.isin(labels[y0:y1, x0:x1], xp.asarray(comps))
    mark("crop_select")
    if pad > 0:
        crop = grow(crop, pad, xp, ndi)
    mark("crop_grow")
    out = _host(crop)
    mark("crop_download")
    return out


#: Pads (px) up to which :func:`grow` dilates by the exact disk instead of running a distance
#: transform: one filter pass of at most 17 × 17 px.
DISK_PAD_MAX = 8.0


def grow(mask, pad: float, xp, ndi):
    """The pixels within Euclidean distance ``pad`` (> 0) of ``mask``'s True pixels: bool, the
    shape of ``mask`` (2-D, module ``xp``), nothing outside it counted. The same pixels as
    ``ndi.distance_transform_edt(~mask) <= pad`` for a mask with a True pixel: up to
    :data:`DISK_PAD_MAX` a binary dilation by the disk of offsets ``sqrt(dy² + dx²) <= pad``
    (the same float64 comparison the transform's distances make), beyond it the transform."""
    if pad > DISK_PAD_MAX:
        return ndi.distance_transform_edt(~mask) <= pad
    r = int(np.floor(pad))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = np.sqrt((dy * dy + dx * dx).astype(np.float64)) <= pad
    return ndi.binary_dilation(mask, xp.asarray(disk), border_value=0)


def array_modules(backend: str) -> tuple[Any, Any]:
    """``(xp, ndi)`` for ``backend`` "numpy" or "cupy" (raises ImportError without CuPy)."""
    if backend == "cupy":
        import cupy
        import cupyx.scipy.ndimage as ndi

        return cupy, ndi
    if backend == "numpy":
        import scipy.ndimage as ndi

        return np, ndi
    raise ValueError(f"backend must be 'numpy' or 'cupy', got {backend!r}")


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def estimate_background(rgb, xp) -> np.ndarray:
    """Glass colour (3,) float64 (host) of an RGB uint8 ``(h, w, 3)`` array of module ``xp``;
    the same rule as :func:`trtwsi.plan.tissue.estimate_background`."""
    px = rgb.reshape(-1, 3)
    if len(px) > 1_000_000:
        px = px[:: len(px) // 1_000_000]
    r, g, b = (px[:, c] for c in range(3))  # uint8: max - min cannot overflow
    mx = xp.maximum(xp.maximum(r, g), b)
    mn = xp.minimum(xp.minimum(r, g), b)
    cand = px[((mx - mn) <= 30) & (mn >= 170)]
    if len(cand) < max(1, 0.005 * len(px)):
        return np.array([255.0, 255.0, 255.0])
    grey = cand.astype(xp.int32).sum(1)
    bright = cand[grey >= xp.percentile(grey, 75)]
    return _host(xp.median(bright, axis=0)).astype(np.float64)


def tissue_feature(rgb, bg: np.ndarray, xp):
    """uint8 ``(h, w)`` feature of :func:`trtwsi.plan.tissue.tissue_feature`, in module ``xp``."""
    bgi = np.rint(bg).astype(np.int16)
    d = [int(bgi[c]) - rgb[:, :, c].astype(xp.int16) for c in range(3)]
    hi = xp.maximum(xp.maximum(d[0], d[1]), d[2])
    lo = xp.minimum(xp.minimum(d[0], d[1]), d[2])
    hi -= lo
    return xp.minimum(hi, 255).astype(xp.uint8)


def otsu_threshold(hist: np.ndarray) -> int:
    """Otsu's threshold of a 256-bin histogram, as OpenCV computes it for 8-bit images (the
    first level that maximises the between-class variance; classes ``<= t`` and ``> t``)."""
    h = np.asarray(hist, np.float64)
    n = h.sum()
    if n <= 0:
        return 0
    p = h / n
    i = np.arange(256, dtype=np.float64)
    q1 = np.cumsum(p)
    m1 = np.cumsum(i * p)
    mu = m1[-1]
    q2 = 1.0 - q1
    ok = (np.minimum(q1, q2) >= _FLT_EPSILON) & (np.maximum(q1, q2) <= 1.0 - _FLT_EPSILON)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu1 = m1 / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) ** 2
    sigma = np.where(ok, sigma, 0.0)
    best = float(sigma.max())
    if best <= 0.0:
        return 0
    # the first level within rounding of the best (OpenCV's running max keeps the first)
    return int(np.nonzero(sigma >= best * (1.0 - 1e-12))[0][0])


def _ellipse5() -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)).astype(bool)


def components(
    thumb,
    *,
    threshold: float | None,
    min_contrast: float,
    merge_radius: float,
    backend: str = "numpy",
    steps: dict | None = None,
) -> Components | None:
    """Tissue components of an RGB uint8 ``(th, tw, 3)`` thumbnail (host array), or None when
    there is no tissue. ``merge_radius``: components closer than twice this (thumbnail px) are
    one group; 0 = no merging. Steps as in :func:`trtwsi.plan.tissue.find_sections` 1–4.
    ``steps``: when a dict, each step's seconds are added to it (the device synchronized after
    each step: a profile, slower than a plain call)."""
    from trtwsi.plan.tissue import _SQRT_LUT

    xp, ndi = array_modules(backend)
    mark = _step_marker(steps, xp)
    rgb = xp.asarray(thumb)
    th, tw = rgb.shape[:2]
    mark("upload")
    bg = estimate_background(rgb, xp)
    mark("background")
    feat = tissue_feature(rgb, bg, xp)
    mark("feature")
    if min(th, tw) >= 5:
        feat = ndi.median_filter(feat, size=5, mode="nearest")  # = cv2.medianBlur's replicate
    mark("median")
    if threshold is None:
        root = xp.asarray(_SQRT_LUT)[feat]
        otsu = otsu_threshold(_host(xp.bincount(root.ravel(), minlength=256)))
        t = max((otsu / 255.0) ** 2 * 255.0, float(min_contrast))
    else:
        t = float(threshold)
    mask = feat > t
    if not bool(mask.any()):
        return None
    mark("threshold")
    k = xp.asarray(_ellipse5())
    # OpenCV's morphology ignores the border: dilate pads with 0, erode with 1
    mask = ndi.binary_erosion(ndi.binary_dilation(mask, k, border_value=0), k, border_value=1)
    mask = ndi.binary_dilation(ndi.binary_erosion(mask, k, border_value=1), k, border_value=0)
    mark("morphology")
    # fill holes: background regions (4-connected) that do not touch the border
    bg_lab, _ = ndi.label(~mask)
    mark("holes_label")
    border = xp.concatenate([bg_lab[0], bg_lab[-1], bg_lab[:, 0], bg_lab[:, -1]])
    inside = ~xp.isin(bg_lab, border)
    mask |= inside & (bg_lab > 0)
    mark("holes_fill")
    eight = xp.ones((3, 3), dtype=bool)
    labels, n = ndi.label(mask, structure=eight)
    n = int(n) + 1
    mark("label")
    if n <= 1:
        return None
    fg = labels > 0
    if merge_radius > 0:
        near = grow(mask, merge_radius, xp, ndi)
        mark("merge_grow")
        grown, _ = ndi.label(near, structure=eight)
        group = xp.full(n, -1, dtype=xp.int64)
        group[labels[fg]] = grown[fg]  # all pixels of a component lie in one grown blob
        group_of = _host(group)
        mark("merge_groups")
    else:
        group_of = np.arange(n, dtype=np.int64)
    group_of[0] = -1
    stats = component_stats(labels, n, xp)
    mark("stats")
    return Components(labels.astype(xp.int32, copy=False), stats, group_of)


def _step_marker(steps: dict | None, xp):
    """``mark(name)``: adds the seconds since the last mark to ``steps[name]`` (after a device
    synchronize for CuPy); does nothing when ``steps`` is None."""
    if steps is None:
        return lambda name: None
    import time

    last = [time.perf_counter()]

    def mark(name: str) -> None:
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()
        now = time.perf_counter()
        steps[name] = steps.get(name, 0.0) + now - last[0]
        last[0] = now

    return mark


def component_stats(labels, n: int, xp) -> np.ndarray:
    """OpenCV-layout stats (left, top, width, height, area) of the labels 1..n-1 of an int
    ``(h, w)`` label image of module ``xp``, as host int64 ``(n, 5)``; row 0 holds only the
    background's pixel count. Computed where ``labels`` lives (a bounding box is a min/max per
    label over the foreground pixels), so only ``n`` rows cross to the host."""
    h, w = labels.shape
    flat = labels.ravel()
    idx = xp.flatnonzero(flat)
    lab = flat[idx].astype(xp.int64)
    row = idx // w
    ys = row.astype(xp.int32)
    xs = (idx - row * w).astype(xp.int32)
    lo = xp.full((2, n), max(h, w), dtype=xp.int32)
    hi = xp.full((2, n), -1, dtype=xp.int32)
    for k, v in enumerate((xs, ys)):
        _scatter(xp, "min", lo[k], lab, v)
        _scatter(xp, "max", hi[k], lab, v)
    out = xp.zeros((n, 5), dtype=xp.int64)
    out[:, :2] = lo.T
    out[:, 2:4] = (hi - lo + 1).T
    out[:, 4] = xp.bincount(flat.astype(xp.int64), minlength=n)[:n]
    out[0, :4] = 0
    out[out[:, 4] == 0, :4] = 0  # a label without pixels (none from ndi.label): no box
    return _host(out)


def _scatter(xp, op: str, target, index, value) -> None:
    """``target[index] = op(target[index], value)`` with repeated indices (unbuffered)."""
    if xp is np:
        (np.minimum if op == "min" else np.maximum).at(target, index, value)
    else:
        import cupyx

        (cupyx.scatter_min if op == "min" else cupyx.scatter_max)(target, index, value)
