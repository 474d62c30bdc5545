"""Tissue sections: tissue detection on a slide thumbnail.

:func:`find_sections` finds the separate pieces of tissue on a slide (serial sections, cores,
fragments) and returns them as :class:`Section` objects in a stable **reading order**
(:func:`reading_order`): rows top to bottom, left to right within a row, where sections whose
vertical extents overlap substantially share a row. "Section 0" is therefore the top-left one.

Frames: ``Section.bbox`` is ``(x, y, w, h)`` in level-0 px. ``Section.mask`` is a bool array
``(mh, mw)`` on a grid anchored at the bbox's top-left: mask pixel ``(i, j)`` covers level-0
``[x + j*d, x + (j+1)*d) × [y + i*d, y + (i+1)*d)`` with ``d = mask_downsample``, so
``mh = ceil(h / d)``, ``mw = ceil(w / d)`` (the last row/column may reach past the bbox; the
part outside the bbox never counts as tissue).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from trtwsi.errors import TilingError

if TYPE_CHECKING:
    from trtwsi.slide.base import Slide

#: Defaults (physical units when the slide's mpp is known).
DEFAULT_MIN_AREA_UM2 = 20_000.0  # 0.02 mm², e.g. a 140 µm square: smaller pieces are debris
DEFAULT_MERGE_UM = 50.0  # fragments closer than this are one section
DEFAULT_PAD_UM = 25.0  # margin around a section (bbox and mask)
#: Used when the slide's mpp is unknown (level-0 px).
DEFAULT_MIN_AREA_PX = 80_000.0
DEFAULT_MERGE_PX = 100.0
DEFAULT_PAD_PX = 50.0
#: Minimal tissue contrast (feature units, 0–255): the threshold never goes below this, so
#: Otsu on an all-glass slide (pure noise) finds nothing.
DEFAULT_MIN_CONTRAST = 8.0
#: Longer side (px) of the thumbnail tissue is found on (``find_sections(max_size=...)``).
TISSUE_THUMBNAIL = 2048

_SQRT_LUT = np.round(np.sqrt(np.arange(256) / 255.0) * 255.0).astype(np.uint8)


@dataclass(eq=False)
class Section:
    """One piece of tissue.

    ``index``: position in reading order. ``bbox``: ``(x, y, w, h)`` level-0 px, padded and
    clipped to the slide. ``mask``: bool ``(mh, mw)`` tissue mask covering the bbox at
    ``mask_downsample`` level-0 px per mask px (see the module docstring for the exact grid);
    it is dilated by the same padding as the bbox, so it errs on the side of tissue.
    ``area``: detected tissue area in level-0 px² (before that dilation).
    """

    index: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    mask_downsample: float
    area: int
    _integral: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.bbox = tuple(int(v) for v in self.bbox)  # type: ignore[assignment]
        self.mask = np.asarray(self.mask, dtype=bool)
        self.mask_downsample = float(self.mask_downsample)
        if self.mask.ndim != 2 or self.mask_downsample <= 0:
            raise ValueError(
                f"mask must be 2-D with a positive downsample, got {self.mask.shape} "
                f"at {self.mask_downsample}"
            )

    def __repr__(self) -> str:
        return (
            f"Section(index={self.index}, bbox={self.bbox}, area={self.area}, "
            f"mask={self.mask.shape[1]}x{self.mask.shape[0]}@{self.mask_downsample:.3g})"
        )

    # --- geometry ------------------------------------------------------------------------------
    def _integral_image(self) -> np.ndarray:
        """``(mh + 1, mw + 1)`` float64 summed-area table of the mask (first row and column 0).
        OpenCV's: 5 ms for 3.6 Mpx where two NumPy cumsums took 66 ms (on the slide's serial
        planning path, before its first batch)."""
        if self._integral is None:
            import cv2

            mh, mw = self.mask.shape
            if mh == 0 or mw == 0:
                self._integral = np.zeros((mh + 1, mw + 1), np.float64)
            else:
                mask = np.ascontiguousarray(self.mask).view(np.uint8)
                self._integral = cv2.integral(mask, sdepth=cv2.CV_64F)
        return self._integral

    def _area_upto(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Tissue area (mask px²) of ``[0, u) × [0, v)`` in mask coordinates, fractional u, v.

        The integral image of a piecewise-constant mask is bilinear inside each cell, so its
        bilinear interpolation is exact.
        """
        ii = self._integral_image()
        mh, mw = self.mask.shape
        u = np.clip(u, 0, mw)
        v = np.clip(v, 0, mh)
        j = np.minimum(np.floor(u).astype(np.int64), mw - 1)
        i = np.minimum(np.floor(v).astype(np.int64), mh - 1)
        fu, fv = u - j, v - i
        a = ii[i, j] * (1 - fu) + ii[i, j + 1] * fu
        b = ii[i + 1, j] * (1 - fu) + ii[i + 1, j + 1] * fu
        return a * (1 - fv) + b * fv

    def tissue_fractions(self, rects: np.ndarray) -> np.ndarray:
        """Fraction of each level-0 rectangle covered by tissue.

        ``rects``: (N, 4) ``(x, y, w, h)`` level-0 px. Returns (N,) float64 in [0, 1]: tissue
        area (from the mask, exact for its pixels, fractional pixels included) divided by the
        rectangle's area; the parts of a rectangle outside the bbox count as non-tissue.
        """
        r = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        bx, by, bw, bh = self.bbox
        d = self.mask_downsample
        x0 = np.clip(r[:, 0], bx, bx + bw)
        y0 = np.clip(r[:, 1], by, by + bh)
        x1 = np.clip(r[:, 0] + r[:, 2], bx, bx + bw)
        y1 = np.clip(r[:, 1] + r[:, 3], by, by + bh)
        u0, u1 = (x0 - bx) / d, (x1 - bx) / d
        v0, v1 = (y0 - by) / d, (y1 - by) / d
        area = (
            self._area_upto(u1, v1)
            - self._area_upto(u0, v1)
            - self._area_upto(u1, v0)
            + self._area_upto(u0, v0)
        ) * (d * d)
        full = r[:, 2] * r[:, 3]
        out = np.where(full > 0, area / np.where(full > 0, full, 1), 0.0)
        return np.clip(out, 0.0, 1.0)

    def tissue_fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction of the level-0 rectangle ``(x, y, w, h)`` covered by tissue (see above)."""
        return float(self.tissue_fractions(np.array([[x, y, w, h]], np.float64))[0])

    def contains(self, x, y):
        """Whether level-0 point(s) ``(x, y)`` fall on tissue (bool, or a bool array)."""
        xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
        bx, by, bw, bh = self.bbox
        d = self.mask_downsample
        inside = (xa >= bx) & (xa < bx + bw) & (ya >= by) & (ya < by + bh)
        j = np.clip(np.floor((xa - bx) / d).astype(np.int64), 0, self.mask.shape[1] - 1)
        i = np.clip(np.floor((ya - by) / d).astype(np.int64), 0, self.mask.shape[0] - 1)
        res = inside & self.mask[i, j]
        return bool(res) if res.ndim == 0 else res


# ----------------------------------------------------------------------------------------------
def reading_order(bboxes: Sequence[Sequence[float]], row_overlap: float = 0.5) -> list[int]:
    """Indices of ``bboxes`` ``(x, y, w, h)`` in reading order.

    Boxes are visited by top edge (ties: left edge). Each joins the first existing row whose
    *anchor* (the row's first, i.e. top-most, box) overlaps it vertically by at least
    ``row_overlap`` × the smaller of the two heights; otherwise it starts a new row. Rows come
    in the order they were started (top to bottom); within a row, boxes go left to right (ties:
    top). So two sections side by side stay in one row even when the right one starts a bit
    higher, and the order does not depend on the order of the input.
    """
    n = len(bboxes)
    b = [tuple(float(v) for v in bb) for bb in bboxes]
    order = sorted(range(n), key=lambda i: (b[i][1], b[i][0], b[i][3], b[i][2], i))
    rows: list[list[int]] = []
    for i in order:
        _, y, _, h = b[i]
        for row in rows:
            _, ay, _, ah = b[row[0]]
            ov = min(ay + ah, y + h) - max(ay, y)
            if ov >= row_overlap * min(ah, h) and ov > 0:
                row.append(i)
                break
        else:
            rows.append([i])
    out: list[int] = []
    for row in rows:
        out.extend(sorted(row, key=lambda i: (b[i][0], b[i][1], i)))
    return out


def tissue_feature(rgb: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel tissue evidence, uint8 ``(h, w)``, from an RGB uint8 ``(h, w, 3)`` image.

    The feature is the *chroma of the light absorbed relative to the glass*:
    ``max_c(bg_c - p_c) - min_c(bg_c - p_c)`` with ``bg`` the glass colour. Why this channel:

    - stained tissue absorbs colour-selectively (eosin takes green, haematoxylin red and green),
      so even pale pink stroma gives a clear signal (~25–60), while glass gives ~0 plus noise;
    - dust, dirt, air bubbles and black/grey pen marks absorb all channels about equally, so
      they give ~0 however dark they are — unlike ``255 - min(RGB)`` or grey-level thresholds;
    - HSV saturation ``(max - min) / max`` is similar but explodes for dark pixels (noise over a
      small max), making black specks "saturated"; a plain difference does not;
    - subtracting the glass colour removes a tinted background (yellowish or bluish glass,
      scanner white balance), which plain chroma would read as weak tissue everywhere.

    Coloured pen marks (blue, green) are stained, so they do read as tissue; they are usually
    thin and are dropped by the minimum area, or split off as their own section.
    """
    bg = estimate_background(rgb) if background is None else np.asarray(background)
    bg = np.rint(bg).astype(np.int16)
    # per-channel planes: numpy reductions over a length-3 last axis are slow
    d = [bg[c] - rgb[:, :, c].astype(np.int16) for c in range(3)]
    hi = np.maximum(np.maximum(d[0], d[1]), d[2])
    lo = np.minimum(np.minimum(d[0], d[1]), d[2])
    hi -= lo
    return np.minimum(hi, 255).astype(np.uint8)


def estimate_background(rgb: np.ndarray) -> np.ndarray:
    """Glass colour (3,) float64 of an RGB uint8 image.

    Glass is bright and nearly grey (a tint of up to ~30 levels between channels is allowed:
    yellowish or bluish glass, scanner white balance), and it is the brightest such thing on a
    slide: the estimate is the per-channel median of the brightest quarter of those pixels.
    Falls back to white when fewer than 0.5 % of the pixels qualify (a slide covered by tissue).
    """
    px = rgb.reshape(-1, 3)
    if len(px) > 1_000_000:  # a regular subsample is plenty for a median
        px = px[:: len(px) // 1_000_000]
    r, g, b = (px[:, c].astype(np.int16) for c in range(3))
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    cand = px[(mx - mn <= 30) & (mn >= 170)]
    if len(cand) < max(1, 0.005 * len(px)):
        return np.array([255.0, 255.0, 255.0])
    grey = cand.astype(np.int32).sum(1)
    bright = cand[grey >= np.percentile(grey, 75)]
    return np.median(bright, axis=0).astype(np.float64)


def _resolve(value, um, px_default, mpp, name, power=1):
    """A length (power 1) or area (power 2) in level-0 px: explicit px, else µm via mpp."""
    if value is not None:
        if value < 0:
            raise TilingError(f"{name} must be >= 0, got {value}")
        return float(value)
    if um is not None and mpp:
        return um / mpp**power
    return px_default


def find_sections(
    slide: Slide,
    *,
    max_size: int = TISSUE_THUMBNAIL,
    min_area_um2: float | None = None,
    min_area_px: float | None = None,
    threshold: float | None = None,
    min_contrast: float = DEFAULT_MIN_CONTRAST,
    pad: float | None = None,
    merge_distance: float | None = None,
    backend: str = "cv2",
    thumbnail: np.ndarray | None = None,
    steps: dict | None = None,
) -> list[Section]:
    """Tissue sections of ``slide``, in reading order (:func:`reading_order`); [] for a blank slide.

    Steps, on ``slide.thumbnail(max_size)`` (RGB, longer side ≤ ``max_size``):

    1. :func:`tissue_feature` (colour absorbed relative to the glass; see there why), median
       blurred (5 px) against speckle;
    2. threshold: ``threshold`` if given (feature units 0–255), else Otsu's on the square root
       of the feature (so a broad, partly pale tissue class does not drag the split into the
       tissue), but never below ``min_contrast`` — on an all-glass slide Otsu would split the
       noise, this finds nothing;
    3. morphology on the binary mask: closing then opening (5×5 thumbnail px), holes filled;
    4. connected components (8-connectivity); components closer than ``merge_distance``
       (level-0 px; default 50 µm, or 100 px without mpp) are merged into one section;
    5. sections with less tissue than the minimum area are dropped: ``min_area_px`` (level-0
       px²) if given, else ``min_area_um2`` (default 20 000 µm² = 0.02 mm²) when ``slide.mpp``
       is known, else 80 000 px²;
    6. bbox padded by ``pad`` level-0 px (default 25 µm, or 50 px without mpp, and at least two
       thumbnail pixels) and clipped to the slide; the mask is dilated by the same amount.

    ``backend`` runs steps 1–4: "cv2" (OpenCV on the CPU, the reference), "cupy" (CuPy and
    cupyx.scipy.ndimage on the current CUDA device) or "numpy" (that same code on the CPU, for
    testing); see :mod:`trtwsi.plan.tissue_nd` for how they may differ. Steps 5–6 run on the
    host. ``thumbnail``: ``slide.thumbnail(max_size)`` when the caller has already read it
    (e.g. through a reader pool); its size is checked. ``steps``: a dict to add each step's
    seconds to (a profile; the "numpy" and "cupy" backends: see
    :func:`~trtwsi.plan.tissue_nd.components`), steps 5–6 as ``"sections"``, of which
    :func:`~trtwsi.plan.tissue_nd.group_crop`'s parts (summed over the sections) as
    ``"crop_*"``.

    Raises :class:`~trtwsi.errors.TilingError` for a negative size or ``min_area_um2`` without
    a known mpp.
    """
    import cv2

    if backend not in ("cv2", "numpy", "cupy"):
        raise TilingError(f"backend must be 'cv2', 'numpy' or 'cupy', got {backend!r}")
    if max_size < 16:
        raise TilingError(f"max_size must be >= 16 thumbnail px, got {max_size}")
    mpp = slide.mpp
    if min_area_um2 is not None and min_area_px is None and not mpp:
        raise TilingError(
            f"min_area_um2={min_area_um2} needs the slide's mpp, which is unknown; pass "
            "min_area_px instead, or open the slide with mpp=..."
        )
    W, H = slide.width, slide.height
    if thumbnail is None:
        thumb = slide.thumbnail(max_size)
    else:
        thumb = thumbnail
        tw, th = slide.thumbnail_size(max_size)
        want = (th, tw, 3)
        if thumb.shape != want or thumb.dtype != np.uint8:
            raise TilingError(
                f"thumbnail must be slide.thumbnail({max_size}): uint8 {want}, "
                f"got {thumb.dtype} {thumb.shape}"
            )
    th, tw = thumb.shape[:2]
    dsx, dsy = W / tw, H / th
    ds = max(dsx, dsy)

    min_area = _resolve(
        min_area_px,
        min_area_um2 if min_area_um2 is not None else DEFAULT_MIN_AREA_UM2,
        DEFAULT_MIN_AREA_PX,
        mpp,
        "min_area_px",
        power=2,
    )
    merge = _resolve(merge_distance, DEFAULT_MERGE_UM, DEFAULT_MERGE_PX, mpp, "merge_distance")
    pad_px = _resolve(pad, DEFAULT_PAD_UM, DEFAULT_PAD_PX, mpp, "pad")
    if pad is None:
        pad_px = max(pad_px, 2 * ds)

    r = merge / 2 / ds  # merge radius, thumbnail px
    if backend == "cv2":
        parts = _components_cv2(thumb, threshold, min_contrast, r)
    else:
        from trtwsi.plan.tissue_nd import components

        parts = components(
            thumb, threshold=threshold, min_contrast=min_contrast, merge_radius=r,
            backend=backend, steps=steps,
        )  # fmt: skip
    if parts is None:
        return []
    t_sections = time.perf_counter()
    labels, stats, group_of = parts

    pad_t = pad_px / ds  # pad in thumbnail px
    found = []
    for g in np.unique(group_of[1:]):
        comps = np.nonzero(group_of == g)[0]
        area = float(stats[comps, cv2.CC_STAT_AREA].sum()) * dsx * dsy
        if area < min_area:
            continue
        tx0 = int(stats[comps, cv2.CC_STAT_LEFT].min())
        ty0 = int(stats[comps, cv2.CC_STAT_TOP].min())
        tx1 = int((stats[comps, cv2.CC_STAT_LEFT] + stats[comps, cv2.CC_STAT_WIDTH]).max())
        ty1 = int((stats[comps, cv2.CC_STAT_TOP] + stats[comps, cv2.CC_STAT_HEIGHT]).max())
        x0 = max(0, math.floor(tx0 * dsx - pad_px))
        y0 = max(0, math.floor(ty0 * dsy - pad_px))
        x1 = min(W, math.ceil(tx1 * dsx + pad_px))
        y1 = min(H, math.ceil(ty1 * dsy + pad_px))
        # the group's mask in a thumbnail crop with room for the dilation
        m = math.ceil(pad_t) + 2
        cx0, cy0 = max(0, tx0 - m), max(0, ty0 - m)
        cx1, cy1 = min(tw, tx1 + m), min(th, ty1 + m)
        if backend == "cv2":
            crop = np.isin(labels[cy0:cy1, cx0:cx1], comps)
            if pad_t > 0:
                d = cv2.distanceTransform((~crop).astype(np.uint8), cv2.DIST_L2, 5)
                crop = d <= pad_t
        else:  # where the labels are (the device for "cupy")
            from trtwsi.plan.tissue_nd import group_crop

            crop = group_crop(labels, comps, (cx0, cy0, cx1, cy1), pad_t, steps=steps)
        # resample onto the section grid (nearest: mask px centre -> thumbnail px)
        mw, mh = math.ceil((x1 - x0) / ds), math.ceil((y1 - y0) / ds)
        jj = np.floor((x0 + (np.arange(mw) + 0.5) * ds) / dsx).astype(np.int64) - cx0
        ii = np.floor((y0 + (np.arange(mh) + 0.5) * ds) / dsy).astype(np.int64) - cy0
        smask = resample_rows_cols(crop, ii, jj)
        found.append(((x0, y0, x1 - x0, y1 - y0), smask, round(area)))

    order = reading_order([f[0] for f in found])
    if steps is not None:
        steps["sections"] = steps.get("sections", 0.0) + time.perf_counter() - t_sections
    return [
        Section(index=k, bbox=found[i][0], mask=found[i][1], mask_downsample=ds, area=found[i][2])
        for k, i in enumerate(order)
    ]


def _components_cv2(thumb: np.ndarray, threshold, min_contrast: float, r: float):
    """Steps 1-4 of :func:`find_sections` with OpenCV (the reference implementation):
    a :class:`~trtwsi.plan.tissue_nd.Components` of host arrays, or None without tissue."""
    import cv2

    from trtwsi.plan.tissue_nd import Components

    th, tw = thumb.shape[:2]
    feat = cv2.medianBlur(tissue_feature(thumb), 5) if min(th, tw) >= 5 else tissue_feature(thumb)
    if threshold is None:
        # Otsu on √feature: glass is a narrow peak near 0, tissue a broad one whose spread grows
        # with the stain; on the raw feature Otsu's split lands inside pale tissue, on the square
        # root (variance-stabilised) it lands in the gap between the two
        root = _SQRT_LUT[feat]
        otsu, _ = cv2.threshold(root, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        t = max((float(otsu) / 255.0) ** 2 * 255.0, float(min_contrast))
    else:
        t = float(threshold)
    mask = (feat > t).astype(np.uint8)
    if not mask.any():
        return None
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, k)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, k)
    mask = _fill_holes(mask)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    # merge components closer than 2r: grow by r (Euclidean, via a distance transform),
    # components that fall in one grown blob form one section
    if r > 0:
        dist = cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, 5)
        _, grown = cv2.connectedComponents((dist <= r).astype(np.uint8), connectivity=8)
        fg = labels > 0
        group_of = np.zeros(n, np.int64)
        group_of[labels[fg]] = grown[fg]
    else:
        group_of = np.arange(n, dtype=np.int64)
    group_of[0] = -1
    return Components(labels, stats.astype(np.int64), group_of)


