"""The seam merge of a runtime's slides in a process of its own, off the runtime's GIL.

A :class:`~trtwsi.runtime.seams.SeamMerger` drain is NumPy work (sorts, unique, gathers) whose
calls release and retake the GIL: beside the pipeline's Python threads (the launch loop,
reader and planner threads) each retake waits for a switch interval. On 2 EPYC cores the drains
of a 166k-row, 3,675-tile slide took 0.25 s alone, 6.4 s beside one thread spinning in Python
and 24 s beside three, and 0.15–0.18 s in the process (``python bench/bench_merge.py
--seams-contention``; spinning threads are the worst case); on the H100 host the 4 Gpx
slide's drains took 1.1–1.4 s of thread time for about 0.15 s of work. :class:`SeamProcess`
runs the mergers in one spawned process: the merge thread only pickles each drain's new rows
(``(M, 8)`` float64, level-0 px, as :mod:`~trtwsi.runtime.seams` takes them) and the tiles that
came back, and the finisher waits for the result. Same code, same rows, so the same
:class:`~trtwsi.merge.MergeResult` as in-process. Nothing is lost if the process fails: the
slide's result is then None and the finisher merges all rows itself, as for a slide whose early
merge turned itself off.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from types import SimpleNamespace

import numpy as np

from trtwsi.runtime.seams import SeamMerger, TileReturns

__all__ = ["RemoteSeamMerger", "SeamProcess"]

#: the worker's mergers, by slide key
_MERGERS: dict[int, SeamMerger] = {}


def _open(key: int, geometry: dict, n_models: int, merge_opts: dict) -> None:
    grids = {
        size: [SimpleNamespace(tiles=t) for t in tiles] for size, tiles in geometry["grids"].items()
    }
    plan = SimpleNamespace(
        n_tiles=geometry["n_tiles"], grids=grids, tile_base=geometry["tile_base"]
    )
    rows: list[list[np.ndarray]] = [[] for _ in range(n_models)]
    _MERGERS[key] = SeamMerger(plan, rows, merge_opts, every=1)


def _feed(key: int, tiles: np.ndarray, new_rows: list[list[np.ndarray]]) -> None:
    m = _MERGERS[key]
    try:
        for mi, arrays in enumerate(new_rows):
            m.rows[mi].extend(arrays)
        m.returned(tiles)
        m.drain()
    except BaseException:
        m.broken = True  # its result is then None: the finisher merges all rows itself
        raise


def _finish(key: int, n_rows: list[int]):
    """Per model the merge of all its rows (or None), and the drains' seconds."""
    m = _MERGERS.pop(key)
    return [m.result(mi, n) for mi, n in enumerate(n_rows)], m.seconds


def _drop(key: int) -> None:
    _MERGERS.pop(key, None)


def _open_slides() -> int:
    """How many slides the process holds state for (tests: none once they are finished)."""
    return len(_MERGERS)


def _geometry(plan) -> dict:
    """What :func:`~trtwsi.runtime.seams.tile_neighbours` reads of a plan, picklable."""
    return {
        "n_tiles": plan.n_tiles,
        "grids": {
            size: [np.asarray(g.tiles, dtype=np.float64).reshape(-1, 4) for g in grids]
            for size, grids in plan.grids.items()
        },
        "tile_base": {size: list(bases) for size, bases in plan.tile_base.items()},
    }


class SeamProcess:
    """One spawned process merging seams for a runtime's slides (started now, without waiting
    for it: slides submitted before it is up wait in its queue)."""

    def __init__(self):
        from trtwsi._util.spawn import start_pool

        self._pool, _ = start_pool(1)
        self._keys = itertools.count()
        self.failed: BaseException | None = None

    def merger(
        self, plan, rows: list, merge_opts: dict, every: int | None = None
    ) -> RemoteSeamMerger:
        """A merger for one slide, the interface of :class:`~trtwsi.runtime.seams.SeamMerger`
        (``returned``, ``drain``, ``result``, ``seconds``, ``every``, ``close``)."""
        return RemoteSeamMerger(self, next(self._keys), plan, rows, merge_opts, every)

    def submit(self, fn, *args):
        """``fn(*args)`` in the process (in submission order: one worker), or None once it
        has failed."""
        if self.failed is not None or self._pool is None:
            return None
        try:
            return self._pool.submit(fn, *args)
        except Exception as e:  # BrokenProcessPool, RuntimeError after shutdown
            self.fail(e)
            return None

    def fail(self, e: BaseException) -> None:
        if self.failed is None:
            self.failed = e
            warnings.warn(
                f"the seam-merge process failed ({type(e).__name__}: {e}); slides merge their "
                "seams in this process instead",
                RuntimeWarning,
                stacklevel=3,
            )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class RemoteSeamMerger(TileReturns):
    """One slide's seam merge, run by a :class:`SeamProcess`. The pipeline thread calls
    :meth:`returned` per batch, a merge thread :meth:`drain` (which ships the rows and tiles
    that came back since the last drain), the finisher :meth:`result`."""

    def __init__(self, proc: SeamProcess, key: int, plan, rows: list, merge_opts: dict, every=None):
        super().__init__(plan, rows, every)
        self._proc = proc
        self._key = key
        self._taken = [0] * len(rows)
        self._lock = threading.Lock()
        self._results: list | None = None
        self._closed = False
        #: seconds the process spent merging, and the finisher waited for its result (known
        #: once :meth:`result` returned)
        self.seconds = 0.0
        self.wait_seconds = 0.0
        self._opened = proc.submit(_open, key, _geometry(plan), len(rows), dict(merge_opts))

    def _ship(self, all_rows: bool) -> None:
        """Send the tiles returned so far and their rows (``all_rows``: every row). Lock held."""
        taken = self._take_returned()
        if all_rows:
            counts = [len(r) for r in self.rows]
        elif taken is not None:
            counts = taken[1]
        else:
            return
        tiles = taken[0] if taken is not None else np.empty(0, dtype=np.int64)
        new = [
            self.rows[mi][t:c] for mi, (t, c) in enumerate(zip(self._taken, counts, strict=True))
        ]
        self._taken = [max(t, c) for t, c in zip(self._taken, counts, strict=True)]
        self._proc.submit(_feed, self._key, tiles, new)

    def drain(self) -> None:
        """Ship what came back since the last drain (a merge thread calls it)."""
        with self._lock:
            self._scheduled = False
            if not self._closed:
                self._ship(all_rows=False)

    def result(self, mi: int, n_rows: int):
        """Model ``mi``'s merge of its ``n_rows`` rows (all of them: call it once the slide is
        finished), or None (the early merge turned itself off, or the process failed: merge
        the rows at once)."""
        with self._lock:
            if self._results is None:
                self._results = self._collect()
            res = self._results[mi] if mi < len(self._results) else None
        if res is None or len(res.cluster) != n_rows:
            return None
        return res

    def _collect(self) -> list:
        if self._closed or self._opened is None:
            return []
        self._ship(all_rows=True)
        n_rows = [sum(len(a) for a in r) for r in self.rows]
        fut = self._proc.submit(_finish, self._key, n_rows)
        self._closed = True
        if fut is None:
            return []
        t0 = time.perf_counter()
        try:
            results, self.seconds = fut.result()
        except Exception as e:  # the process died, or a drain failed in it
            self._proc.fail(e)
            self._proc.submit(_drop, self._key)
            return []
        self.wait_seconds = time.perf_counter() - t0
        return results

    def close(self) -> None:
        """Drop the slide's state in the process (a slide that failed before its result)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._proc.submit(_drop, self._key)
