"""Cross-tile merge of detections in level-0 slide coordinates.

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
are never merged across, whatever ``class_aware`` says.

Defaults (:data:`DEFAULT_METHOD`, :data:`DEFAULT_METRIC`, :data:`DEFAULT_THRESHOLD`) were chosen
by simulating a perfect but jittery detector over tiled layouts (:func:`simulate_tiled_detections`)
and measuring precision/recall at IoU 0.5 for every method × metric × threshold; see
``bench/bench_merge.py`` (it prints and saves the table) and the summary below.

Measured with ``python bench/bench_merge.py --table-only`` (seed 0; tile 640, overlap 0.2; 2
classes; ``mv`` = ``min_visible``, ``j`` = jitter px, otherwise 0.5 and 1 px). Layouts
(:func:`make_layout`): "seams", 1108 objects of 40–120 px centred on every tile border and corner;
"nuclei", 38 921 objects of 20–40 px, dense (about one overlapping neighbour per object, IoS up to
0.55); "metaphases", 1776 objects of 60–120 px, sparse; "large", 319 objects of 130–300 px (larger
than the 128 px overlap: some are seen whole by no tile). F1 at IoU 0.5 vs ground truth::

    method  metric thr   seams   nuclei  metaph.  large   nuclei mv=.25  seams mv=.25 j=3
    none    -      -     0.6988  0.7430  0.7826   0.7906  0.7222         0.5260
    nms     iou    0.1   1.0000  0.9621  1.0000   1.0000  0.9602         0.9995
    nms     iou    0.3   1.0000  1.0000  1.0000   1.0000  0.9868         0.8356
    nms     iou    0.5   0.9581  0.9902  0.9944   0.9369  0.9612         0.6500
    nms     ios    0.3   1.0000  0.9845  1.0000   1.0000  0.9843         0.9995
    nms     ios    0.4   1.0000  0.9969  1.0000   1.0000  0.9967         0.9986
    nms     ios    0.5   1.0000  0.9998  1.0000   1.0000  0.9998         0.9982   <- default
    nms     ios    0.6   1.0000  1.0000  1.0000   0.9984  0.9997         0.9946
    nms     ios    0.7   1.0000  0.9999  1.0000   0.9755  0.9993         0.9771
    greedy  ios    0.3   1.0000  0.9781  1.0000   1.0000  0.9778         0.9995
    greedy  ios    0.5   1.0000  0.9995  1.0000   1.0000  0.9996         0.9982
    (every threshold 0.1–0.8 × method × metric, and mean IoUs: bench/results/merge-<machine>.json)

IoU must go below the visible fraction of the smallest partial box a detector reports to remove it
(0.1 for a quarter-visible object), and there it merges touching nuclei (0.96); IoS removes
partial boxes at any threshold, and 0.5 has the best mean F1 over the six layouts (vs 0.6:
better on heavy truncation and large objects, 2e-4 worse on dense nuclei). Greedy NMM keeps the
same boxes as NMS by construction; its unions merge touching nuclei into oversized boxes (F1
0.9995 vs 0.9998, mean IoU 0.8955 vs 0.8965) but rebuild objects larger than the overlap from
their parts (mean IoU on "large" 0.983 vs 0.949). NMS + IoS 0.5 is the default; prefer
``method="greedy"`` when objects are larger than the tile overlap.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trtwsi.errors import TrtwsiError

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_METRIC",
    "DEFAULT_THRESHOLD",
    "MergeError",
    "MergeResult",
    "evaluate_detections",
    "make_layout",
    "merge_detections",
    "merge_reference",
    "overlapping_pairs",
    "pair_overlap",
    "simulate_tiled_detections",
    "tile_origins",
]

Method = Literal["nms", "greedy"]
Metric = Literal["iou", "ios"]
BoxMerge = Literal["union", "weighted"]

#: Default merge method (see the module docstring for the measurement behind it).
DEFAULT_METHOD: Method = "nms"
#: Default overlap metric.
DEFAULT_METRIC: Metric = "ios"
#: Default threshold: pairs with ``overlap > DEFAULT_THRESHOLD`` are merged.
DEFAULT_THRESHOLD: float = 0.5

_METHODS = ("nms", "greedy")
_METRICS = ("iou", "ios")
_BOX_MERGES = ("union", "weighted")

# Candidate pairs are generated in chunks of at most this many (bounds peak memory).
_PAIR_CHUNK = 1 << 22
# Vectorized rounds of the greedy selection before finishing sequentially (long chains only).
_MAX_ROUNDS = 64


class MergeError(TrtwsiError, ValueError):
    """Invalid input to the merge (shapes, non-finite values, inverted boxes, unknown option)."""


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
def _check_inputs(boxes, scores, classes, groups, method, metric, threshold, box_merge):
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
    g = None
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise MergeError(f"groups must have shape ({n},) to match boxes, got {g.shape}")
        if n and not np.issubdtype(g.dtype, np.integer):
            raise MergeError(f"groups must be integers, got dtype {g.dtype}")
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
    return b, s, c, g, threshold


def _rank_order(scores: np.ndarray) -> np.ndarray:
    """Input indices in processing order: descending score, ties by ascending index."""
    return np.argsort(-scores, kind="stable")


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
# overlap
# ------------------------------------------------------------------------------------------
def pair_overlap(a: np.ndarray, b: np.ndarray, metric: Metric = "iou") -> np.ndarray:
    """Elementwise overlap of two box arrays that broadcast against each other.

    ``a``, ``b``: ``(..., 4)`` float64 ``(x1, y1, x2, y2)``. Returns float64 of the broadcast
    shape: IoU (``metric="iou"``) or intersection over the smaller area (``"ios"``); 0 where the
    boxes do not intersect with positive area (so a zero-area box has overlap 0 with anything).
    The fast merge and the reference compute it with the same operations, so they agree to the
    last bit (which matters for pairs exactly at the threshold).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return _overlap(*(a[..., k] for k in range(4)), *(b[..., k] for k in range(4)), metric)


