"""trtwsi.merge: the fast merge equals the brute-force reference, scales, and fixes tile seams."""

from __future__ import annotations

import numpy as np
import pytest

import trtwsi.merge as merge_mod
from trtwsi.merge import (
    DEFAULT_METHOD,
    DEFAULT_METRIC,
    DEFAULT_THRESHOLD,
    MergeError,
    combine_merges,
    merge_detections,
    merge_reference,
    overlapping_pairs,
    pair_overlap,
)
from trtwsi.results.evaluate import evaluate_detections
from trtwsi.synthetic.tiled import make_layout, simulate_tiled_detections, tile_origins

METHODS = ("nms", "greedy")
METRICS = ("iou", "ios")


def assert_same(a, b, exact_boxes=True):
    np.testing.assert_array_equal(a.keep, b.keep)
    if exact_boxes:
        np.testing.assert_array_equal(a.boxes, b.boxes)
    else:  # score-weighted means: the summation order differs, so only up to rounding
        np.testing.assert_allclose(a.boxes, b.boxes, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.cluster, b.cluster)


def both(boxes, scores, classes=None, **kw):
    fast = merge_detections(boxes, scores, classes, **kw)
    ref = merge_reference(boxes, scores, classes, **kw)
    assert_same(fast, ref, exact_boxes=kw.get("box_merge") != "weighted")
    return fast


def random_case(rng, n, span=200.0, size=(0.0, 60.0), integer=False):
    xy = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(*size, (n, 2))
    if integer:
        xy, wh = np.round(xy), np.round(wh)
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.integers(0, 4, n).astype(np.float32) if integer else rng.random(n)
    return boxes, scores, rng.integers(0, 3, n)


# ------------------------------------------------------------------------------------------
# fast == reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_random_small_sets_equal_reference(seed):
    rng = np.random.default_rng(seed)
    for case in range(8):
        integer = case % 2 == 0  # integer grids: exact ties of scores, coordinates, overlaps
        boxes, scores, classes = random_case(rng, int(rng.integers(0, 70)), integer=integer)
        groups = rng.integers(0, 2, len(scores))
        for method in METHODS:
            for metric in METRICS:
                for thr in (0.0, 0.25, 0.5, 0.8):
                    kw = {"method": method, "metric": metric, "threshold": thr}
                    both(boxes, scores, classes, class_aware=bool(case % 3), **kw)
                both(boxes, scores, classes, groups=groups, method=method, metric="ios")
    boxes, scores, classes = random_case(rng, 60)
    both(boxes, scores, classes, method="greedy", box_merge="weighted", threshold=0.2)


@pytest.mark.parametrize("seed", range(8))
def test_random_sets_with_tiles_equal_reference(seed):
    rng = np.random.default_rng(50 + seed)
    for case in range(6):
        integer = case % 2 == 0
        boxes, scores, classes = random_case(rng, int(rng.integers(0, 80)), integer=integer)
        n = len(scores)
        tiles = rng.integers(0, 1 + case, n)  # case 0: every box in one tile
        groups = rng.integers(0, 2, n)
        for method in METHODS:
            for metric in METRICS:
                for thr in (0.0, 0.3, 0.5):
                    kw = {"method": method, "metric": metric, "threshold": thr}
                    r = both(boxes, scores, classes, tiles=tiles, class_aware=bool(case % 3), **kw)
                    if case == 0:  # one tile: nothing is compared, nothing merges
                        assert len(r) == n
                        np.testing.assert_array_equal(np.sort(r.keep), np.arange(n))
                    # each box its own tile: exactly the result without tile ids
                    own = both(boxes, scores, classes, tiles=np.arange(n) * 7 - 3, **kw)
                    assert_same(own, merge_detections(boxes, scores, classes, **kw))
                both(boxes, scores, classes, tiles=tiles, groups=groups, method=method)
        both(boxes, scores, classes, tiles=tiles, method="greedy", box_merge="weighted")


