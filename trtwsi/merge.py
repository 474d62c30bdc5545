"""Cross-tile merge of detections in level-0 slide coordinates.

(Over 500 lines because it is one algorithm, in three parts that only make sense together: input
validation, the spatial index that finds overlapping pairs, and the greedy selection over them.)

Tiles overlap, so one object near a tile seam is reported several times: whole by the tile it fits
in, as a near-duplicate by a neighbour that also sees it whole, and as truncated partial boxes by
neighbours that see only part of it. :func:`merge_detections` reduces those reports to one box per
object, for a whole slide at once (10⁶ boxes in a few seconds on 2 CPU cores).

Boxes are ``(x1, y1, x2, y2)`` in **level-0 slide pixels** (``x2 >= x1``, ``y2 >= y1``; float64
internally). The merge never needs the tile grid: boxes are compared only with boxes near them,
found by a spatial index, so seams, corners and sections need no special handling.

Methods (both process boxes in descending score order, ties broken by ascending input index):

``"nms"``
    Non-maximum suppression: a box is kept unless a kept box of higher rank overlaps it by more
    than ``threshold``; the output boxes are input boxes, unchanged.
``"greedy"``
    SAHI's greedy non-maximum merging (NMM): the kept boxes are exactly those of ``"nms"``; every
    suppressed box is absorbed by the highest-ranked kept box that overlaps it by more than
    ``threshold`` (the one that suppressed it in NMS order); a kept box becomes the union
    (``box_merge="union"``) or the score-weighted mean (``box_merge="weighted"``) of itself and
    the boxes it absorbed; its score is its own (the maximum of its cluster), its class its own.
    SAHI additionally re-checks each absorbed box against the growing union, which makes its
    result depend on the absorption order; we match against the keeper's original box only.

Metrics: ``"iou"`` = intersection / union; ``"ios"`` = intersection / area of the smaller box
(IoS catches a partial box lying inside the whole one: its IoS is ~1 whatever its IoU).
A pair is merged when ``overlap > threshold`` — strictly greater, like ``torchvision.ops.nms``
(SAHI uses ``>=``). Boxes with zero area have overlap 0 with everything, so they are never merged
and never absorb anything.

``class_aware=True`` compares only boxes of the same class; ``groups`` (e.g. the model index)
are never merged across, whatever ``class_aware`` says. ``tiles`` (the tile each box came from)
removes every same-tile pair from the comparison: the model's own NMS already decided between
boxes of one tile, so two boxes it kept are never merged, however much they overlap. With boxes
in rank order, a box is suppressed iff a *kept* box of higher rank from *another* tile overlaps it
by more than ``threshold`` (a box suppressed by another tile suppresses nothing, as in plain NMS);
``"greedy"`` absorbs only boxes of other tiles. All boxes in one tile: nothing merges; every box
in its own tile: the same result as ``tiles=None``.

Defaults (:data:`DEFAULT_METHOD`, :data:`DEFAULT_METRIC`, :data:`DEFAULT_THRESHOLD`) were chosen
by simulating a perfect but jittery detector over tiled layouts (:func:`simulate_tiled_detections`)
and measuring precision/recall at IoU 0.5 for every method × metric × threshold; see
``bench/bench_merge.py`` (it prints and saves the table) and the summary below.

Measured with ``python bench/bench_merge.py --table-only`` (seed 0; tile 640, overlap 0.2; 2
classes; ``mv`` = ``min_visible``, ``j`` = jitter px, otherwise 0.5 and 1 px; ``tiles`` = the
simulated tile of each report; ``--all-pairs`` gives the table without tiles). Layouts
(:func:`make_layout`): "seams", 1108 objects of 40–120 px centred on every tile border and corner;
"nuclei", 38 921 objects of 20–40 px, dense (about one overlapping neighbour per object, IoS up to
0.55); "metaphases", 1776 objects of 60–120 px, sparse; "large", 319 objects of 130–300 px (larger
than the 128 px overlap: some are seen whole by no tile). F1 at IoU 0.5 vs ground truth::

    method  metric thr   seams   nuclei  metaph.  large   nuclei mv=.25  seams mv=.25 j=3
    none    -      -     0.6988  0.7430  0.7826   0.7906  0.7222         0.5260
    nms     iou    0.1   1.0000  0.9991  1.0000   1.0000  0.9990         0.9995
    nms     iou    0.3   1.0000  1.0000  1.0000   1.0000  0.9869         0.8356
    nms     iou    0.5   0.9581  0.9902  0.9944   0.9369  0.9612         0.6500
    nms     ios    0.3   1.0000  0.9999  1.0000   1.0000  0.9998         0.9995
    nms     ios    0.4   1.0000  1.0000  1.0000   1.0000  1.0000         0.9986
    nms     ios    0.5   1.0000  1.0000  1.0000   1.0000  0.9999         0.9982   <- default
    nms     ios    0.6   1.0000  1.0000  1.0000   0.9984  0.9998         0.9946
    nms     ios    0.7   1.0000  0.9999  1.0000   0.9755  0.9993         0.9771
    greedy  ios    0.3   1.0000  0.9911  1.0000   1.0000  0.9912         0.9995
    greedy  ios    0.5   1.0000  0.9999  1.0000   1.0000  0.9998         0.9982
    (every threshold 0.1–0.8 × method × metric, mean IoUs, and the same table without tiles:
    bench/results/merge-<machine>.json)

Without tiles, low thresholds also merged touching nuclei of one tile (nuclei F1 at IoS 0.3 /
0.4 / 0.5: 0.9845 / 0.9969 / 0.9998); with tiles only nuclei in an overlap band can be merged
wrongly, so no IoS cell gets worse and the seams are unchanged. IoU must go below the visible
fraction of the smallest partial box to remove it (0.1 for a quarter-visible object); IoS removes
partial boxes at any threshold. With tiles, IoS 0.5 makes no error on the first four layouts
(seed 0), but IoS 0.3 and 0.4 now have a higher mean F1 over the six (0.99986, 0.99977 vs
0.99969; over seeds 0–5, ``--seed``: 0.99987, 0.99985 vs 0.99964): on "seams mv=.25 j=3" 0.5
leaves 25 false positives in the six seeds, 0.4 11, while on the two nuclei layouts 0.4 makes 35
errors, 0.5 17 and 0.3 286. The default stays NMS + IoS 0.5 until real slides decide. Greedy NMM
keeps the same boxes as NMS; its unions merge touching nuclei into oversized boxes (F1 0.9999 vs
1.0000, mean IoU 0.8956 vs 0.8965) but rebuild objects larger than the overlap from their parts
(mean IoU on "large" 0.983 vs 0.949): prefer ``method="greedy"`` when objects are larger than the
overlap.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trtwsi.errors import MergeError
from trtwsi.ops.boxes import METRICS as _METRICS
from trtwsi.ops.boxes import Metric, _overlap, pair_overlap

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_METRIC",
    "DEFAULT_THRESHOLD",
    "MergeError",
    "MergeResult",
    "combine_merges",
    "merge_detections",
    "merge_edges",
    "merge_over_edges",
    "merge_reference",
    "overlapping_pairs",
    "pair_overlap",
]

Method = Literal["nms", "greedy"]
BoxMerge = Literal["union", "weighted"]

#: Default merge method (see the module docstring for the measurement behind it).
DEFAULT_METHOD: Method = "nms"
#: Default overlap metric.
DEFAULT_METRIC: Metric = "ios"
#: Default threshold: pairs with ``overlap > DEFAULT_THRESHOLD`` are merged.
DEFAULT_THRESHOLD: float = 0.5

_METHODS = ("nms", "greedy")
_BOX_MERGES = ("union", "weighted")

# Candidate pairs are generated in chunks of at most this many (bounds peak memory).
_PAIR_CHUNK = 1 << 22
# Vectorized rounds of the greedy selection before finishing sequentially (long chains only).
_MAX_ROUNDS = 64


@dataclass(frozen=True)
class MergeResult:
    """Output of :func:`merge_detections` / :func:`merge_reference` (K kept of N input boxes).

    Attributes:
        keep: ``(K,)`` int64 — input row of each output detection (its representative: the
            highest-ranked box of its cluster), in descending score order, ties by input index.
            Use it to gather any extra column: ``models[result.keep]``.
        boxes: ``(K, 4)`` float64 ``(x1, y1, x2, y2)`` level-0 px. ``"nms"``: ``input[keep]``;
            ``"greedy"``: the merged (union or score-weighted) box of each cluster.
        scores: ``(K,)`` input score dtype — the representative's score (= cluster maximum).
        classes: ``(K,)`` input class dtype — the representative's class.
        cluster: ``(N,)`` int64 — for every input row, the output index it was merged into
            (``keep[cluster[i]] == i`` for kept rows).
    """

    keep: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    cluster: np.ndarray

    def __len__(self) -> int:
        return int(self.keep.shape[0])

    @property
    def counts(self) -> np.ndarray:
        """``(K,)`` int64: how many input boxes each output detection stands for (>= 1)."""
        return np.bincount(self.cluster, minlength=len(self)).astype(np.int64)


# ------------------------------------------------------------------------------------------
# input checking
# ------------------------------------------------------------------------------------------
def _int_labels(name, x, n):
    """``(n,)`` integer labels (groups, tiles) or None."""
    if x is None:
        return None
    a = np.asarray(x)
    if a.shape != (n,):
        raise MergeError(f"{name} must have shape ({n},) to match boxes, got {a.shape}")
    if n and not np.issubdtype(a.dtype, np.integer):
        raise MergeError(f"{name} must be integers, got dtype {a.dtype}")
    return a


def _check_inputs(boxes, scores, classes, groups, tiles, method, metric, threshold, box_merge):
    if method not in _METHODS:
        raise MergeError(f"method must be one of {_METHODS}, got {method!r}")
    if metric not in _METRICS:
        raise MergeError(f"metric must be one of {_METRICS}, got {metric!r}")
    if box_merge not in _BOX_MERGES:
        raise MergeError(f"box_merge must be one of {_BOX_MERGES}, got {box_merge!r}")
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise MergeError(f"threshold must be in [0, 1], got {threshold}")
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise MergeError(f"boxes must have shape (N, 4) (x1, y1, x2, y2), got {b.shape}")
    n = b.shape[0]
    s = np.asarray(scores)
    if s.shape != (n,):
        raise MergeError(f"scores must have shape ({n},) to match boxes, got {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if classes is None:
        c = np.zeros(n, dtype=np.int64)
    else:
        c = np.asarray(classes)
        if c.shape != (n,):
            raise MergeError(f"classes must have shape ({n},) to match boxes, got {c.shape}")
        if n and not np.issubdtype(c.dtype, np.integer):
            raise MergeError(f"classes must be integers, got dtype {c.dtype}")
    g = _int_labels("groups", groups, n)
    t = _int_labels("tiles", tiles, n)
    if n:
        if not np.isfinite(b).all():
            bad = int(np.flatnonzero(~np.isfinite(b).all(axis=1))[0])
            raise MergeError(f"boxes must be finite; row {bad} is {b[bad].tolist()}")
        if not np.isfinite(s).all():
            bad = int(np.flatnonzero(~np.isfinite(s))[0])
            raise MergeError(f"scores must be finite; row {bad} is {s[bad]}")
        inv = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if inv.any():
            bad = int(np.flatnonzero(inv)[0])
            raise MergeError(
                f"boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; row {bad} is "
                f"{b[bad].tolist()} (convert (x, y, w, h) or (cx, cy, w, h) boxes first)"
            )
    return b, s, c, g, t, threshold


def _rank_order(scores: np.ndarray) -> np.ndarray:
    """Input indices in processing order: descending score, ties by ascending index."""
    return np.argsort(-scores, kind="stable")


def score_index_order(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``np.lexsort((index, -scores))``: positions by descending score, ties by ascending
    ``index`` (int64), equal pairs in input order. When every score is a finite float32 value
    (model scores are) and every index is in ``[0, 2³¹)``, one stable argsort of a packed int64
    key (the score's order-preserving bits above the index) gives the same order faster than
    the lexsort (bench/bench_seam_tail.py's results, ``-lexsort`` files against the others);
    otherwise the lexsort."""
    scores = np.asarray(scores)
    index = np.asarray(index, dtype=np.int64)
    if scores.size:
        s32 = scores.astype(np.float32) + np.float32(0.0)  # -0.0 -> +0.0: they tie
        exact = (
            np.isfinite(s32).all()
            and np.array_equal(s32, scores)
            and index.min() >= 0
            and index.max() < 2**31
        )
        if exact:
            bits = s32.view(np.int32).astype(np.int64)
            # order-preserving: negative floats' bits count down, positive floats' count up
            up = np.where(bits < 0, -1 - (bits & 0x7FFFFFFF), bits)
            # descending score in the top 32 of 63 bits, the index (< 2³¹) below
            return np.argsort(((np.int64(2**31 - 1) - up) << 31) | index, kind="stable")
    return np.lexsort((index, -scores))