def resample_rows_cols(src: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """``out[r, c] = src[ii[r], jj[c]]`` where both indices fall inside ``src``, else False:
    bool ``(len(ii), len(jj))``. ``ii`` and ``jj`` (int64) must be non-decreasing (a nearest
    resampling's source rows and columns), so the rows and columns that fall inside are one
    run each and two 1-D takes fill them: OpenCV's section assembly of the 1 Gpx bench slide
    took 8.6–10.7 ms instead of 17.7–21.0 ms with ``np.ix_`` fancy indexing
    (``bench/results/tissue-amd-epyc-2c-resample.json``)."""
    out = np.zeros((len(ii), len(jj)), dtype=bool)
    rows = np.flatnonzero((ii >= 0) & (ii < src.shape[0]))
    cols = np.flatnonzero((jj >= 0) & (jj < src.shape[1]))
    if rows.size and cols.size:
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        out[r0:r1, c0:c1] = src.take(ii[r0:r1], axis=0).take(jj[c0:c1], axis=1)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """uint8 0/1 mask with every background region not connected to the border filled."""
    import cv2

    h, w = mask.shape
    pad = np.zeros((h + 2, w + 2), np.uint8)
    pad[1:-1, 1:-1] = mask
    ff = np.zeros((h + 4, w + 4), np.uint8)
    cv2.floodFill(pad, ff, (0, 0), 1, flags=4)  # outside (4-connected, like 8-connected fg)
    outside = ff[2:-2, 2:-2].astype(bool)
    return (~outside).astype(np.uint8)


def full_slide_section(slide: Slide) -> Section:
    """The whole slide as one section (index 0) with an all-True mask: no tissue detection."""
    W, H = slide.width, slide.height
    d = max(1.0, max(W, H) / 1024)
    mask = np.ones((math.ceil(H / d), math.ceil(W / d)), bool)
    return Section(index=0, bbox=(0, 0, W, H), mask=mask, mask_downsample=d, area=W * H)