@pytest.mark.parametrize("seed", range(6))
def test_groups_merged_apart_and_combined_equal_one_merge(seed):
    """Each section merged alone (as the GPU runtime does when a section completes), then
    combined: the same keep, boxes, scores, classes and clusters as one merge with groups."""
    rng = np.random.default_rng(90 + seed)
    for case in range(5):
        integer = case % 2 == 0  # exact score ties across groups: the order must still match
        n = int(rng.integers(0, 120))
        boxes, scores, classes = random_case(rng, n, integer=integer)
        groups = rng.integers(0, 1 + case, n)  # case 0: one group
        tiles = rng.integers(0, 4, n)
        for method, bm in (("nms", "union"), ("greedy", "union"), ("greedy", "weighted")):
            kw = {"method": method, "box_merge": bm, "tiles": tiles}
            whole = merge_detections(boxes, scores, classes, groups=groups, **kw)
            parts = []
            for g in rng.permutation(np.unique(groups)):  # parts in any order
                rows = np.flatnonzero(groups == g)
                parts.append((rows, merge_detections(
                    boxes[rows], scores[rows], classes[rows], tiles=tiles[rows],
                    method=method, box_merge=bm,
                )))  # fmt: skip
            # weighted means sum in another order: equal up to rounding
            assert_same(combine_merges(n, parts), whole, exact_boxes=bm != "weighted")
    with pytest.raises(ValueError, match="cover"):
        combine_merges(3, [(np.arange(2), merge_detections(boxes[:2], scores[:2]))])


def test_tiles_merge_only_across_tiles():
    """Issue 10: two same-class boxes of one tile overlapping by IoS 0.6 (the model's NMS kept
    both) both survive; the neighbouring tile's duplicate of one of them is removed."""
    a = [0.0, 0.0, 100.0, 100.0]
    b = [40.0, 0.0, 140.0, 100.0]  # IoS(a, b) = 6000 / 10000 = 0.6
    dup_b = [41.0, 1.0, 139.0, 99.0]  # the neighbour's report of b
    boxes = np.array([a, b, dup_b])
    assert pair_overlap(boxes[0], boxes[1], "ios") == pytest.approx(0.6)
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    classes = np.array([0, 0, 0])
    tiles = np.array([4, 4, 5])
    for method in METHODS:
        r = both(boxes, scores, classes, tiles=tiles, method=method)
        np.testing.assert_array_equal(r.keep, [0, 1])
        np.testing.assert_array_equal(r.cluster, [0, 1, 0])  # dup_b: best kept box of tile 5's
        assert len(both(boxes, scores, classes, method=method)) == 1  # without tiles: b is lost
    # a box suppressed by another tile suppresses nothing: r overlaps q only, q is suppressed
    p, q, r = [0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [12.0, 0.0, 22.0, 10.0]
    chain = np.array([p, q, r])
    assert pair_overlap(chain[0], chain[2], "iou") == 0.0
    for tiles in ([0, 1, 0], [0, 1, 2]):
        res = both(chain, scores, classes, tiles=np.array(tiles), metric="iou", threshold=0.1)
        np.testing.assert_array_equal(res.keep, [0, 2])
    # one tile only (a 640² region): the merge returns every box the model kept
    r = both(boxes, scores, classes, tiles=np.zeros(3, np.int64), threshold=0.0)
    np.testing.assert_array_equal(r.keep, [0, 1, 2])


def test_sizes_over_many_orders_of_magnitude_equal_reference():
    # boxes from 0.01 px to 10^5 px: many levels of the spatial index
    rng = np.random.default_rng(1)
    n = 300
    side = 10 ** rng.uniform(-2, 5, n)
    xy = rng.uniform(0, 2e5, (n, 2))
    boxes = np.concatenate([xy, xy + side[:, None] * rng.uniform(0.3, 1, (n, 2))], axis=1)
    scores = rng.random(n)
    for method in METHODS:
        for metric in METRICS:
            both(boxes, scores, None, method=method, metric=metric, threshold=0.1)


def test_dense_pile_and_small_pair_chunks_equal_reference(monkeypatch):
    # everything overlaps everything; tiny chunks exercise the chunked pair generation
    monkeypatch.setattr(merge_mod, "_PAIR_CHUNK", 7)
    rng = np.random.default_rng(2)
    boxes, scores, classes = random_case(rng, 120, span=20, size=(10, 30))
    for metric in METRICS:
        for thr in (0.3, 0.6, 0.9):
            both(boxes, scores, classes, metric=metric, threshold=thr, method="greedy")


def test_long_chain_uses_sequential_fallback_and_equals_reference():
    # box k overlaps box k+1 only; scores decrease along the chain: keep, drop, keep, drop, ...
    n = 3 * merge_mod._MAX_ROUNDS + 5
    x = np.arange(n) * 6.0
    boxes = np.stack([x, np.zeros(n), x + 10, np.full(n, 10.0)], axis=1)
    scores = np.linspace(1, 0.1, n)
    r = both(boxes, scores, None, metric="iou", threshold=0.2)
    np.testing.assert_array_equal(r.keep, np.arange(0, n, 2))


def test_overlapping_pairs_equals_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(20):
        boxes, _, classes = random_case(rng, 80, size=(0, 80), integer=bool(rng.integers(2)))
        for metric in METRICS:
            for thr in (0.0, 0.3):
                i, j = overlapping_pairs(boxes, metric=metric, threshold=thr, buckets=classes)
                got = set(zip(i.tolist(), j.tolist(), strict=True))
                assert len(got) == len(i)  # no duplicates
                ov = pair_overlap(boxes[:, None], boxes[None], metric)
                same = classes[:, None] == classes[None]
                ei, ej = np.nonzero(np.triu((ov > thr) & same, 1))
                assert got == set(zip(ei.tolist(), ej.tolist(), strict=True))


def test_iou_nms_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    import torch

    rng = np.random.default_rng(4)
    boxes, scores, classes = random_case(rng, 3000, span=3000, size=(5, 60))
    scores = rng.permutation(3000) / 3000.0  # distinct scores: torchvision's sort is unstable
    for thr in (0.3, 0.5, 0.7):
        r = merge_detections(boxes, scores, classes, method="nms", metric="iou", threshold=thr)
        tv = torchvision.ops.batched_nms(
            torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), thr
        )
        np.testing.assert_array_equal(r.keep, tv.numpy())