def _buckets(classes, groups, class_aware: bool) -> np.ndarray | None:
    """Dense int64 id of the (group, class) compartment of each box; None if all in one."""
    parts = []
    if groups is not None:
        parts.append(np.unique(groups, return_inverse=True)[1].ravel().astype(np.int64))
    if class_aware:
        parts.append(np.unique(classes, return_inverse=True)[1].ravel().astype(np.int64))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    key = parts[0] * (int(parts[1].max()) + 1) + parts[1]
    return np.unique(key, return_inverse=True)[1].ravel().astype(np.int64)


# ------------------------------------------------------------------------------------------
# spatial index: multi-level uniform grid
# ------------------------------------------------------------------------------------------
def _cell_ranges(lo, hi, origin, cell):
    """First and last grid cell index covered by [lo, hi] (monotone in lo/hi)."""
    c0 = np.floor((lo - origin) / cell).astype(np.int64)
    c1 = np.floor((hi - origin) / cell).astype(np.int64)
    return c0, c1


def _grid_entries(ids, x1, y1, x2, y2, ox, oy, cell):
    """One entry (box id, cx, cy) per grid cell covered by each box in ``ids``."""
    cx0, cx1 = _cell_ranges(x1[ids], x2[ids], ox, cell)
    cy0, cy1 = _cell_ranges(y1[ids], y2[ids], oy, cell)
    sx = cx1 - cx0
    sy = cy1 - cy0
    out_id, out_cx, out_cy = [], [], []
    for dx in range(int(sx.max(initial=0)) + 1):
        for dy in range(int(sy.max(initial=0)) + 1):
            m = (sx >= dx) & (sy >= dy)
            if dx == 0 and dy == 0:
                out_id.append(ids)
                out_cx.append(cx0)
                out_cy.append(cy0)
            elif m.any():
                out_id.append(ids[m])
                out_cx.append(cx0[m] + dx)
                out_cy.append(cy0[m] + dy)
    return np.concatenate(out_id), np.concatenate(out_cx), np.concatenate(out_cy)


