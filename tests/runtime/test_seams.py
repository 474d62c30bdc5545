"""The seam merge while tiles come back (runtime/seams.py) equals one merge of all rows."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest

from trtwsi.merge import merge_detections
from trtwsi.runtime.seams import SeamMerger, tile_neighbours
from trtwsi.synthetic.tiled import rows_by_tile, simulate_tiled_detections, tile_origins

#: the test slide's grids: (section, input size, x0, y0, w, h, tiles kept: all or 70 %)
GRIDS = [
    (0, 640, 0, 0, 5000, 3600, False),
    (1, 640, 6000, 0, 3000, 4000, True),
    (0, 320, 0, 0, 2000, 1500, False),
    (1, 320, 6000, 0, 10, 10, False),
]


def _slide(rng, n_objects):
    """A plan of two sections (the second with tiles dropped as glass) and a second input size
    (grids as ``GRIDS``, slide-wide tile ids as plan_slide numbers them), and per model (input
    size) its rows per tile id: ``n_objects`` objects of 8–160 px reported by a jittery
    detector (``simulate_tiled_detections``: clipped to every tile that sees a tenth of them),
    scores rounded to 0.01 so that ties happen."""
    xy = rng.uniform(0, 9000, (n_objects, 2))
    gt = np.column_stack(
        [xy, xy + rng.uniform(8, 160, (n_objects, 2)), rng.integers(0, 3, n_objects)]
    )
    grids: dict = {640: [], 320: []}
    bases: dict = {640: [], 320: []}
    per_tile: dict = {640: {}, 320: {}}
    base = 0
    for sec, size, x0, y0, w, h, some in GRIDS:
        xs, ys = tile_origins(w, size, 0.2) + x0, tile_origins(h, size, 0.2) + y0
        lattice = np.array([(x, y, size, size) for y in ys for x in xs], dtype=np.int64)
        keep = np.arange(len(lattice))
        if some:
            keep = np.sort(rng.choice(len(lattice), int(len(lattice) * 0.7), replace=False))
        sim = simulate_tiled_detections(
            gt - [x0, y0, x0, y0, 0], size, 0.2, w, h, rng, jitter_px=2.0, min_visible=0.1
        )
        sim = SimpleNamespace(**{**sim.__dict__, "scores": np.round(sim.scores, 2)})
        per_tile[size].update(rows_by_tile(sim, (x0, y0), sec, base, keep))
        grids[size].append(SimpleNamespace(tiles=lattice[keep]))
        bases[size].append(base)
        base += len(keep)
    plan = SimpleNamespace(
        grids=grids, tile_base=bases, targets=[(0, None), (1, None)], n_tiles=base
    )
    return plan, [per_tile[640], per_tile[320]]


def _feed(merger, rows, per_tile, order, batch, rng, drains):
    """Append each batch's rows like the pipeline (one array per batch) and report its tiles;
    drain at random moments."""
    for k in range(0, len(order), batch):
        tiles = order[k : k + batch]
        for mi, model_rows in enumerate(per_tile):
            got = [model_rows[t] for t in tiles if t in model_rows]
            rows[mi].append(np.concatenate(got) if got else np.empty((0, 8)))
        if merger.returned(np.asarray(tiles)) or rng.random() < drains:
            merger.drain()


def _want(rows, opts):
    d = np.concatenate([r for r in rows if len(r)])
    return merge_detections(
        d[:, :4], d[:, 4], d[:, 5].astype(np.int64), groups=d[:, 6].astype(np.int64),
        tiles=d[:, 7].astype(np.int64), **opts,
    ), len(d)  # fmt: skip


def _same(got, want, weighted=False):
    for f in ("keep", "cluster", "scores", "classes", "boxes"):
        if f == "boxes" and weighted:  # weighted means: sums in another order, ≤ 1 ulp apart
            np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-14, atol=0)
        else:
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)


OPTIONS = [
    {},
    {"method": "greedy", "metric": "ios", "threshold": 0.3},
    {"method": "greedy", "box_merge": "weighted", "metric": "iou", "threshold": 0.1},
    {"class_aware": False, "threshold": 0.0},
]


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("seed", range(4))
def test_merge_while_tiles_come_back_equals_one_merge(seed, opts):
    """Two models (one per input size), tiles back in chunk order or shuffled, in batches of
    several sizes: every field of every model's result equals merge_detections over all rows,
    and in order, most rows were merged before the last batch."""
    rng = np.random.default_rng(seed)
    plan, per_tile = _slide(rng, 900)
    n = plan.n_tiles
    order = np.arange(n) if seed % 2 == 0 else rng.permutation(n)
    rows: list = [[], []]
    merger = SeamMerger(plan, rows, opts, every=int(rng.integers(1, 60)))
    _feed(merger, rows, per_tile, order[:-8], int(rng.integers(3, 40)), rng, 0.3)
    merger.drain()
    early = sum(len(idx) for idx, _ in merger._models[0].pieces)
    _feed(merger, rows, per_tile, order[-8:], 8, rng, 0.0)
    for mi in range(2):
        want, total = _want(rows[mi], opts)
        got = merger.result(mi, total)
        assert got is not None and not merger.broken
        _same(got, want, opts.get("box_merge") == "weighted")
    if seed % 2 == 0:  # in order, all but the last rows of tiles close early
        assert early > 0.5 * sum(len(r) for r in rows[0])


def test_concurrent_drains_and_result():
    """The pipeline thread reports batches while two merge threads drain (as the runtime
    does): the result is still exactly one merge of all rows."""
    rng = np.random.default_rng(11)
    plan, (per_tile_640, _) = _slide(rng, 1500)
    per_tile = [per_tile_640]
    rows: list = [[]]
    merger = SeamMerger(plan, rows, {}, every=1)
    threads = []
    for k in range(0, plan.n_tiles, 5):
        tiles = np.arange(k, min(k + 5, plan.n_tiles))
        got = [per_tile[0][t] for t in tiles if t in per_tile[0]]
        rows[0].append(np.concatenate(got) if got else np.empty((0, 8)))
        if merger.returned(tiles):
            threads.append(threading.Thread(target=merger.drain))
            threads[-1].start()
    want, total = _want(rows[0], {})
    got = merger.result(0, total)
    for t in threads:
        t.join()
    _same(got, want)


def test_a_box_outside_its_tile_turns_the_early_merge_off():
    """The early merge relies on boxes lying inside their tiles; a row that does not makes
    result() say None (the finisher then merges all rows at once)."""
    rng = np.random.default_rng(5)
    plan, _ = _slide(rng, 10)
    rows: list = [[]]
    merger = SeamMerger(plan, rows, {})
    x, y, w, _ = plan.grids[640][0].tiles[0]
    rows[0].append(np.array([[x + w - 10, y, x + w + 40, y + 30, 0.9, 0, 0, 0]], dtype=float))
    merger.returned(np.array([0]))
    merger.drain()
    assert merger.broken and merger.result(0, 1) is None


def test_tile_neighbours_are_the_touching_tiles_of_one_grid():
    rng = np.random.default_rng(0)
    plan, _ = _slide(rng, 10)
    extent, ptr, idx = tile_neighbours(plan)
    grid_of = np.concatenate(
        [np.full(len(g.tiles), k) for k, g in enumerate(plan.grids[640] + plan.grids[320])]
    )
    for t in range(plan.n_tiles):
        nb = set(idx[ptr[t] : ptr[t + 1]].tolist())
        a = extent[t]
        touch = {
            u for u in range(plan.n_tiles)
            if grid_of[u] == grid_of[t]
            and extent[u, 0] <= a[2] + 2 and extent[u, 2] >= a[0] - 2
            and extent[u, 1] <= a[3] + 2 and extent[u, 3] >= a[1] - 2
        }  # fmt: skip
        assert nb == touch, t


@pytest.mark.parametrize("seed", range(6))
def test_components_equal_scipys(seed):
    """Random graphs (chains, stars, isolated nodes, repeated edges): the same partition as
    scipy.sparse.csgraph.connected_components, each labelled by its smallest node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from trtwsi.runtime.seams import components

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    e = int(rng.integers(0, 2 * n))
    i, j = rng.integers(0, n, e), rng.integers(0, n, e)
    if seed == 0:  # one long chain in a shuffled order: the worst case for hooking
        perm = rng.permutation(n)
        i, j = perm[:-1], perm[1:]
    got = components(n, i.astype(np.int64), j.astype(np.int64))
    _, want = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)))
    first = {}
    for node, lab in enumerate(want):
        first.setdefault(lab, node)
    np.testing.assert_array_equal(got, [first[lab] for lab in want])