# ------------------------------------------------------------------------------------------
# adversarial cases
# ------------------------------------------------------------------------------------------
def test_pair_exactly_at_threshold_is_not_merged():
    # [0,0,2,1] vs [0,0,1,1]: IoU = 1/2 exactly, IoS = 1 exactly
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], dtype=float)
    assert pair_overlap(boxes[0], boxes[1], "iou") == 0.5
    scores = np.array([0.9, 0.8])
    assert len(both(boxes, scores, metric="iou", threshold=0.5)) == 2  # 0.5 > 0.5 is False
    assert len(both(boxes, scores, metric="iou", threshold=np.nextafter(0.5, 0))) == 1
    assert len(both(boxes, scores, metric="ios", threshold=1.0)) == 2
    assert len(both(boxes, scores, metric="ios", threshold=np.nextafter(1.0, 0))) == 1
    # the same at 10^6 px: [x, y, x+2, y+1] still has exact binary fractions
    big = boxes + 1e6
    assert len(both(big, scores, metric="iou", threshold=0.5)) == 2
    assert len(both(big, scores, metric="iou", threshold=0.49)) == 1


def test_score_ties_keep_lowest_index():
    boxes = np.array([[0, 0, 10, 10]] * 4 + [[100, 100, 110, 110]] * 3, dtype=float)
    scores = np.array([0.5, 0.7, 0.7, 0.7, 0.3, 0.3, 0.3], dtype=np.float32)
    for method in METHODS:
        r = both(boxes, scores, method=method)
        np.testing.assert_array_equal(r.keep, [1, 4])
        np.testing.assert_array_equal(r.cluster, [0, 0, 0, 0, 1, 1, 1])
        assert r.scores.dtype == np.float32
        np.testing.assert_array_equal(r.counts, [4, 3])


def test_identical_boxes_collapse_to_one():
    boxes = np.tile([[5.0, 5.0, 25.0, 45.0]], (50, 1))
    scores = np.linspace(0.1, 0.9, 50)
    for method in METHODS:
        for metric in METRICS:
            r = both(boxes, scores, method=method, metric=metric, threshold=0.99)
            np.testing.assert_array_equal(r.keep, [49])
            np.testing.assert_array_equal(r.boxes, boxes[:1])