def _combined_key(bucket, cx, cy):
    """Sortable int64 key of (bucket, cx, cy); dense re-ranking if it would overflow."""
    ncx = int(cx.max()) + 1
    ncy = int(cy.max()) + 1
    nb = int(bucket.max()) + 1 if bucket is not None else 1
    if nb * ncx * ncy < (1 << 61):
        key = cx * ncy + cy
        if bucket is not None:
            key += bucket * (ncx * ncy)
        return key
    rows = np.stack([bucket if bucket is not None else np.zeros_like(cx), cx, cy])
    return np.unique(rows, axis=1, return_inverse=True)[1].ravel().astype(np.int64)


def _pairs_in_cells(key, is_big, chunk=_PAIR_CHUNK):
    """Yield (p, q) position pairs of entries sharing a cell, p < q, p a 'big' entry.

    ``key``: sorted int64 cell keys of E entries, within a cell big entries first.
    """
    e = key.shape[0]
    if e < 2:
        return
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], e]
    counts = ends - starts
    group_end = np.repeat(ends, counts)
    n_after = np.where(is_big, group_end - np.arange(e) - 1, 0)
    cum = np.cumsum(n_after)
    total = int(cum[-1])
    if total == 0:
        return
    # split the entries into runs generating at most ~chunk pairs each
    cuts = np.searchsorted(cum, np.arange(chunk, total, chunk), side="left")
    bounds = np.unique(np.r_[0, cuts + 1, e])
    for lo, hi in itertools.pairwise(bounds):
        cnt = n_after[lo:hi]
        t = int(cnt.sum())
        if t == 0:
            continue
        p = np.repeat(np.arange(lo, hi), cnt)
        first = np.cumsum(cnt) - cnt
        q = p + 1 + (np.arange(t) - np.repeat(first, cnt))
        yield p, q