def _overlap(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, metric):
    """:func:`pair_overlap` on coordinate columns (float64, broadcastable)."""
    iw = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
    ih = np.minimum(ay2, by2) - np.maximum(ay1, by1)
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    if metric == "iou":
        denom = area_a + area_b - inter
    elif metric == "ios":
        denom = np.minimum(area_a, area_b)
    else:
        raise MergeError(f"metric must be one of {_METRICS}, got {metric!r}")
    out = np.zeros(np.broadcast(inter, denom).shape, dtype=np.float64)
    np.divide(inter, denom, out=out, where=inter > 0)
    return out


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
        box_merge: for ``"greedy"``, ``"union"`` (SAHI) or ``"weighted"`` (score-weighted mean).

    Returns:
        :class:`MergeResult` (output in descending score order, ties by input index).

    Exactly equal to :func:`merge_reference` (same keep, boxes, clusters); O(N log N + P) time
    for P overlapping pairs, no N² memory.
    """
    b, s, c, g, threshold = _check_inputs(
        boxes, scores, classes, groups, method, metric, threshold, box_merge
    )
    n = b.shape[0]
    order = _rank_order(s)
    if n == 0:
        e = np.empty(0, dtype=np.int64)
        return MergeResult(keep=e, boxes=b.copy(), scores=s.copy(), classes=c.copy(), cluster=e)
    bucket = _buckets(c, g, class_aware)
    i, j = overlapping_pairs(b, metric=metric, threshold=threshold, buckets=bucket)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    ri, rj = rank[i], rank[j]
    kept, absorber = _greedy_select(n, np.minimum(ri, rj), np.maximum(ri, rj))
    return _finish(b, s, c, order, kept, absorber, method, box_merge)


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
    box_merge: BoxMerge = "union",
) -> MergeResult:
    """Brute-force O(N²) oracle of :func:`merge_detections` (same arguments and result).

    Visit boxes by descending score (ties: lower index first); the first unvisited box is kept
    and absorbs (``"greedy"``) or suppresses (``"nms"``) every unvisited box of its class/group
    whose overlap with it is ``> threshold``. Meant for tests (N up to a few thousand).
    """
    b, s, c, g, threshold = _check_inputs(
        boxes, scores, classes, groups, method, metric, threshold, box_merge
    )
    n = b.shape[0]
    ov = pair_overlap(b[:, None, :], b[None, :, :], metric)
    same = np.ones((n, n), dtype=bool)
    if class_aware:
        same &= c[:, None] == c[None, :]
    if g is not None:
        same &= g[:, None] == g[None, :]
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


# ------------------------------------------------------------------------------------------
# simulation and evaluation (test and benchmark support: how the defaults were chosen)
# ------------------------------------------------------------------------------------------
def tile_origins(length: int, tile: int, overlap: float) -> np.ndarray:
    """Tile start positions along one axis (level-0 px): stride ``round(tile·(1-overlap))``
    from 0, plus a last tile flush with the far edge so the whole length is covered."""
    stride = max(1, round(tile * (1.0 - overlap)))
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    xs = list(range(0, length - tile + 1, stride))
    if xs[-1] + tile < length:
        xs.append(length - tile)
    return np.asarray(xs, dtype=np.int64)


@dataclass(frozen=True)
class SimulatedDetections:
    """What a detector run tile by tile reports, in level-0 coordinates (M detections)."""

    boxes: np.ndarray  # (M, 4) float64 (x1, y1, x2, y2) level-0 px
    scores: np.ndarray  # (M,) float32
    classes: np.ndarray  # (M,) int64
    gt_index: np.ndarray  # (M,) int64 ground-truth row each detection comes from
    tile_index: np.ndarray  # (M,) int64 tile (row-major over the tile grid)
    visible: np.ndarray  # (M,) float64 fraction of the object's area inside the tile


def simulate_tiled_detections(
    gt_boxes: np.ndarray,
    tile: int,
    overlap: float,
    slide_w: int,
    slide_h: int,
    rng: np.random.Generator,
    jitter_px: float = 1.0,
    min_visible: float = 0.5,
    truncation_penalty: float = 0.3,
    score_noise: float = 0.02,
) -> SimulatedDetections:
    """Detections a perfect-but-jittery detector reports when run tile by tile.

    ``gt_boxes``: ``(N, 5)`` float ``(x1, y1, x2, y2, class)`` level-0 px. Tiles: ``tile`` px
    squares at :func:`tile_origins` on both axes. Every object is clipped to every tile it touches
    and reported there if at least ``min_visible`` of its area is inside the tile. Each report gets
    independent Gaussian jitter (``jitter_px`` sd) on its four coordinates (then clipped to the
    tile), and a score ``s0 + N(0, score_noise) - truncation_penalty·(1 - visible)``, where
    ``s0 ~ U(0.55, 0.95)`` is the object's own confidence, shared by its reports: a detector is
    less sure of a truncated object. Returns :class:`SimulatedDetections` (level-0 px).
    """
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 5)
    n = gt.shape[0]
    xs = tile_origins(slide_w, tile, overlap)
    ys = tile_origins(slide_h, tile, overlap)
    s0 = rng.uniform(0.55, 0.95, n)

    def spans(lo, hi, origins):
        # tiles [o, o + tile) with o < hi and o + tile > lo
        first = np.searchsorted(origins + tile, lo, side="right")
        last = np.searchsorted(origins, hi, side="left")
        return first, np.maximum(last - first, 0)

    fx, nx = spans(gt[:, 0], gt[:, 2], xs)
    fy, ny = spans(gt[:, 1], gt[:, 3], ys)
    cnt = nx * ny
    gi = np.repeat(np.arange(n), cnt)
    k = np.arange(gi.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    tx = fx[gi] + k % nx[gi]
    ty = fy[gi] + k // nx[gi]
    ox = xs[tx].astype(np.float64)
    oy = ys[ty].astype(np.float64)
    g = gt[gi]
    cb = np.stack(
        [
            np.maximum(g[:, 0], ox),
            np.maximum(g[:, 1], oy),
            np.minimum(g[:, 2], ox + tile),
            np.minimum(g[:, 3], oy + tile),
        ],
        axis=1,
    )
    full = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    vis_area = np.clip(cb[:, 2] - cb[:, 0], 0, None) * np.clip(cb[:, 3] - cb[:, 1], 0, None)
    vis = np.divide(vis_area, full, out=np.zeros_like(full), where=full > 0)
    m = vis >= min_visible
    gi, cb, vis, ox, oy = gi[m], cb[m], vis[m], ox[m], oy[m]
    tidx = (ty * xs.size + tx)[m]
    cb = cb + rng.normal(0.0, jitter_px, cb.shape)
    cb[:, [0, 2]] = np.clip(cb[:, [0, 2]], ox[:, None], ox[:, None] + tile)
    cb[:, [1, 3]] = np.clip(cb[:, [1, 3]], oy[:, None], oy[:, None] + tile)
    cb[:, 2] = np.maximum(cb[:, 2], cb[:, 0] + 1e-3)
    cb[:, 3] = np.maximum(cb[:, 3], cb[:, 1] + 1e-3)
    score = s0[gi] + rng.normal(0.0, score_noise, gi.size) - truncation_penalty * (1.0 - vis)
    score = np.clip(score, 0.01, 1.0).astype(np.float32)
    return SimulatedDetections(
        boxes=cb,
        scores=score,
        classes=gt[gi, 4].astype(np.int64),
        gt_index=gi.astype(np.int64),
        tile_index=tidx.astype(np.int64),
        visible=vis,
    )


def make_layout(
    kind: str,
    slide_w: int,
    slide_h: int,
    rng: np.random.Generator,
    *,
    tile: int = 640,
    overlap: float = 0.2,
    n_classes: int = 1,
) -> np.ndarray:
    """Ground-truth layouts for the merge measurement: ``(N, 5)`` ``(x1, y1, x2, y2, class)``.

    ``kind``:
      - ``"nuclei"``: 20–40 px boxes (independent width/height), dense: centres on a ±7 px
        jittered 32.3 px lattice, so neighbours touch and sometimes overlap a little, as in tissue.
      - ``"metaphases"``: 60–120 px boxes, sparse (±80 px jittered 301.7 px lattice).
      - ``"large"``: 130–300 px boxes, sparse (±150 px jittered 701.3 px lattice): larger than
        the tile overlap, so some are seen whole by no tile.
      - ``"seams"``: 40–120 px boxes centred on tile borders (both axes) and on tile corners,
        offset by up to ±20 px: the worst case of a tiled detector.
    Objects are kept inside the slide. Classes are drawn uniformly from ``range(n_classes)``.
    """
    if kind == "nuclei":
        pitch, lo, hi, jit = 32.3, 20.0, 40.0, 7.0
    elif kind == "metaphases":
        pitch, lo, hi, jit = 301.7, 60.0, 120.0, 80.0
    elif kind == "large":
        pitch, lo, hi, jit = 701.3, 130.0, 300.0, 150.0
    elif kind == "seams":
        lo, hi = 40.0, 120.0
    else:
        raise MergeError(
            f"layout kind must be 'nuclei', 'metaphases', 'large' or 'seams', got {kind!r}"
        )
    if kind == "seams":
        xs = tile_origins(slide_w, tile, overlap)
        ys = tile_origins(slide_h, tile, overlap)
        # the seams: both edges of every tile overlap band
        sx = np.unique(np.r_[xs[1:], xs[:-1] + tile]).astype(np.float64)
        sy = np.unique(np.r_[ys[1:], ys[:-1] + tile]).astype(np.float64)
        centres = [np.stack(np.meshgrid(sx, sy), -1).reshape(-1, 2)]  # corners
        mids_x = (np.r_[0.0, sx] + np.r_[sx, slide_w]) / 2  # between vertical seams
        mids_y = (np.r_[0.0, sy] + np.r_[sy, slide_h]) / 2
        centres.append(np.stack(np.meshgrid(sx, mids_y), -1).reshape(-1, 2))  # vertical seams
        centres.append(np.stack(np.meshgrid(mids_x, sy), -1).reshape(-1, 2))  # horizontal
        c = np.concatenate(centres)
        c = c + rng.uniform(-20, 20, c.shape)
    else:
        # a lattice pitch and phase unrelated to the tile grid, so seams cut objects anywhere
        gx = np.arange(rng.uniform(0, pitch), slide_w, pitch)
        gy = np.arange(rng.uniform(0, pitch), slide_h, pitch)
        c = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        c = c + rng.uniform(-jit, jit, c.shape)
    wh = rng.uniform(lo, hi, c.shape)
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
    inside = (
        (boxes[:, 0] >= 0)
        & (boxes[:, 1] >= 0)
        & (boxes[:, 2] <= slide_w)
        & (boxes[:, 3] <= slide_h)
    )
    boxes = boxes[inside]
    if kind == "seams":  # drop the rare colliding pair so every object is distinct
        _, j = overlapping_pairs(boxes, metric="iou", threshold=0.0)
        boxes = np.delete(boxes, np.unique(j), axis=0)
    cls = rng.integers(0, n_classes, boxes.shape[0]).astype(np.float64)
    return np.concatenate([boxes, cls[:, None]], axis=1)


def evaluate_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    gt_boxes: np.ndarray,
    iou: float = 0.5,
) -> dict:
    """Precision/recall of detections vs ground truth (greedy by score, COCO-style matching).

    ``boxes``: ``(M, 4)``; ``scores``, ``classes``: ``(M,)``; ``gt_boxes``: ``(N, 5)``
    ``(x1, y1, x2, y2, class)``; all in the same frame. A detection is a true positive when its
    best-IoU unmatched ground-truth object of the same class has IoU >= ``iou``. Returns a dict:
    ``tp, fp, fn, precision, recall, f1, mean_iou`` (of the true positives).
    """
    p = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 5)
    m, n = p.shape[0], gt.shape[0]
    cls_p = np.asarray(classes, dtype=np.int64).reshape(-1)
    allb = np.concatenate([p, gt[:, :4]])
    bucket = np.concatenate([cls_p, gt[:, 4].astype(np.int64)])
    i, j = overlapping_pairs(allb, metric="iou", threshold=0.0, buckets=bucket)
    cross = (i < m) & (j >= m)
    pi, gj = i[cross], j[cross] - m
    ov = pair_overlap(p[pi], gt[gj, :4], "iou")
    keep = ov >= iou
    pi, gj, ov = pi[keep], gj[keep], ov[keep]
    srt = np.lexsort((-ov, pi))
    pi, gj, ov = pi[srt], gj[srt], ov[srt]
    starts = np.searchsorted(pi, np.arange(m), side="left")
    stops = np.searchsorted(pi, np.arange(m), side="right")
    matched = np.zeros(n, dtype=bool)
    tp_iou = []
    for d in _rank_order(np.asarray(scores, dtype=np.float64)).tolist():
        for k in range(starts[d], stops[d]):
            g = gj[k]
            if not matched[g]:
                matched[g] = True
                tp_iou.append(ov[k])
                break
    tp = len(tp_iou)
    fp, fn = m - tp, n - tp
    precision = tp / m if m else 1.0
    recall = tp / n if n else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_iou": float(np.mean(tp_iou)) if tp_iou else 0.0,
    }