def test_zero_area_boxes_never_merge():
    boxes = np.array(
        [
            [0, 0, 100, 100],  # big box
            [10, 10, 10, 50],  # vertical line inside it
            [10, 10, 10, 50],  # identical line
            [20, 20, 20, 20],  # point
            [20, 20, 20, 20],  # identical point
            [10, 10, 60, 10],  # horizontal line
        ],
        dtype=float,
    )
    scores = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    for method in METHODS:
        for metric in METRICS:
            r = both(boxes, scores, method=method, metric=metric, threshold=0.0)
            assert len(r) == 6


def test_huge_coordinates():
    rng = np.random.default_rng(5)
    boxes, scores, classes = random_case(rng, 200, span=300, size=(10, 60))
    for offset in (1e5, 7.3e5, 1e6):
        shifted = boxes + offset
        for metric in METRICS:
            r = both(shifted, scores, classes, metric=metric, method="greedy")
            assert r.boxes.min() >= offset


def test_giant_box_among_small_ones():
    rng = np.random.default_rng(6)
    boxes, scores, _ = random_case(rng, 400, span=1e5, size=(10, 40))
    boxes = np.vstack([[0.0, 0.0, 1.2e5, 1.2e5], boxes])
    scores = np.r_[2.0, scores]  # the giant box ranks first
    # IoS: every small box lies inside the giant box -> all absorbed
    r = both(boxes, scores, method="greedy", metric="ios", threshold=0.5)
    assert len(r) == 1
    np.testing.assert_array_equal(r.boxes[0], [0.0, 0.0, 1.2e5, 1.2e5])
    # IoU: the giant box matches nothing
    r = both(boxes, scores, metric="iou", threshold=0.1)
    assert 0 in r.keep.tolist()
    assert len(r) > 390


def test_empty_and_single_input():
    for method in METHODS:
        r = merge_detections(np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, int))
        assert len(r) == 0
        assert r.boxes.shape == (0, 4) and r.cluster.shape == (0,) and r.keep.dtype == np.int64
        assert_same(r, merge_reference(np.zeros((0, 4)), np.zeros(0, np.float32)))
        r = both(np.array([[1.0, 2, 3, 4]]), np.array([0.5]), method=method)
        np.testing.assert_array_equal(r.keep, [0])
        np.testing.assert_array_equal(r.cluster, [0])
    assert len(merge_detections([], [])) == 0  # plain empty lists are accepted


def test_class_aware_and_groups():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10.2, 10]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7])
    classes = np.array([0, 1, 0])
    groups = np.array([0, 0, 1])
    assert len(both(boxes, scores, classes)) == 2  # 0 absorbs 2; 1 is another class
    assert len(both(boxes, scores, classes, class_aware=False)) == 1
    assert len(both(boxes, scores, classes, groups=groups)) == 3  # 2 is in another group
    r = both(boxes, scores, classes, class_aware=False, groups=groups)
    np.testing.assert_array_equal(r.keep, [0, 2])  # groups hold even when classes do not


def test_greedy_union_and_weighted_boxes():
    whole = [100.0, 100.0, 180.0, 160.0]
    partial = [140.0, 98.0, 182.0, 161.0]  # a truncated, jittered copy, inside up to 2 px
    other = [400.0, 400.0, 420.0, 420.0]
    boxes = np.array([whole, partial, other])
    scores = np.array([0.9, 0.6, 0.5], dtype=np.float32)
    r = both(boxes, scores, method="greedy", metric="ios", threshold=0.5)
    np.testing.assert_array_equal(r.keep, [0, 2])
    np.testing.assert_array_equal(r.boxes[0], [100.0, 98.0, 182.0, 161.0])  # union
    np.testing.assert_array_equal(r.scores, scores[[0, 2]])  # max of the cluster
    np.testing.assert_array_equal(r.boxes[1], other)
    n = both(boxes, scores, method="nms", metric="ios", threshold=0.5)
    np.testing.assert_array_equal(n.boxes, boxes[[0, 2]])  # nms leaves boxes untouched
    w = both(boxes, scores, method="greedy", metric="ios", box_merge="weighted")
    expect = (0.9 * np.array(whole) + 0.6 * np.array(partial)) / 1.5
    np.testing.assert_allclose(w.boxes[0], expect, rtol=1e-6)
    # a partial box with the higher score still yields the whole extent under greedy
    r = both(boxes, np.array([0.5, 0.9, 0.1]), method="greedy", metric="ios")
    np.testing.assert_array_equal(r.boxes[0], [100.0, 98.0, 182.0, 161.0])