def overlapping_pairs(
    boxes: np.ndarray,
    *,
    metric: Metric = "iou",
    threshold: float = 0.5,
    buckets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``i < j`` with ``pair_overlap(boxes[i], boxes[j]) > threshold``.

    ``boxes``: ``(N, 4)`` float64 ``(x1, y1, x2, y2)`` (any one coordinate frame).
    ``buckets``: optional ``(N,)`` int64 — only boxes of the same bucket are paired.
    Returns two ``(P,)`` int64 arrays ``i``, ``j`` (unique pairs, ``i < j``, unordered).

    Index: a uniform grid per size level. The base cell is the median box side; a box of level
    ``L`` (longest side <= cell·2^L) is hashed into the <= 2×2 (3×3 with rounding) cells of the
    level-``L`` grid it covers; the boxes of every smaller level are hashed into that grid too, as
    queries, so a pair is found in the grid of its larger box. A pair is reported only in the cell
    holding the top-left corner of its intersection, so there are no duplicates to remove. Time
    and memory are O(N·levels + candidate pairs); a giant box among small ones costs O(boxes
    under it), never N².
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    threshold = float(threshold)
    n = b.shape[0]
    empty = (np.empty(0, np.int64), np.empty(0, np.int64))
    if n < 2:
        return empty
    x1, y1, x2, y2 = (np.ascontiguousarray(b[:, k]) for k in range(4))
    w = x2 - x1
    h = y2 - y1
    area = w * h
    live = np.flatnonzero((w > 0) & (h > 0))  # zero-area boxes never overlap anything
    if live.size < 2:
        return empty
    side = np.maximum(w[live], h[live])
    ox, oy = float(x1[live].min()), float(y1[live].min())
    extent = max(float(x2[live].max()) - ox, float(y2[live].max()) - oy, 1e-300)
    base = max(float(np.median(side)), extent / float(1 << 20), 1e-300)
    level = np.maximum(np.ceil(np.log2(np.maximum(side / base, 1.0))), 0).astype(np.int64)
    level += side > base * np.exp2(level)  # guard log2 rounding: side <= base·2^level
    level_of_box = np.full(n, -1, dtype=np.int64)
    level_of_box[live] = level
    bk_all = buckets if buckets is None else np.asarray(buckets, dtype=np.int64)
    out_i, out_j = [], []
    order_by_level = np.argsort(level, kind="stable")
    sorted_levels = level[order_by_level]
    for lv in np.unique(level):
        lv = int(lv)
        cell = base * float(2.0**lv)
        k0, k1 = np.searchsorted(sorted_levels, [lv, lv + 1])
        big = live[order_by_level[k0:k1]]
        small = live[order_by_level[:k0]]
        if metric == "iou" and small.size and threshold > 0:
            # IoU <= min(area)/max(area): a box smaller than threshold × the smallest big box
            # cannot match any big box.
            small = small[area[small] >= threshold * float(area[big].min())]
        ids = np.concatenate([big, small])
        eid, ecx, ecy = _grid_entries(ids, x1, y1, x2, y2, ox, oy, cell)
        ebig = level_of_box[eid] == lv
        key = _combined_key(None if bk_all is None else bk_all[eid], ecx, ecy)
        srt = np.argsort(key * 2 + ~ebig, kind="stable")  # by cell, big entries first
        key, eid, ecx, ecy, ebig = key[srt], eid[srt], ecx[srt], ecy[srt], ebig[srt]
        ex1, ey1, ex2, ey2 = x1[eid], y1[eid], x2[eid], y2[eid]
        for p, q in _pairs_in_cells(key, ebig):
            # report each pair once: in the cell of its intersection's top-left corner
            cx = np.floor((np.maximum(ex1[p], ex1[q]) - ox) / cell).astype(np.int64)
            m = cx == ecx[p]
            p, q = p[m], q[m]
            cy = np.floor((np.maximum(ey1[p], ey1[q]) - oy) / cell).astype(np.int64)
            m = cy == ecy[p]
            p, q = p[m], q[m]
            if not p.size:
                continue
            ov = _overlap(ex1[p], ey1[p], ex2[p], ey2[p], ex1[q], ey1[q], ex2[q], ey2[q], metric)
            m = ov > threshold
            i, j = eid[p[m]], eid[q[m]]
            out_i.append(np.minimum(i, j))
            out_j.append(np.maximum(i, j))
    if not out_i:
        return empty
    return np.concatenate(out_i), np.concatenate(out_j)


# ------------------------------------------------------------------------------------------
# greedy selection over the sparse overlap graph
# ------------------------------------------------------------------------------------------
def _greedy_select(n: int, a: np.ndarray, b: np.ndarray):
    """Sequential-greedy keep decisions, computed in vectorized rounds.

    Nodes are ranks ``0..n-1`` (0 = best). ``a``, ``b``: edges with ``a < b`` (``a`` outranks
    ``b``). A node is kept iff no kept node of better rank shares an edge with it — exactly what
    NMS computes visiting nodes in rank order. Returns ``(kept (n,) bool, absorber (n,) int64)``:
    ``absorber[r]`` is the best-ranked kept neighbour of a suppressed node ``r`` (``r`` if kept).
    """
    kept = np.ones(n, dtype=bool)
    absorber = np.arange(n, dtype=np.int64)
    if a.size == 0:
        return kept, absorber
    undecided = np.zeros(n, dtype=bool)
    undecided[b] = True
    kept[b] = False
    und_nodes = np.unique(b)
    blocked = np.zeros(n, dtype=bool)
    ea, eb = a, b
    rounds = 0
    while ea.size and rounds < _MAX_ROUNDS:
        rounds += 1
        hit = kept[ea]
        if hit.any():
            undecided[eb[hit]] = False  # suppressed by a kept better-ranked neighbour
        live = undecided[eb] & undecided[ea]
        ea, eb = ea[live], eb[live]
        und_nodes = und_nodes[undecided[und_nodes]]
        blocked[eb] = True
        free = und_nodes[~blocked[und_nodes]]  # every better neighbour is suppressed
        blocked[eb] = False
        kept[free] = True
        undecided[free] = False
        und_nodes = und_nodes[undecided[und_nodes]]
    if ea.size:  # long chains: finish in rank order, one node at a time
        srt = np.argsort(eb, kind="stable")
        ea, eb = ea[srt], eb[srt]
        starts = np.searchsorted(eb, und_nodes, side="left")
        stops = np.searchsorted(eb, und_nodes, side="right")
        for node, s0, s1 in zip(und_nodes.tolist(), starts.tolist(), stops.tolist(), strict=True):
            kept[node] = not kept[ea[s0:s1]].any()
    # absorber: best-ranked kept neighbour (kept neighbours always outrank a suppressed node)
    m = kept[a] & ~kept[b]
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, b[m], a[m])
    sup = ~kept
    absorber[sup] = best[sup]
    return kept, absorber