def test_drains_are_asked_for_every_eighth_of_the_slide():
    """returned() asks for a drain once ``every`` tiles came back since the last one (an
    eighth of the slide by default, at least 256 tiles), and not while one is scheduled."""
    rng = np.random.default_rng(2)
    plan, _ = _slide(rng, 10)
    assert SeamMerger(plan, [[]], {}).every == max(256, plan.n_tiles // 8)
    merger = SeamMerger(plan, [[]], {}, every=10)
    asks = [merger.returned(np.arange(k, k + 4)) for k in range(0, 40, 4)]
    assert asks == [False, False, True, False, False, False, False, False, False, False]
    merger.drain()  # clears "scheduled"; 28 tiles came back meanwhile
    assert merger.returned(np.arange(40, 44))


def test_drains_are_asked_for_as_the_slide_ends_so_little_is_left_to_the_finisher():
    """Besides every ``every`` tiles, a drain is asked for once as many tiles came back since
    the last one as are still to come (halving what the finisher merges after the last batch);
    with ``tail_drains`` off, only every ``every`` tiles."""
    from trtwsi.runtime.seams import TileReturns

    def asks(tail: bool) -> list[int]:
        tr = TileReturns(SimpleNamespace(n_tiles=100), [[]], every=40)
        tr.tail_drains = tail
        out = []
        for k in range(0, 100, 10):  # batches of 10 tiles; each asked drain runs at once
            if tr.returned(np.arange(k, k + 10)):
                out.append(k + 10)  # tiles back when asked
                tr._take_returned()
                tr._scheduled = False
        return out

    # back 40 (every), 70 (30 undrained, 30 to come), 90 (20 vs 10), 100 (10 vs 0)
    assert asks(True) == [40, 70, 90, 100]
    assert asks(False) == [40, 80]