def test_cluster_points_to_keeper():
    rng = np.random.default_rng(7)
    boxes, scores, classes = random_case(rng, 150, span=150, size=(10, 40))
    r = both(boxes, scores, classes, method="greedy", metric="ios", threshold=0.3)
    np.testing.assert_array_equal(r.keep[r.cluster[r.keep]], r.keep)
    assert (scores[r.keep][r.cluster] >= scores).all()  # absorbed by a better box
    assert (classes[r.keep][r.cluster] == classes).all()  # class-aware clusters
    assert np.all(np.diff(r.scores) <= 0)  # descending score order


def test_invalid_inputs_raise_typed_errors():
    good = np.array([[0.0, 0, 1, 1]])
    with pytest.raises(MergeError, match="shape"):
        merge_detections(np.zeros((3, 5)), np.zeros(3))
    with pytest.raises(MergeError, match="scores must have shape"):
        merge_detections(good, np.zeros(2))
    with pytest.raises(MergeError, match="x2 >= x1"):
        merge_detections(np.array([[5.0, 0, 1, 1]]), np.zeros(1))
    with pytest.raises(MergeError, match="finite"):
        merge_detections(np.array([[np.nan, 0, 1, 1]]), np.zeros(1))
    with pytest.raises(MergeError, match="finite"):
        merge_detections(good, np.array([np.nan]))
    with pytest.raises(MergeError, match="method"):
        merge_detections(good, np.zeros(1), method="soft")
    with pytest.raises(MergeError, match="metric"):
        merge_detections(good, np.zeros(1), metric="giou")
    with pytest.raises(MergeError, match="threshold"):
        merge_detections(good, np.zeros(1), threshold=1.5)
    with pytest.raises(MergeError, match="integers"):
        merge_detections(good, np.zeros(1), np.array([0.5]))
    with pytest.raises(MergeError, match="tiles must have shape"):
        merge_detections(good, np.zeros(1), tiles=np.zeros(2, np.int64))
    with pytest.raises(MergeError, match="tiles must be integers"):
        merge_detections(good, np.zeros(1), tiles=np.array([0.5]))
    assert issubclass(MergeError, ValueError)


# ------------------------------------------------------------------------------------------
# scale
# ------------------------------------------------------------------------------------------
def test_1e5_boxes_equal_reference_cluster_by_cluster():
    """10^5 boxes in 2000 far-apart clumps of 50: the merge is local, so the reference run on
    each clump alone is the exact answer for the whole set."""
    rng = np.random.default_rng(8)
    n_clumps, per = 2000, 50
    origins = np.stack(np.meshgrid(np.arange(50), np.arange(40)), -1).reshape(-1, 2) * 1000.0
    origins = origins + 3e5  # large level-0 coordinates
    parts = [
        random_case(rng, per, span=120, size=(8, 50), integer=bool(k % 2)) for k in range(n_clumps)
    ]
    boxes = np.concatenate([p[0] + np.tile(o, 2) for p, o in zip(parts, origins, strict=True)])
    scores = np.concatenate([p[1].astype(np.float64) + 10 * k for k, p in enumerate(parts)])
    classes = np.concatenate([p[2] for p in parts])
    assert boxes.shape == (n_clumps * per, 4)
    perm = rng.permutation(len(scores))  # the input order must not matter beyond ties
    inv = np.argsort(perm)
    boxes, scores, classes = boxes[perm], scores[perm], classes[perm]
    for method, metric in (("nms", "ios"), ("greedy", "iou")):
        r = merge_detections(boxes, scores, classes, method=method, metric=metric)
        expect_keep, expect_boxes = [], []
        for k in range(n_clumps):
            rows = np.sort(inv[k * per : (k + 1) * per])  # input rows of clump k, in order
            sub = merge_reference(
                boxes[rows], scores[rows], classes[rows], method=method, metric=metric
            )
            expect_keep.append(rows[sub.keep])
            expect_boxes.append(sub.boxes)
        # clumps rank by score offset k: the highest clump comes first in the output
        expect_keep = np.concatenate(expect_keep[::-1])
        expect_boxes = np.concatenate(expect_boxes[::-1])
        np.testing.assert_array_equal(r.keep, expect_keep)
        np.testing.assert_array_equal(r.boxes, expect_boxes)
        assert 0.3 * len(scores) < len(r) < len(scores) - 2000  # a real amount of merging