def _finish(b, s, c, order, kept_rank, absorber_rank, method, box_merge) -> MergeResult:
    """Build the MergeResult from decisions in rank space."""
    n = b.shape[0]
    kept_ranks = np.flatnonzero(kept_rank)
    keep = order[kept_ranks].astype(np.int64)
    out_pos_of_rank = np.full(n, -1, dtype=np.int64)
    out_pos_of_rank[kept_ranks] = np.arange(kept_ranks.size)
    cluster_of_rank = out_pos_of_rank[absorber_rank]
    cluster = np.empty(n, dtype=np.int64)
    cluster[order] = cluster_of_rank
    k = keep.size
    if method == "nms" or k == n:
        boxes = b[keep].copy()
    elif box_merge == "union":
        boxes = b[keep].copy()
        np.minimum.at(boxes[:, 0], cluster, b[:, 0])
        np.minimum.at(boxes[:, 1], cluster, b[:, 1])
        np.maximum.at(boxes[:, 2], cluster, b[:, 2])
        np.maximum.at(boxes[:, 3], cluster, b[:, 3])
    else:  # score-weighted mean of the cluster's boxes (keeper's box if all weights are 0)
        w = s.astype(np.float64)
        wsum = np.bincount(cluster, weights=w, minlength=k)
        boxes = b[keep].copy()
        ok = wsum > 0
        for col in range(4):
            acc = np.bincount(cluster, weights=w * b[:, col], minlength=k)
            boxes[ok, col] = acc[ok] / wsum[ok]
    return MergeResult(keep=keep, boxes=boxes, scores=s[keep], classes=c[keep], cluster=cluster)


