"""The seam merge in a process of its own (runtime/seam_process.py) gives what the in-process
SeamMerger gives (one merge of all rows), and a dead process loses nothing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tests.runtime.test_seams import OPTIONS, _feed, _same, _slide, _want
from trtwsi.runtime.seam_process import SeamProcess


@pytest.fixture(scope="module")
def proc():
    p = SeamProcess()
    yield p
    p.close()


@pytest.mark.parametrize("opts", OPTIONS)
def test_process_merge_equals_one_merge(proc, opts):
    """Two models, tiles back shuffled in batches, drains at random moments: every field of
    every model's result equals merge_detections over all rows; the process did the drains."""
    for seed in range(2):
        rng = np.random.default_rng(seed)
        plan, per_tile = _slide(rng, 900)
        order = rng.permutation(plan.n_tiles) if seed else np.arange(plan.n_tiles)
        rows: list = [[], []]
        merger = proc.merger(plan, rows, opts, every=int(rng.integers(1, 60)))
        _feed(merger, rows, per_tile, order, int(rng.integers(3, 40)), rng, 0.3)
        for mi in range(2):
            want, total = _want(rows[mi], opts)
            got = merger.result(mi, total)
            assert got is not None
            _same(got, want, opts.get("box_merge") == "weighted")
        assert merger.seconds > 0
        assert merger.result(0, total + 1) is None  # not every row: merge them at once
    assert proc.failed is None


def test_concurrent_drains_ship_every_row_once(proc):
    """The pipeline thread reports batches while two merge threads drain, as in the runtime."""
    rng = np.random.default_rng(11)
    plan, (per_tile_640, _) = _slide(rng, 1500)
    rows: list = [[]]
    merger = proc.merger(plan, rows, {}, every=1)
    threads = []
    for k in range(0, plan.n_tiles, 5):
        tiles = np.arange(k, min(k + 5, plan.n_tiles))
        got = [per_tile_640[t] for t in tiles if t in per_tile_640]
        rows[0].append(np.concatenate(got) if got else np.empty((0, 8)))
        if merger.returned(tiles):
            threads.append(threading.Thread(target=merger.drain))
            threads[-1].start()
    for t in threads:
        t.join()
    want, total = _want(rows[0], {})
    _same(merger.result(0, total), want)


def test_a_box_outside_its_tile_gives_none(proc):
    rng = np.random.default_rng(5)
    plan, _ = _slide(rng, 10)
    rows: list = [[]]
    merger = proc.merger(plan, rows, {})
    x, y, w, _ = plan.grids[640][0].tiles[0]
    rows[0].append(np.array([[x + w - 10, y, x + w + 40, y + 30, 0.9, 0, 0, 0]], dtype=float))
    merger.returned(np.array([0]))
    merger.drain()
    assert merger.result(0, 1) is None and proc.failed is None


def test_closed_slides_leave_nothing_in_the_process(proc):
    from trtwsi.runtime import seam_process

    rng = np.random.default_rng(2)
    plan, per_tile = _slide(rng, 200)
    rows: list = [[], []]
    merger = proc.merger(plan, rows, {})
    _feed(merger, rows, per_tile, np.arange(plan.n_tiles), 16, rng, 0.5)
    assert proc.submit(seam_process._open_slides).result(timeout=60) == 1
    merger.close()  # a slide that failed before its result
    merger.close()
    assert merger.result(0, 0) is None
    alive = proc.submit(seam_process._open_slides).result(timeout=60)
    assert alive == 0


def test_a_dead_process_loses_nothing():
    """The process is killed while a slide's tiles come back: the result is None (the
    finisher merges the rows itself), one warning says why, later slides skip the process."""
    p = SeamProcess()
    try:
        rng = np.random.default_rng(3)
        plan, per_tile = _slide(rng, 300)
        rows: list = [[], []]
        merger = p.merger(plan, rows, {}, every=4)
        half = plan.n_tiles // 2
        _feed(merger, rows, per_tile, np.arange(half), 8, rng, 0.0)
        p.submit(len, []).result(timeout=60)  # the process is up
        for proc in list(p._pool._processes.values()):
            proc.kill()
            proc.join(10)
        with pytest.warns(RuntimeWarning, match="seam-merge process failed") as seen:
            _feed(merger, rows, per_tile, np.arange(half, plan.n_tiles), 8, rng, 0.0)
            assert merger.result(0, sum(len(r) for r in rows[0])) is None
        assert len(seen) == 1
        assert p.failed is not None
        later = p.merger(plan, [[]], {})
        assert later.result(0, 0) is None
    finally:
        p.close()