# ------------------------------------------------------------------------------------------
# simulated tile seams and the defaults
# ------------------------------------------------------------------------------------------
def test_tile_origins_cover_the_length():
    for length in (1, 639, 640, 641, 1152, 5000, 6400):
        xs = tile_origins(length, 640, 0.2)
        assert xs[0] == 0 and np.all(np.diff(xs) > 0)
        assert xs[-1] + 640 >= length
        assert np.all(np.diff(xs) <= 512)


def test_simulated_detections_are_clipped_views():
    rng = np.random.default_rng(9)
    side = 3000
    gt = make_layout("seams", side, side, rng, n_classes=2)
    sim = simulate_tiled_detections(gt, 640, 0.2, side, side, rng, jitter_px=0.0)
    xs = tile_origins(side, 640, 0.2)
    ox = xs[sim.tile_index % xs.size]
    oy = xs[sim.tile_index // xs.size]
    b = sim.boxes
    assert (b[:, 0] >= ox).all() and (b[:, 2] <= ox + 640).all()
    assert (b[:, 1] >= oy).all() and (b[:, 3] <= oy + 640).all()
    g = gt[sim.gt_index]
    # no jitter: every report is its object clipped to the tile (level-0 px)
    assert (b[:, :2] >= g[:, :2] - 1e-9).all() and (b[:, 2:] <= g[:, 2:4] + 1e-9).all()
    assert (sim.visible >= 0.5).all()
    np.testing.assert_array_equal(sim.classes, g[:, 4].astype(int))
    whole = sim.visible == 1.0
    assert (sim.scores[~whole].mean() < sim.scores[whole].mean()) and whole.any()
    # every object is reported at least once whole (all objects are smaller than the overlap)
    assert set(sim.gt_index[whole].tolist()) == set(range(len(gt)))
    assert len(sim.scores) > 1.5 * len(gt)  # seams: most objects are reported several times


def test_defaults_give_one_detection_per_object_on_seams():
    assert (DEFAULT_METHOD, DEFAULT_METRIC, DEFAULT_THRESHOLD) == ("nms", "ios", 0.5)
    side = 3200
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        gt = make_layout("seams", side, side, rng, n_classes=2)
        # plus objects centred exactly on tile corners, where four tiles see them
        corners = np.array([[512.0, 640.0], [1024.0, 1152.0], [1536.0, 1664.0]])
        c = np.stack(np.meshgrid(corners[:, 0], corners[:, 1]), -1).reshape(-1, 2)
        extra = np.concatenate([c - 30, c + 30, np.zeros((len(c), 1))], axis=1)
        extra = extra[np.all(np.abs(gt[:, None, :2] - extra[None, :, :2]) > 130, axis=2).all(0)]
        gt = np.concatenate([gt, extra])
        sim = simulate_tiled_detections(gt, 640, 0.2, side, side, rng)
        assert len(sim.scores) > 1.5 * len(gt)  # the seams really produce duplicates
        r = merge_detections(sim.boxes, sim.scores, sim.classes)
        ev = evaluate_detections(r.boxes, r.scores, r.classes, gt)
        assert (ev["fp"], ev["fn"]) == (0, 0), ev
        # and exactly one output per object: each cluster holds the reports of one object
        assert len(r) == len(gt)
        np.testing.assert_array_equal(np.sort(sim.gt_index[r.keep]), np.arange(len(gt)))
        same_object = sim.gt_index == sim.gt_index[r.keep][r.cluster]
        assert same_object.all()


def test_seams_still_merge_with_tile_ids():
    """With tile ids the seams merge as well as without (the simulated detector reports each
    object at most once per tile, so every duplicate is a cross-tile pair)."""
    side = 3200
    for kind in ("seams", "nuclei"):
        rng = np.random.default_rng(12)
        gt = make_layout(kind, side, side, rng, n_classes=2)
        sim = simulate_tiled_detections(gt, 640, 0.2, side, side, rng)
        f1 = {}
        for tiles in (None, sim.tile_index):
            r = merge_detections(sim.boxes, sim.scores, sim.classes, tiles=tiles)
            f1[tiles is None] = evaluate_detections(r.boxes, r.scores, r.classes, gt)["f1"]
        assert f1[False] >= f1[True] - 1e-3, (kind, f1)
        if kind == "seams":
            assert f1[False] == 1.0


def test_iou_threshold_misses_partial_boxes_that_ios_removes():
    """The measurement behind the default: IoU 0.5 leaves seam fragments, IoS 0.5 does not."""
    rng = np.random.default_rng(11)
    side = 3200
    gt = make_layout("seams", side, side, rng)
    sim = simulate_tiled_detections(gt, 640, 0.2, side, side, rng)
    iou = merge_detections(sim.boxes, sim.scores, sim.classes, metric="iou", threshold=0.5)
    ios = merge_detections(sim.boxes, sim.scores, sim.classes, metric="ios", threshold=0.5)
    assert evaluate_detections(iou.boxes, iou.scores, iou.classes, gt)["fp"] > 0
    assert evaluate_detections(ios.boxes, ios.scores, ios.classes, gt)["fp"] == 0


def test_evaluate_detections_counts():
    gt = np.array([[0, 0, 10, 10, 0], [50, 50, 60, 60, 1]], dtype=float)
    ev = evaluate_detections(gt[:, :4], np.array([0.9, 0.8]), gt[:, 4], gt)
    assert (ev["tp"], ev["fp"], ev["fn"], ev["precision"], ev["recall"]) == (2, 0, 0, 1.0, 1.0)
    dup = np.vstack([gt[:, :4], [[0, 0, 10, 11]]])
    ev = evaluate_detections(dup, np.array([0.9, 0.8, 0.7]), np.array([0, 1, 0]), gt)
    assert (ev["tp"], ev["fp"], ev["fn"]) == (2, 1, 0)
    ev = evaluate_detections(gt[:, :4], np.array([0.9, 0.8]), np.array([1, 0]), gt)
    assert (ev["tp"], ev["fp"], ev["fn"]) == (0, 2, 2)  # right place, wrong class


@pytest.mark.parametrize("seed", range(6))
def test_score_index_order_is_the_lexsort(seed):
    """The packed-key fast path and the lexsort fallback give lexsort((index, -scores)) on
    ties, negative scores, ±0, float32 extremes and subnormals, duplicate pairs; float64
    scores that float32 cannot hold, NaN and indices ≥ 2³¹ take the fallback."""
    from trtwsi.merge import score_index_order

    rng = np.random.default_rng(seed)
    specials = np.array([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 3e38, -3e38], np.float32)
    cases = [
        rng.random(3000).astype(np.float32).astype(np.float64),
        np.round(rng.normal(0, 1, 3000), 2).astype(np.float32),
        rng.choice(specials, 3000).astype(np.float64),
        rng.random(3000),  # float64 values: fallback
        np.r_[rng.random(10), np.nan].astype(np.float32),  # NaN: fallback
        np.empty(0),
    ]
    for scores in cases:
        n = len(scores)
        for index in (
            rng.permutation(2 * n + 1)[:n],
            rng.integers(0, 5, n),  # duplicate (score, index) pairs keep input order
            rng.integers(2**31 - 3, 2**31 + 3, n),  # some ≥ 2³¹: fallback
        ):
            got = score_index_order(scores, index)
            np.testing.assert_array_equal(got, np.lexsort((index, -scores)))