def merge_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray | None = None,
    *,
    method: Method = DEFAULT_METHOD,
    metric: Metric = DEFAULT_METRIC,
    threshold: float = DEFAULT_THRESHOLD,
    class_aware: bool = True,
    groups: np.ndarray | None = None,
    tiles: np.ndarray | None = None,
    box_merge: BoxMerge = "union",
) -> MergeResult:
    """Merge duplicate detections of one slide (all tiles at once) in level-0 coordinates.

    Args:
        boxes: ``(N, 4)`` float ``(x1, y1, x2, y2)`` level-0 slide px, ``x2 >= x1``, ``y2 >= y1``.
        scores: ``(N,)`` float confidences (any float dtype; kept as is in the output).
        classes: ``(N,)`` int class ids (None: all class 0).
        method: ``"nms"`` (suppress) or ``"greedy"`` (SAHI greedy NMM: absorb and grow).
        metric: ``"iou"`` or ``"ios"`` (intersection over the smaller area).
        threshold: a pair merges when ``overlap > threshold`` (strict, as torchvision's nms).
        class_aware: compare only boxes of the same class.
        groups: optional ``(N,)`` int (e.g. model index); boxes of different groups never merge.
        tiles: optional ``(N,)`` int tile id of each box (e.g. the global tile index); boxes of
            the same tile are never compared (the model's own NMS already decided between
            them), so only duplicates across tiles merge. None: every pair is compared.
        box_merge: for ``"greedy"``, ``"union"`` (SAHI) or ``"weighted"`` (score-weighted mean).

    Returns:
        :class:`MergeResult` (output in descending score order, ties by input index).

    Exactly equal to :func:`merge_reference` (same keep, boxes, clusters); O(N log N + P) time
    for P overlapping pairs, no N² memory.
    """
    b, s, c, g, t, threshold = _check_inputs(
        boxes, scores, classes, groups, tiles, method, metric, threshold, box_merge
    )
    i, j = merge_edges(b, c, g, t, metric=metric, threshold=threshold, class_aware=class_aware)
    return merge_over_edges(b, s, c, i, j, method=method, box_merge=box_merge)


