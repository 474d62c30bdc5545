"""Deterministic synthetic whole-slide images with ground truth.

A :class:`Scene` is a virtual brightfield slide: white glass, a few separated irregular tissue
sections (light pink/violet, textured) and, only inside tissue, two kinds of objects:

- class 0 ``nucleus``: round/oval dark purple interphase nuclei, ~20–40 px across at 0.5 µm/px
  (sizes are physical: they scale with ``0.5 / mpp``), textured, barely overlapping;
- class 1 ``metaphase``: a spread of 46 small dark randomly oriented rods inside a disc of
  ~60–120 px diameter at 0.5 µm/px.

Everything is a pure function of ``(width, height, seed, parameters)``. Pixels are rendered on
demand, region by region (:meth:`Scene.render`), and a pixel's value depends only on its level-0
position, never on the region it was rendered in, so a slide rendered tile by tile equals the same
slide rendered whole (bit for bit). That is what makes gigapixel slides cheap to generate: noise
comes from periodic textures indexed by absolute position, tissue from a coarse lattice field
upsampled with OpenCV's bit-exact bilinear resize, and each object is drawn into a small sprite
anchored at its own bounding box, found through a grid index so a region draws only the objects
that touch it. Arithmetic is plain numpy (no fused multiply-add), so results do not depend on
how SIMD loops split a row.

:func:`make_slide` writes a scene as a pyramidal, tiled, JPEG-compressed TIFF (generic pyramidal
TIFF with SubIFDs, or Aperio-SVS-like) without ever holding level 0 in memory, plus a ground-truth
sidecar ``<stem>.gt.json``; :func:`make_array` renders a small scene into memory.

Coordinates: all boxes and regions are in **level-0 pixels**, continuous coordinates where pixel
``(i, j)`` (row, column) covers ``[j, j+1) × [i, i+1)``. Boxes are ``(x1, y1, x2, y2, class_id)``
float32.

This module is over 500 lines on purpose: :class:`Scene` is one rendering algorithm (layout of
sections and objects, the object index, block rendering, sprites) whose parts share private state;
ground truth (``truth.py``), textures (``_texture.py``) and file writers (``writer.py``) live apart.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import cv2
import numpy as np

from trtwsi.synthetic._texture import GLASS_RGB, _glass_u8, _textures
from trtwsi.synthetic.truth import GroundTruth

CLASS_NAMES = ["nucleus", "metaphase"]

#: Tissue colour model: colour = glass - a_pink * PINK - a_violet * VIOLET (per channel),
#: a_* in [0, 1] from the stain fields, the tissue texture and the tissue edge.
PINK = np.array([16.0, 78.0, 40.0], np.float32)
VIOLET = np.array([50.0, 66.0, 18.0], np.float32)
#: Colour of a fully dense nucleus/chromosome on glass; objects multiply the background by
#: ``1 - density * (1 - NUCLEUS_RGB / GLASS_RGB)`` (a transmission, like a stain absorbing light).
NUCLEUS_RGB = np.array([62.0, 36.0, 104.0], np.float32)

#: Default object densities, per mm² of tissue.
NUCLEUS_DENSITY = 500.0
METAPHASE_DENSITY = 10.0

_INDEX_CELL = 256  # grid cell (level-0 px) of the object index
_BLOCK = (1024, 256)  # render() works in blocks of at most this (w, h): arrays stay in cache
#: Bytes of object sprites kept per Scene (objects straddling block borders are drawn once).
SPRITE_CACHE_BYTES = 16 << 20

#: Nucleus density as a function of the distance d (px) inside its outline, tabulated at 1/16 px
#: from d = -_PROFILE_ZERO/16: anti-aliased edge (0.5 at d = 0) plus a darker rim ~1.2 px in.
_PROFILE_ZERO = 64
_d = (np.arange(256, dtype=np.float64) - _PROFILE_ZERO + 0.5) / 16
_NUC_PROFILE = (
    0.8 * np.clip(_d + 0.5, 0, 1) + 0.2 * np.clip(1 - np.abs(_d - 1.2) / 1.2, 0, 1)
).astype(np.float32)
del _d


# ----------------------------------------------------------------------------------------------
# the scene
# ----------------------------------------------------------------------------------------------
class Scene:
    """A deterministic virtual slide of ``width × height`` level-0 px at ``mpp`` µm/px.

    Parameters: ``seed`` (everything derives from it), ``n_sections`` tissue sections (0 gives
    a blank slide of glass), ``nucleus_density`` / ``metaphase_density`` (objects per mm² of
    tissue; the counts are rounded expectations, fewer when the tissue is too crowded),
    ``extra_objects``: a sequence of ``(cx, cy, class_id)`` placed exactly there (level-0 px,
    even on glass; generated objects whose boxes would touch an extra object are removed), used
    to put objects across tile seams in tests.

    Attributes: ``boxes`` (N, 5) float32 ``(x1, y1, x2, y2, class_id)`` level-0 px;
    ``class_names``; ``section_bboxes`` list of ``(x, y, w, h)`` level-0 px, in reading order
    (:func:`trtwsi.plan.tissue.reading_order`); ``lattice`` (level-0 px per cell of the tissue field).
    """

    class_names = CLASS_NAMES

    def __init__(
        self,
        width: int,
        height: int,
        seed: int = 0,
        n_sections: int = 3,
        mpp: float = 0.5,
        nucleus_density: float = NUCLEUS_DENSITY,
        metaphase_density: float = METAPHASE_DENSITY,
        extra_objects: Sequence[tuple[float, float, int]] | None = None,
    ):
        if int(width) <= 0 or int(height) <= 0:
            raise ValueError(f"scene size must be positive, got {width}x{height}")
        if not mpp or mpp <= 0:
            raise ValueError(f"mpp must be a positive number of µm per px, got {mpp!r}")
        if n_sections < 0:
            raise ValueError(f"n_sections must be >= 0, got {n_sections}")
        self.width, self.height = int(width), int(height)
        self.seed = int(seed)
        self.n_sections = int(n_sections)
        self.mpp = float(mpp)
        self.nucleus_density = float(nucleus_density)
        self.metaphase_density = float(metaphase_density)
        self.extra_objects = [(float(a), float(b), int(c)) for a, b, c in (extra_objects or [])]
        for _, _, c in self.extra_objects:
            if c not in (0, 1):
                raise ValueError(f"extra object class_id must be 0 or 1, got {c}")
        self._f = 0.5 / self.mpp  # object size factor (sizes are given at 0.5 µm/px)
        # tissue field lattice: 8 px cells, coarser for huge slides (field memory ≤ ~3×64 Mpx)
        s = 8
        while (self.width / s) * (self.height / s) > 64e6:
            s *= 2
        self.lattice = s
        self._tex = _textures(self.seed)
        rng = np.random.default_rng([self.seed, 0x5EC7])
        self._build_sections(rng)
        self._build_objects(np.random.default_rng([self.seed, 0x0B1E]))
        self._build_index()
        self._sprite = _SpriteCache(self._make_sprite, SPRITE_CACHE_BYTES)

    # --- construction ------------------------------------------------------------------------
    def _build_sections(self, rng: np.random.Generator) -> None:
        W, H, S, n = self.width, self.height, self.lattice, self.n_sections
        wl, hl = math.ceil(W / S) + 1, math.ceil(H / S) + 1
        lab = np.zeros((hl, wl), np.uint8)
        pink = np.zeros((hl, wl), np.float32)
        violet = np.zeros((hl, wl), np.float32)
        polys, cells = [], []
        if n > 0:
            cols = max(1, min(n, round(math.sqrt(n * W / H))))
            rows = math.ceil(n / cols)
            cw, ch = W / cols, H / rows
            for k in range(n):
                r, c = divmod(k, cols)
                in_row = min(cols, n - r * cols)
                c0 = c + (cols - in_row) / 2  # centre a short last row
                cx = (c0 + 0.5 + rng.uniform(-0.025, 0.025)) * cw
                cy = (r + 0.5 + rng.uniform(-0.025, 0.025)) * ch
                rx, ry = 0.30 * cw, 0.30 * ch
                rx, ry = min(rx, 1.6 * ry), min(ry, 1.6 * rx)
                theta = np.linspace(0, 2 * np.pi, 720, endpoint=False)
                ks = np.arange(2, 8)
                amp = rng.uniform(0, 1, len(ks)) / ks**0.7
                amp *= 0.25 / amp.sum()
                phase = rng.uniform(0, 2 * np.pi, len(ks))
                rad = 1 + (amp[:, None] * np.cos(ks[:, None] * theta + phase[:, None])).sum(0)
                px = cx + rx * rad * np.cos(theta)
                py = cy + ry * rad * np.sin(theta)
                polys.append(np.stack([px, py], 1))
                cells.append((c0 * cw, r * ch, cw, ch, cx, cy, rx, ry))
        # reading order (same rule as tissue.find_sections) so GT section i = found section i
        from trtwsi.plan.tissue import reading_order

        bbs = [_poly_bbox(p, W, H) for p in polys]
        order = reading_order(bbs)
        polys = [polys[i] for i in order]
        cells = [cells[i] for i in order]
        self.section_bboxes: list[tuple[int, int, int, int]] = [bbs[i] for i in order]
        self._section_polys = polys
        for k, (poly, cell) in enumerate(zip(polys, cells, strict=True)):
            pts = np.round((poly / S - 0.5) * 16).astype(np.int32)
            cv2.fillPoly(lab, [pts], k + 1, lineType=cv2.LINE_8, shift=4)
            x0, y0, cw, ch, cx, cy, rx, ry = cell
            # lumens: small holes of glass inside the section
            for _ in range(int(rng.integers(0, 4))):
                ang, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55)
                lx, ly = cx + rr * rx * np.cos(ang), cy + rr * ry * np.sin(ang)
                la = rng.uniform(0.03, 0.08) * min(rx, ry)
                lb = la * rng.uniform(0.5, 1.0)
                cv2.ellipse(
                    lab,
                    (round((lx / S - 0.5) * 16), round((ly / S - 0.5) * 16)),
                    (max(1, round(la / S * 16)), max(1, round(lb / S * 16))),
                    float(rng.uniform(0, 180)),
                    0,
                    360,
                    0,
                    -1,
                    cv2.LINE_8,
                    4,
                )
            # per-section stain strengths, on the section's cell so blurred edges get them too
            sl = (
                slice(max(0, int(y0 / S)), int((y0 + ch) / S) + 2),
                slice(max(0, int(x0 / S)), int((x0 + cw) / S) + 2),
            )
            pink[sl] = rng.uniform(0.35, 0.7)
            violet[sl] = rng.uniform(0.05, 0.4)
        # smooth stain variations: low-res noise upsampled to the lattice
        lw, lh = max(2, math.ceil(wl / 8)), max(2, math.ceil(hl / 8))
        # (clipped so that no patch of tissue ends up unstained, i.e. invisible)
        for arr, amp, lo in ((pink, 0.18, 0.28), (violet, 0.15, 0.02)):
            nz = rng.standard_normal((lh, lw), dtype=np.float32)
            nz = cv2.GaussianBlur(nz, (0, 0), 1.5)
            nz /= max(float(nz.std()), 1e-6)
            arr += amp * cv2.resize(nz, (wl, hl), interpolation=cv2.INTER_CUBIC)
            np.clip(arr, lo, 0.95, out=arr)
        tissue = cv2.GaussianBlur((lab > 0).astype(np.float32) * 255, (0, 0), 1.0)
        self._field = np.ascontiguousarray(
            np.stack(
                [
                    np.clip(np.rint(tissue), 0, 255).astype(np.uint8),
                    np.clip(np.rint(pink * 255), 0, 255).astype(np.uint8),
                    np.clip(np.rint(violet * 255), 0, 255).astype(np.uint8),
                ],
                -1,
            )
        )
        self._labels = lab
        inside = (self._field[:, :, 0] >= 128).astype(np.uint8)
        self._dist = cv2.distanceTransform(inside, cv2.DIST_L2, 5)  # lattice cells to glass
        # ground-truth tissue area per section (level-0 px²)
        self.section_areas = [
            float(((lab == k + 1) & (inside > 0)).sum()) * S * S for k in range(len(polys))
        ]

    def _nucleus_params(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, 4) semi-axes a, b (level-0 px), angle (deg), darkness."""
        f = self._f
        a = rng.uniform(10.0, 19.0, n) * f
        b = a * rng.uniform(0.62, 0.95, n)
        ang = rng.uniform(0, 180, n)
        dark = rng.uniform(0.55, 0.9, n)
        return np.stack([a, b, ang, dark], 1)

    def _metaphase_rods(self, rng: np.random.Generator, radius: float) -> np.ndarray:
        """(46, 5) rods relative to the spread centre: x1, y1, x2, y2, thickness (level-0 px).

        Rod centres are dart-thrown in the disc at a minimum spacing of ~0.8 × the mean spacing
        of 46 points in it, so chromosomes are spread apart like in a real preparation; rod
        lengths are 0.45–1 × that spacing, so a few touch or cross.
        """
        f, n = self._f, 46
        spacing = math.sqrt(math.pi * radius * radius / n)
        thick = np.maximum(1.0, np.rint(rng.uniform(1.8, 2.8, n) * f))  # as drawn: whole px
        length = rng.uniform(0.45, 1.0, n) * spacing
        room = max(radius - 0.6 * spacing - 2.0 * f, 1.0)
        m = 6 * n
        r = room * np.sqrt(rng.uniform(0, 1, m))
        phi = rng.uniform(0, 2 * np.pi, m)
        cand = np.stack([r * np.cos(phi), r * np.sin(phi)], 1)
        dx = np.subtract.outer(cand[:, 0], cand[:, 0])
        dy = np.subtract.outer(cand[:, 1], cand[:, 1])
        close = dx * dx + dy * dy < (0.8 * spacing) ** 2
        blocked = np.zeros(m, bool)
        chosen: list[int] = []
        for i in range(m):
            if not blocked[i]:
                chosen.append(i)
                if len(chosen) == n:
                    break
                blocked |= close[i]
        if len(chosen) < n:  # crowded: fill up with the remaining candidates, in order
            taken = np.zeros(m, bool)
            taken[chosen] = True
            chosen += np.flatnonzero(~taken)[: n - len(chosen)].tolist()
        mx, my = cand[chosen, 0], cand[chosen, 1]
        ang = rng.uniform(0, np.pi, n)
        dx, dy = length / 2 * np.cos(ang), length / 2 * np.sin(ang)
        return np.stack([mx - dx, my - dy, mx + dx, my + dy, thick], 1)

    def _candidates(self, rng: np.random.Generator, k: int, m: int) -> np.ndarray:
        """(m, 2) uniform candidate centres (level-0 px) inside section ``k``'s bbox."""
        x, y, w, h = self.section_bboxes[k]
        return np.stack([rng.uniform(x, x + w, m), rng.uniform(y, y + h, m)], 1)

    def _inside(self, pts: np.ndarray, k: int, margin: np.ndarray) -> np.ndarray:
        """Bool (m,): point in section ``k`` with at least ``margin`` level-0 px of tissue around."""
        S = self.lattice
        j = np.clip((pts[:, 0] / S).astype(np.int64), 0, self._labels.shape[1] - 1)
        i = np.clip((pts[:, 1] / S).astype(np.int64), 0, self._labels.shape[0] - 1)
        # distance from the lattice cell centre to glass, minus the cell's half diagonal
        d = (self._dist[i, j] - 0.75) * S
        return (self._labels[i, j] == k + 1) & (d >= margin)

    def _build_objects(self, rng: np.random.Generator) -> None:
        from scipy.spatial import cKDTree

        f = self._f
        mm2 = (self.mpp / 1000.0) ** 2  # mm² per level-0 px²
        # keep whole boxes (corners ≤ 1.5 radii from the centre) off the blurred, ragged edge
        edge = 2 * self.lattice + 3 * f
        centers, classes, params, rods = [], [], [], []
        for k in range(len(self.section_bboxes)):
            area_mm2 = self.section_areas[k] * mm2
            # metaphases first (larger), then nuclei in the remaining room
            n_m = round(self.metaphase_density * area_mm2)
            m_rad = rng.uniform(30.0, 58.0, max(4 * n_m, 1)) * f
            cand = self._candidates(rng, k, len(m_rad))
            ok = self._inside(cand, k, 1.5 * m_rad + edge)
            keep = _poisson_keep(cand, m_rad * 1.1 + 6 * f, ok)[:n_m]
            m_c, m_rad = cand[keep], m_rad[keep]
            n_n = round(self.nucleus_density * area_mm2)
            npar = self._nucleus_params(rng, max(3 * n_n, 1))
            cand = self._candidates(rng, k, len(npar))
            ok = self._inside(cand, k, 1.5 * npar[:, 0] + edge)
            if len(m_c):
                tree = cKDTree(m_c)
                dist, idx = tree.query(cand, k=1)
                ok &= dist >= m_rad[idx] + npar[:, 0] + 4 * f
            keep = _poisson_keep(cand, npar[:, 0] * 0.85, ok)[:n_n]
            for c, rad in zip(m_c, m_rad, strict=True):
                centers.append(c)
                classes.append(1)
                params.append((rad, 0, 0, rng.uniform(0.85, 1.0)))
                rods.append(self._metaphase_rods(rng, rad))
            for c, p in zip(cand[keep], npar[keep], strict=True):
                centers.append(c)
                classes.append(0)
                params.append(tuple(p))
                rods.append(None)
        # extra objects, exactly where asked
        extra_boxes = []
        for i, (cx, cy, cls) in enumerate(self.extra_objects):
            erng = np.random.default_rng([self.seed, 0xE7, i])
            if cls == 0:
                p = self._nucleus_params(erng, 1)[0]
                rods.append(None)
            else:
                rad = erng.uniform(30.0, 58.0) * f
                p = (rad, 0, 0, erng.uniform(0.85, 1.0))
                rods.append(self._metaphase_rods(erng, rad))
            centers.append(np.array([cx, cy]))
            classes.append(cls)
            params.append(tuple(p))
        self._centers = np.array(centers, np.float64).reshape(-1, 2)
        self._classes = np.array(classes, np.int64)
        self._params = np.array(params, np.float64).reshape(-1, 4)
        self._rods = rods
        boxes = np.zeros((len(centers), 5), np.float32)
        for i in range(len(centers)):
            boxes[i, :4] = self._object_box(i)
            boxes[i, 4] = self._classes[i]
        n_extra = len(self.extra_objects)
        if n_extra:
            extra_boxes = boxes[-n_extra:, :4]
            gen = boxes[:-n_extra, :4]
            m = 4 * f
            hit = (
                (gen[:, None, 0] < extra_boxes[None, :, 2] + m)
                & (gen[:, None, 2] > extra_boxes[None, :, 0] - m)
                & (gen[:, None, 1] < extra_boxes[None, :, 3] + m)
                & (gen[:, None, 3] > extra_boxes[None, :, 1] - m)
            ).any(1)
            keep = np.concatenate([~hit, np.ones(n_extra, bool)])
            self._centers = self._centers[keep]
            self._classes = self._classes[keep]
            self._params = self._params[keep]
            self._rods = [r for r, kp in zip(self._rods, keep, strict=True) if kp]
            boxes = boxes[keep]
        self.boxes: np.ndarray = boxes

    def _object_box(self, i: int) -> tuple[float, float, float, float]:
        cx, cy = self._centers[i]
        if self._classes[i] == 0:
            a, b, ang, _ = self._params[i]
            t = math.radians(ang)
            ex = math.hypot(a * math.cos(t), b * math.sin(t))
            ey = math.hypot(a * math.sin(t), b * math.cos(t))
            return (cx - ex, cy - ey, cx + ex, cy + ey)
        r = self._rods[i]
        half = r[:, 4] / 2 + 0.75  # cv2's anti-aliased thick lines reach ~0.75 px further
        xs = np.concatenate([r[:, 0] - half, r[:, 2] - half, r[:, 0] + half, r[:, 2] + half])
        ys = np.concatenate([r[:, 1] - half, r[:, 3] - half, r[:, 1] + half, r[:, 3] + half])
        return (cx + xs.min(), cy + ys.min(), cx + xs.max(), cy + ys.max())

    def _build_index(self) -> None:
        """CSR grid index: cell id -> objects whose sprite touches the cell."""
        b = self.boxes
        sx0 = np.floor(b[:, 0]).astype(np.int64) - 2
        sy0 = np.floor(b[:, 1]).astype(np.int64) - 2
        sx1 = np.ceil(b[:, 2]).astype(np.int64) + 2
        sy1 = np.ceil(b[:, 3]).astype(np.int64) + 2
        self._sprite_box = np.stack([sx0, sy0, sx1, sy1], 1)  # [x0, x1) × [y0, y1)
        C = _INDEX_CELL
        self._ncx = math.ceil(self.width / C) + 2  # one extra cell each side for objects at edges
        self._ncy = math.ceil(self.height / C) + 2
        cx0 = np.clip(sx0 // C + 1, 0, self._ncx - 1)
        cx1 = np.clip((sx1 - 1) // C + 1, 0, self._ncx - 1)
        cy0 = np.clip(sy0 // C + 1, 0, self._ncy - 1)
        cy1 = np.clip((sy1 - 1) // C + 1, 0, self._ncy - 1)
        ids, objs = [], []
        span_x, span_y = int((cx1 - cx0).max(initial=0)) + 1, int((cy1 - cy0).max(initial=0)) + 1
        for dy in range(span_y):
            for dx in range(span_x):
                m = (cy0 + dy <= cy1) & (cx0 + dx <= cx1)
                ids.append((cy0[m] + dy) * self._ncx + cx0[m] + dx)
                objs.append(np.nonzero(m)[0])
        ids_a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        objs_a = np.concatenate(objs) if objs else np.zeros(0, np.int64)
        order = np.lexsort((objs_a, ids_a))
        self._cell_ids = ids_a[order]
        self._cell_objs = objs_a[order]

    # --- queries -----------------------------------------------------------------------------
    def _objects_in(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Sorted indices of objects whose sprite intersects the level-0 region."""
        if len(self.boxes) == 0:
            return np.zeros(0, np.int64)
        C = _INDEX_CELL
        c0 = int(np.clip(x // C + 1, 0, self._ncx - 1))
        c1 = int(np.clip((x + w - 1) // C + 1, 0, self._ncx - 1))
        r0 = int(np.clip(y // C + 1, 0, self._ncy - 1))
        r1 = int(np.clip((y + h - 1) // C + 1, 0, self._ncy - 1))
        rows = np.arange(r0, r1 + 1) * self._ncx
        lo = np.searchsorted(self._cell_ids, rows + c0, "left")
        hi = np.searchsorted(self._cell_ids, rows + c1, "right")
        if not (hi > lo).any():
            return np.zeros(0, np.int64)
        cand = np.unique(
            np.concatenate([self._cell_objs[a:b] for a, b in zip(lo, hi, strict=True)])
        )
        sb = self._sprite_box[cand]
        m = (sb[:, 0] < x + w) & (sb[:, 2] > x) & (sb[:, 1] < y + h) & (sb[:, 3] > y)
        return cand[m]

    def boxes_in(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        min_visible: float = 0.5,
        *,
        clip: bool = False,
    ) -> np.ndarray:
        """Ground-truth boxes intersecting the level-0 region ``[x, x+w) × [y, y+h)``.

        A box is kept when at least ``min_visible`` of its area lies inside the region (0 keeps
        every box that touches it). Returns (M, 5) float32 ``(x1, y1, x2, y2, class_id)`` in
        level-0 px, unclipped unless ``clip=True`` (then clipped to the region).
        """
        b = self.boxes
        ix1 = np.maximum(b[:, 0], x)
        iy1 = np.maximum(b[:, 1], y)
        ix2 = np.minimum(b[:, 2], x + w)
        iy2 = np.minimum(b[:, 3], y + h)
        inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        keep = (inter > 0) & (inter >= min_visible * area)
        out = b[keep].copy()
        if clip:
            out[:, 0] = ix1[keep]
            out[:, 1] = iy1[keep]
            out[:, 2] = ix2[keep]
            out[:, 3] = iy2[keep]
        return out

    def ground_truth(self) -> GroundTruth:
        return GroundTruth(
            boxes=self.boxes.copy(),
            class_names=list(self.class_names),
            sections=list(self.section_bboxes),
            width=self.width,
            height=self.height,
            mpp=self.mpp,
            seed=self.seed,
            params={
                "n_sections": self.n_sections,
                "nucleus_density": self.nucleus_density,
                "metaphase_density": self.metaphase_density,
                "extra_objects": [list(o) for o in self.extra_objects],
                "lattice": self.lattice,
            },
        )

    # --- rendering ---------------------------------------------------------------------------
    def _field_crop(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 tissue/pink/violet fields at level-0 px, bilinear from the lattice.

        The lattice value of cell ``j`` sits at level-0 x = ``(j + 0.5) * S``; OpenCV's bit-exact
        resize by the integer factor S reproduces exactly that for every crop aligned to cells.
        """
        S = self.lattice
        lx0, ly0 = x // S - 1, y // S - 1
        lx1, ly1 = (x + w - 1) // S + 2, (y + h - 1) // S + 2
        hl, wl = self._field.shape[:2]
        crop = np.zeros((ly1 - ly0, lx1 - lx0, 3), np.uint8)
        ax0, ay0, ax1, ay1 = max(lx0, 0), max(ly0, 0), min(lx1, wl), min(ly1, hl)
        if ax0 < ax1 and ay0 < ay1:
            crop[ay0 - ly0 : ay1 - ly0, ax0 - lx0 : ax1 - lx0] = self._field[ay0:ay1, ax0:ax1]
        up = cv2.resize(
            crop, ((lx1 - lx0) * S, (ly1 - ly0) * S), interpolation=cv2.INTER_LINEAR_EXACT
        )
        ox, oy = x - lx0 * S, y - ly0 * S
        return up[oy : oy + h, ox : ox + w]

    def _touches_tissue(self, x: int, y: int, w: int, h: int) -> bool:
        m = 2 * self.lattice
        return any(
            bx - m < x + w and x < bx + bw + m and by - m < y + h and y < by + bh + m
            for bx, by, bw, bh in self.section_bboxes
        )

    def render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the level-0 region ``[x, x+w) × [y, y+h)``.

        Any region is allowed, also outside the slide (glass there). The result depends only on
        the pixels' positions: rendering a region whole or assembling it from sub-regions gives
        identical arrays.
        """
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got w={w}, h={h}")
        if w * h > _BLOCK[0] * _BLOCK[1] and (w > _BLOCK[0] or h > _BLOCK[1]):
            # large regions: cache-sized blocks are ~2.5x faster (and give identical pixels)
            out = np.empty((h, w, 3), np.uint8)
            for by in range(0, h, _BLOCK[1]):
                for bx in range(0, w, _BLOCK[0]):
                    bw, bh = min(_BLOCK[0], w - bx), min(_BLOCK[1], h - by)
                    out[by : by + bh, bx : bx + bw] = self._render(x + bx, y + by, bw, bh)
            return out
        return self._render(x, y, w, h)

    def _render(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        tex = self._tex
        objs = self._objects_in(x, y, w, h)
        tissue = self._touches_tissue(x, y, w, h)
        if not tissue and len(objs) == 0:
            return _glass_u8(tex, x, y, w, h)
        glass = tex["glass"].crop(x, y, w, h)
        # +0.5 makes the final truncation a rounding; with objects it is added after them
        half = 0.0 if len(objs) else 0.5
        planes = [glass + np.float32(GLASS_RGB[c] + half) for c in range(3)]
        if tissue:
            fld = self._field_crop(x, y, w, h)
            alpha = fld[:, :, 0].astype(np.float32)
            alpha -= 128.0
            alpha *= np.float32(4.0 / 255.0)
            alpha += tex["edge"].crop(x + 37, y + 59, w, h) * np.float32(0.35)
            alpha += np.float32(0.5)
            np.clip(alpha, 0.0, 1.0, out=alpha)
            am = tex["grain"].crop(x + 173, y + 301, w, h) + tex["mottle"].crop(x, y, w, h)
            am *= alpha
            am *= np.float32(1.0 / 255.0)
            a1 = am * fld[:, :, 1]
            a2 = am * fld[:, :, 2]
            tmp = np.empty_like(a1)
            for c in range(3):
                np.multiply(a1, PINK[c], out=tmp)
                planes[c] -= tmp
                np.multiply(a2, VIOLET[c], out=tmp)
                planes[c] -= tmp
        if len(objs):
            dens = np.zeros((h, w), np.float32)
            for i in objs:
                sx0, sy0, sp = self._sprite(int(i))
                ph, pw = sp.shape
                ax0, ay0 = max(sx0, x), max(sy0, y)
                ax1, ay1 = min(sx0 + pw, x + w), min(sy0 + ph, y + h)
                dst = dens[ay0 - y : ay1 - y, ax0 - x : ax1 - x]
                np.maximum(dst, sp[ay0 - sy0 : ay1 - sy0, ax0 - sx0 : ax1 - sx0], out=dst)
            k = 1.0 - NUCLEUS_RGB / np.asarray(GLASS_RGB, np.float32)
            tmp = np.empty_like(dens)
            for c in range(3):
                np.multiply(dens, -k[c], out=tmp)
                tmp += np.float32(1.0)
                planes[c] *= tmp
                planes[c] += np.float32(0.5)
        out = np.empty((h, w, 3), np.uint8)
        for c in range(3):
            np.clip(planes[c], 0.0, 255.0, out=planes[c])
            out[:, :, c] = planes[c]  # truncation of value+0.5 = rounding
        return out

    def _make_sprite(self, i: int) -> tuple[int, int, np.ndarray]:
        """Object ``i`` drawn alone: (x0, y0, density (h, w) float32 in [0, 1]) at level-0 px."""
        sx0, sy0, sx1, sy1 = (int(v) for v in self._sprite_box[i])
        w, h = sx1 - sx0, sy1 - sy0
        cx, cy = self._centers[i]
        if self._classes[i] == 0:
            # Analytic anti-aliased ellipse: ρ² = A u² + B uv + C v² is 1 on the outline; the
            # distance inside it is ≈ (1 - ρ)·sqrt(ab) px, mapped to density by _NUC_PROFILE
            # (filled interior, anti-aliased edge, slightly darker rim) through a 1/16-px table.
            a, b, ang, dark = self._params[i]
            t = math.radians(ang)
            ct, st = math.cos(t), math.sin(t)
            qa = ct * ct / (a * a) + st * st / (b * b)
            qb = 2 * ct * st * (1 / (a * a) - 1 / (b * b))
            qc = st * st / (a * a) + ct * ct / (b * b)
            u = np.arange(w, dtype=np.float32) + np.float32(sx0 + 0.5 - cx)
            v = np.arange(h, dtype=np.float32) + np.float32(sy0 + 0.5 - cy)
            r2 = (np.float32(qa) * u * u)[None, :] + (np.float32(qc) * v * v)[:, None]
            r2 += v[:, None] * (np.float32(qb) * u)[None, :]
            rho = np.sqrt(r2, out=r2)
            k = 16.0 * math.sqrt(a * b)
            rho *= np.float32(-k)
            rho += np.float32(k + _PROFILE_ZERO)  # = 16·d + offset of d = 0 in the table
            np.minimum(np.maximum(rho, 0.0, out=rho), 255.0, out=rho)
            dens = _NUC_PROFILE[rho.astype(np.uint8)]
            # chromatin texture, from absolute positions like everything else
            grain = self._tex["grain"].crop(sx0 + 91, sy0 + 13, w, h)
            dens *= grain * np.float32(1.2 * dark) - np.float32(0.2 * dark)
        else:
            # cv2 puts pixel centres at integer coordinates: continuous x = pixel index + 0.5
            m = np.zeros((h, w), np.uint8)
            dark = self._params[i, 3]
            r = self._rods[i]
            ends = np.rint((r[:, :4] + [cx - sx0 - 0.5, cy - sy0 - 0.5] * 2) * 16).astype(int)
            thick = r[:, 4].astype(int)
            for (x1, y1, x2, y2), t in zip(ends.tolist(), thick.tolist(), strict=True):
                cv2.line(m, (x1, y1), (x2, y2), 255, t, cv2.LINE_AA, 4)
            dens = m.astype(np.float32) * np.float32(dark / 255.0)
        np.minimum(np.maximum(dens, 0.0, out=dens), 1.0, out=dens)
        dens.setflags(write=False)
        return sx0, sy0, dens

    def tissue_alpha(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w) float32 tissue opacity in [0, 1] of a level-0 region (ground-truth tissue)."""
        fld = self._field_crop(int(x), int(y), int(w), int(h))
        alpha = fld[:, :, 0].astype(np.float32)
        alpha -= 128.0
        alpha *= np.float32(4.0 / 255.0)
        alpha += self._tex["edge"].crop(x + 37, y + 59, w, h) * np.float32(0.35)
        alpha += np.float32(0.5)
        return np.clip(alpha, 0.0, 1.0, out=alpha)

    def tissue_mask(self, downsample: int | None = None) -> np.ndarray:
        """Bool ground-truth tissue mask on the lattice: cell ``(i, j)`` covers level-0 px
        ``[j*S, (j+1)*S) × [i*S, (i+1)*S)`` with ``S = self.lattice`` (the ``downsample``
        argument is accepted for symmetry and must equal ``S`` or be None)."""
        if downsample not in (None, self.lattice):
            raise ValueError(f"tissue_mask is on the {self.lattice}-px lattice, got {downsample}")
        return self._field[:, :, 0] >= 128

    def __repr__(self) -> str:
        return (
            f"<Scene {self.width}x{self.height} seed={self.seed} mpp={self.mpp} "
            f"sections={len(self.section_bboxes)} objects={len(self.boxes)}>"
        )


class _SpriteCache:
    """Thread-safe LRU of ``fn(i)`` results ``(x0, y0, array)``, bounded by the arrays' bytes."""

    def __init__(self, fn, max_bytes: int):
        self._fn, self._max = fn, int(max_bytes)
        self._items: OrderedDict[int, tuple[int, int, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __call__(self, i: int) -> tuple[int, int, np.ndarray]:
        with self._lock:
            hit = self._items.get(i)
            if hit is not None:
                self._items.move_to_end(i)
                return hit
        value = self._fn(i)  # outside the lock: two threads may both draw it, harmlessly
        with self._lock:
            if i not in self._items:
                self._items[i] = value
                self._bytes += value[2].nbytes
                while self._bytes > self._max and self._items:
                    _, old = self._items.popitem(last=False)
                    self._bytes -= old[2].nbytes
        return value

    def cache_clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _poly_bbox(poly: np.ndarray, W: int, H: int) -> tuple[int, int, int, int]:
    x0 = max(0, math.floor(poly[:, 0].min()))
    y0 = max(0, math.floor(poly[:, 1].min()))
    x1 = min(W, math.ceil(poly[:, 0].max()))
    y1 = min(H, math.ceil(poly[:, 1].max()))
    return (x0, y0, x1 - x0, y1 - y0)


def _poisson_keep(pts: np.ndarray, radius: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Greedy dart throwing: indices (in candidate order) of the ``ok`` candidates that are at
    least ``radius_i + radius_j`` from every earlier kept candidate."""
    from scipy.spatial import cKDTree

    idx = np.nonzero(ok)[0]
    if len(idx) == 0:
        return idx
    p, r = pts[idx], radius[idx]
    tree = cKDTree(p)
    pairs = tree.query_pairs(2 * float(r.max()), output_type="ndarray")
    if len(pairs):
        d = np.hypot(*(p[pairs[:, 0]] - p[pairs[:, 1]]).T)
        pairs = pairs[d < r[pairs[:, 0]] + r[pairs[:, 1]]]
        pairs.sort(axis=1)
        pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    keep = np.ones(len(idx), bool)
    for i, j in pairs.tolist():
        if keep[i]:
            keep[j] = False
    return idx[keep]
