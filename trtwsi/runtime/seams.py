"""The seam merge of one slide while its tiles come back, so none of it waits for the last batch.

Rows in: per model, the slide's ``(M, 8)`` float64 arrays ``x1 y1 x2 y2 score class section
tile`` (level-0 px; ``tile``: the slide-wide tile id of :class:`~trtwsi.plan.SlidePlan`), in the
order the pipeline appends them to ``run.rows``. Out: per model, the
:class:`~trtwsi.merge.MergeResult` that one :func:`~trtwsi.merge.merge_detections` of all the
rows (``groups=section``, ``tiles=tile``) gives, identical in every field (the boxes of
``box_merge="weighted"`` to the last bit of float rounding: their sums run in another order).

Why it is exact. Two boxes affect each other's fate only through a chain of merge edges
(:func:`~trtwsi.merge.merge_edges`), so a merge splits along the connected components of the
edge graph (:func:`~trtwsi.merge.combine_merges`). A box lies inside its tile (the decode clips
to the tile), so it can gain an edge only to a box of a tile that touches its own. A tile is
*closed* once it and every tile touching it are back; a component all of whose boxes are in
closed tiles can gain no box, and is merged at once. Every box is checked against its tile
when it arrives; a box outside it (which the decode never makes) turns the early merge off for
the slide, and the end merges all rows at once as before.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from trtwsi.merge import (
    DEFAULT_METHOD,
    DEFAULT_METRIC,
    DEFAULT_THRESHOLD,
    MergeResult,
    combine_merges,
    merge_edges,
    merge_over_edges,
    overlapping_pairs,
)

__all__ = ["SeamMerger", "TileReturns", "components", "tile_neighbours"]

#: A box may reach this far (level-0 px) past its tile's edge and still count as inside it
#: (float rounding of the decode's clip); tiles this close count as touching.
_SLACK = 1.0


def tile_neighbours(plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles of ``plan`` and which touch which.

    Returns ``extent`` ``(T, 4)`` float64 ``x1 y1 x2 y2`` level-0 px per slide-wide tile id,
    and a CSR list ``(ptr (T + 1,), idx)`` int64 of each tile's neighbours *including itself*:
    the tiles of the same grid whose extents, grown by ``_SLACK`` px, overlap. Tiles of
    different grids (sections, input sizes) never merge, so they are never neighbours.
    """
    n = plan.n_tiles
    extent = np.zeros((n, 4), dtype=np.float64)
    src, dst = [np.arange(n, dtype=np.int64)], [np.arange(n, dtype=np.int64)]
    for size, grids in plan.grids.items():
        for grid, base in zip(grids, plan.tile_base[size], strict=True):
            t = np.asarray(grid.tiles, dtype=np.float64).reshape(-1, 4)
            ext = np.column_stack([t[:, 0], t[:, 1], t[:, 0] + t[:, 2], t[:, 1] + t[:, 3]])
            extent[base : base + len(t)] = ext
            grown = ext + np.array([-_SLACK, -_SLACK, _SLACK, _SLACK])
            i, j = overlapping_pairs(grown, metric="iou", threshold=0.0)
            src += [i + base, j + base]
            dst += [j + base, i + base]
    s, d = np.concatenate(src), np.concatenate(dst)
    order = np.argsort(s, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(s, minlength=n), out=ptr[1:])
    return extent, ptr, d[order]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of the graph of ``n`` nodes and edges ``(i, j)`` (int64): per
    node ``(n,)`` int64, the smallest node of its component. Hooks roots onto smaller roots
    across edges and compresses paths until every edge lies inside one component (a few
    rounds for the short chains of duplicate boxes; SciPy's csgraph costs 0.25 s to import,
    in the middle of the first slide)."""
    label = np.arange(n, dtype=np.int64)
    while i.size:
        li, lj = label[i], label[j]
        cross = li != lj
        if not cross.any():
            break
        i, j, li, lj = i[cross], j[cross], li[cross], lj[cross]
        np.minimum.at(label, np.maximum(li, lj), np.minimum(li, lj))  # roots hook downwards
        while True:
            up = label[label]
            if np.array_equal(up, label):
                break
            label = up
    return label


class _ModelState:
    """Rows of one model not merged yet (``open``, in arrival order with their global row
    ``index``) and the merged ``pieces`` ``(global rows, MergeResult)``."""

    def __init__(self):
        self.taken = 0  # arrays of run.rows[mi] ingested
        self.n_rows = 0  # rows ingested
        self.index = np.empty(0, dtype=np.int64)
        self.open = np.empty((0, 8), dtype=np.float64)
        self.pieces: list[tuple[np.ndarray, MergeResult]] = []


class TileReturns:
    """The tiles of one slide that came back since the last drain, and when to drain: the
    bookkeeping :class:`SeamMerger` and the seam-merge process's
    :class:`~trtwsi.runtime.seam_process.RemoteSeamMerger` share.

    ``rows``: the run's per-model lists of row arrays (appended to by the pipeline before it
    reports their tiles); ``plan``: the slide's plan (its ``n_tiles``); ``every``: see
    :attr:`every`.
    """

    #: seconds the finisher waited for a merge done elsewhere (None: merged in this process)
    wait_seconds: float | None = None
    #: also drain once as many tiles came back as are still to come (see :meth:`returned`).
    #: Off: on an H100 host (bench/results/pipeline-nvidia-h100-ab-sparse-tail.json) it cut the
    #: 1 Gpx slide's merge after the last batch from 26-32 ms to 12-20 ms but raised the 4 Gpx
    #: slide's from 33-93 ms to 65-163 ms: each drain recomputes the edges of every open row,
    #: and under the readers' CPU load the late drains outlast the last batch (on 2 idle cores,
    #: bench/bench_seam_tail.py, it helped both)
    tail_drains: bool = False

    def __init__(self, plan, rows: list, every: int | None = None):
        self.rows = rows
        self._pending: deque = deque()
        self._scheduled = False
        self._since = 0  # tiles back since the last drain was scheduled
        self._left = int(plan.n_tiles)  # tiles not back yet
        #: tiles back between drains (default: an eighth of the slide, at least 256)
        self.every = max(256, plan.n_tiles // 8) if every is None else max(1, int(every))

    # --- pipeline thread ---------------------------------------------------------------------
    def returned(self, tiles: np.ndarray) -> bool:
        """The rows of ``tiles`` (slide-wide ids) are in ``rows`` now. True when the caller
        should schedule a drain: none is scheduled, and ``every`` tiles came back since the
        last one was (fewer, larger drains: each one recomputes the edges of the rows still
        open, and its Python holds the pipeline thread's GIL) or, with :attr:`tail_drains`,
        at least as many as are still to come (that halves the undrained tiles as the slide
        ends, so the finisher merges about the last batch's rows)."""
        tiles = np.asarray(tiles, dtype=np.int64)
        self._pending.append((tiles, [len(r) for r in self.rows]))
        self._since += len(tiles)
        self._left -= len(tiles)
        due = min(self.every, max(self._left, 1)) if self.tail_drains else self.every
        if self._scheduled or self._since < due:
            return False
        self._scheduled, self._since = True, 0
        return True

    # --- merge thread ------------------------------------------------------------------------
    def _take_returned(self) -> tuple[np.ndarray, list[int]] | None:
        """The tiles reported since the last call (int64) and, per model, how many row arrays
        they had appended by then; None when none were. Call with the drain's lock held (the
        pipeline thread appends meanwhile)."""
        items = []
        while self._pending:
            items.append(self._pending.popleft())
        if not items:
            return None
        tiles = np.concatenate([t for t, _ in items])
        return tiles, np.max([c for _, c in items], axis=0).tolist()


class SeamMerger(TileReturns):
    """Merges one slide's rows component by component as their tiles close (see the module
    docstring). The pipeline thread calls :meth:`returned` per batch (cheap), a merge thread
    :meth:`drain`, the finisher :meth:`result`; all three are safe to call concurrently.

    ``rows``: the run's per-model lists of row arrays (appended to by the pipeline);
    ``merge_opts``: :class:`~trtwsi.plan.SlideOptions` ``merge`` (method, metric, threshold,
    class_aware, box_merge). ``every``: see :attr:`every`.
    """

    def __init__(self, plan, rows: list, merge_opts: dict, every: int | None = None):
        opts = dict(merge_opts)
        self.method = opts.pop("method", DEFAULT_METHOD)
        self.metric = opts.pop("metric", DEFAULT_METRIC)
        self.threshold = float(opts.pop("threshold", DEFAULT_THRESHOLD))
        self.class_aware = bool(opts.pop("class_aware", True))
        self.box_merge = opts.pop("box_merge", "union")
        if opts:
            raise TypeError(f"unknown merge options {sorted(opts)}")
        super().__init__(plan, rows, every)
        self.extent, self._ptr, self._idx = tile_neighbours(plan)
        self._need = np.diff(self._ptr)  # per tile: itself and its neighbours not back yet
        self._models = [_ModelState() for _ in rows]
        self._lock = threading.Lock()
        #: a box outside its tile was seen: nothing more merges early; :meth:`result` says None
        self.broken = False
        #: seconds spent in :meth:`drain`
        self.seconds = 0.0

    # --- merge thread ------------------------------------------------------------------------
    def drain(self) -> None:
        """Take in every returned batch so far and merge the components that closed."""
        t0 = time.perf_counter()
        with self._lock:
            self._scheduled = False
            self._drain_locked()
            self.seconds += time.perf_counter() - t0  # waits for the lock included

    def _drain_locked(self) -> None:
        taken = self._take_returned()
        if taken is None:
            return
        tiles, snap = taken
        starts, stops = self._ptr[tiles], self._ptr[tiles + 1]
        lengths = stops - starts
        flat = np.repeat(stops - lengths.cumsum(), lengths) + np.arange(int(lengths.sum()))
        np.subtract.at(self._need, self._idx[flat], 1)
        for mi, st in enumerate(self._models):
            self._ingest(st, self.rows[mi][st.taken : snap[mi]])
            st.taken = max(st.taken, snap[mi])
            if not self.broken:
                self._close(st)

    def _ingest(self, st: _ModelState, arrays: list) -> None:
        arrays = [a for a in arrays if len(a)]
        if not arrays:
            return
        new = np.concatenate(arrays)
        ext = self.extent[new[:, 7].astype(np.int64)]
        inside = (new[:, :2] >= ext[:, :2] - _SLACK) & (new[:, 2:4] <= ext[:, 2:] + _SLACK)
        if not inside.all():
            self.broken = True
        st.index = np.concatenate([st.index, np.arange(st.n_rows, st.n_rows + len(new))])
        st.open = np.concatenate([st.open, new])
        st.n_rows += len(new)

    def _edges(self, d: np.ndarray):
        return merge_edges(
            d[:, :4], d[:, 5].astype(np.int64), d[:, 6].astype(np.int64),
            d[:, 7].astype(np.int64), metric=self.metric, threshold=self.threshold,
            class_aware=self.class_aware,
        )  # fmt: skip

    def _merge(self, d: np.ndarray, i: np.ndarray, j: np.ndarray) -> MergeResult:
        return merge_over_edges(
            d[:, :4], d[:, 4], d[:, 5].astype(np.int64), i, j,
            method=self.method, box_merge=self.box_merge,
        )  # fmt: skip

    def _close(self, st: _ModelState) -> None:
        """Merge the open rows whose whole component lies in closed tiles."""
        d = st.open
        if not len(d):
            return
        closed = self._need[d[:, 7].astype(np.int64)] == 0
        if not closed.any():
            return
        i, j = self._edges(d)
        n = len(d)
        label = components(n, i, j)
        still_open = np.zeros(n, dtype=bool)
        still_open[label[~closed]] = True
        done = ~still_open[label]
        if not done.any():
            return
        sel = np.flatnonzero(done)
        local = np.full(n, -1, dtype=np.int64)
        local[sel] = np.arange(sel.size)
        m = done[i]  # components are closed under edges: both ends are done, or neither
        st.pieces.append((st.index[sel], self._merge(d[sel], local[i[m]], local[j[m]])))
        st.index, st.open = st.index[~done], d[~done]

    # --- finisher ----------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to free (the interface of
        :class:`~trtwsi.runtime.seam_process.RemoteSeamMerger`, which frees its process' state)."""

    def result(self, mi: int, n_rows: int) -> MergeResult | None:
        """The merge of model ``mi``'s ``n_rows`` rows (every row of the slide: call it once
        the slide is finished), or None when the early merge was turned off (then merge the
        rows at once)."""
        with self._lock:
            self._drain_locked()
            st = self._models[mi]
            self._ingest(st, self.rows[mi][st.taken :])
            st.taken = len(self.rows[mi])
            if self.broken or st.n_rows != n_rows:
                return None
            if len(st.open):  # what is left: whole components, whatever the tiles say
                d = st.open
                i, j = self._edges(d)
                st.pieces.append((st.index, self._merge(d, i, j)))
                st.index, st.open = st.index[:0], d[:0]
            return combine_merges(n_rows, st.pieces)