def merge_edges(
    b: np.ndarray,
    c: np.ndarray,
    groups: np.ndarray | None,
    tiles: np.ndarray | None,
    *,
    metric: Metric,
    threshold: float,
    class_aware: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """The edges :func:`merge_detections` decides over: pairs ``i < j`` (two ``(P,)`` int64)
    of boxes ``b`` ``(N, 4)`` float64 that may merge (same class if ``class_aware``, same
    group, different tile) and overlap by more than ``threshold``. Inputs as checked by
    :func:`merge_detections`. Boxes in different connected components of these edges never
    affect each other, so a merge can be split along components (see :func:`combine_merges`)."""
    if b.shape[0] < 2:
        e = np.empty(0, dtype=np.int64)
        return e, e.copy()
    bucket = _buckets(c, groups, class_aware)
    i, j = overlapping_pairs(b, metric=metric, threshold=threshold, buckets=bucket)
    if tiles is not None:  # same-tile pairs are no edges: neither suppresses nor absorbs
        m = tiles[i] != tiles[j]
        i, j = i[m], j[m]
    return i, j


def merge_over_edges(
    b: np.ndarray,
    s: np.ndarray,
    c: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    *,
    method: Method = DEFAULT_METHOD,
    box_merge: BoxMerge = "union",
) -> MergeResult:
    """The merge of boxes ``b`` ``(N, 4)`` float64, scores ``s`` ``(N,)``, classes ``c``
    ``(N,)`` over the edges ``i``, ``j`` of :func:`merge_edges` (of exactly these boxes)."""
    n = b.shape[0]
    order = _rank_order(s)
    if n == 0:
        e = np.empty(0, dtype=np.int64)
        return MergeResult(keep=e, boxes=b.copy(), scores=s.copy(), classes=c.copy(), cluster=e)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    ri, rj = rank[i], rank[j]
    kept, absorber = _greedy_select(n, np.minimum(ri, rj), np.maximum(ri, rj))
    return _finish(b, s, c, order, kept, absorber, method, box_merge)


def combine_merges(n: int, parts) -> MergeResult:
    """One :class:`MergeResult` over ``n`` input rows from merges of disjoint subsets of them.

    ``parts``: ``(rows, result)`` pairs: ``rows`` ``(M,)`` int64 input rows in ascending order,
    ``result`` the merge of exactly those rows (in that order). When the subsets are the
    ``groups`` of :func:`merge_detections` (boxes of different groups never merge), the result
    equals ``merge_detections(..., groups=...)`` over all ``n`` rows: same ``keep``, boxes,
    scores, classes and clusters, in the same order (descending score, ties by input row). This
    lets a slide's sections be merged as each one completes.
    """
    parts = list(parts)
    cover = sum(len(r) for r, _ in parts)
    if cover != n:
        raise ValueError(f"the parts cover {cover} rows, not {n}")
    for rows, res in parts:
        if res.cluster.shape[0] != len(rows):
            raise ValueError(f"a part merged {res.cluster.shape[0]} rows, not its {len(rows)}")
    if not parts:
        e = np.empty(0, dtype=np.int64)
        return MergeResult(keep=e, boxes=np.empty((0, 4)), scores=np.empty(0),
                           classes=e.copy(), cluster=e)  # fmt: skip
    keep = np.concatenate([np.asarray(r, dtype=np.int64)[res.keep] for r, res in parts])
    scores = np.concatenate([res.scores for _, res in parts])
    order = score_index_order(scores, keep)
    cluster = np.empty(n, dtype=np.int64)
    off = 0
    for rows, res in parts:
        cluster[rows] = res.cluster + off
        off += len(res)
    new_pos = np.empty(len(order), dtype=np.int64)
    new_pos[order] = np.arange(len(order))
    return MergeResult(
        keep=keep[order],
        boxes=np.concatenate([res.boxes for _, res in parts])[order],
        scores=scores[order],
        classes=np.concatenate([res.classes for _, res in parts])[order],
        cluster=new_pos[cluster],
    )


def merge_reference(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray | None = None,
    *,
    method: Method = DEFAULT_METHOD,
    metric: Metric = DEFAULT_METRIC,
    threshold: float = DEFAULT_THRESHOLD,
    class_aware: bool = True,
    groups: np.ndarray | None = None,
    tiles: np.ndarray | None = None,
    box_merge: BoxMerge = "union",
) -> MergeResult:
    """Brute-force O(N²) oracle of :func:`merge_detections` (same arguments and result).

    Visit boxes by descending score (ties: lower index first); the first unvisited box is kept
    and absorbs (``"greedy"``) or suppresses (``"nms"``) every unvisited box of its class/group,
    from another tile (if ``tiles`` is given), whose overlap with it is ``> threshold``. Meant
    for tests (N up to a few thousand).
    """
    b, s, c, g, t, threshold = _check_inputs(
        boxes, scores, classes, groups, tiles, method, metric, threshold, box_merge
    )
    n = b.shape[0]
    ov = pair_overlap(b[:, None, :], b[None, :, :], metric)
    same = np.ones((n, n), dtype=bool)
    if class_aware:
        same &= c[:, None] == c[None, :]
    if g is not None:
        same &= g[:, None] == g[None, :]
    if t is not None:
        same &= t[:, None] != t[None, :]
    order = [int(v) for v in _rank_order(s)]
    done = np.zeros(n, dtype=bool)
    keep, members = [], []
    for i in order:
        if done[i]:
            continue
        done[i] = True
        absorbed = [j for j in order if not done[j] and same[i, j] and ov[i, j] > threshold]
        for j in absorbed:
            done[j] = True
        keep.append(i)
        members.append([i, *absorbed])
    cluster = np.empty(n, dtype=np.int64)
    out_boxes = np.empty((len(keep), 4), dtype=np.float64)
    for k, mem in enumerate(members):
        cluster[mem] = k
        mb = b[mem]
        if method == "nms":
            out_boxes[k] = b[mem[0]]
        elif box_merge == "union":
            out_boxes[k] = [mb[:, 0].min(), mb[:, 1].min(), mb[:, 2].max(), mb[:, 3].max()]
        else:
            w = s[mem].astype(np.float64)
            out_boxes[k] = (w[:, None] * mb).sum(0) / w.sum() if w.sum() > 0 else b[mem[0]]
    keep_a = np.asarray(keep, dtype=np.int64)
    return MergeResult(
        keep=keep_a, boxes=out_boxes, scores=s[keep_a], classes=c[keep_a], cluster=cluster
    )
