"""Runtime: slides stream through one long-lived runtime; results per slide, in order; a bad
slide fails alone; a slide's results do not depend on its neighbours in the stream."""

from __future__ import annotations

import numpy as np
import pytest

import trtwsi
from trtwsi._util.resources import bundled_models_dir
from trtwsi.plan.slide_plan import SlideOptions
from trtwsi.runtime import Runtime, SlideRequest
from trtwsi.runtime.gpu.ring import BatchBuilder, ChunkRing, SlideRun, SlideTracker
from trtwsi.synthetic import make_slide

MODEL = bundled_models_dir() / "demo-yolo11n.pt"


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    out = []
    for i, (w, h) in enumerate([(2400, 1800), (1800, 1400), (2600, 1600)]):
        p = d / f"s{i}.tif"
        make_slide(p, w, h, seed=40 + i, n_sections=1 + i % 2)
        out.append(p)
    bad = d / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    return out, bad


def _rows(res) -> np.ndarray:
    return res.detections.to_numpy()


def test_stream_equals_one_by_one_and_bad_slide_fails_alone(slides):
    good, bad = slides
    model = trtwsi.Model(MODEL)
    with Runtime([model], device="cpu", batch=4, workers=1) as rt:
        alone = [rt.run(p) for p in good]
        outs = list(rt.stream([good[0], bad, good[1], SlideRequest(good[2], tag="x")]))
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert not outs[1].ok and isinstance(outs[1].error, trtwsi.TrtwsiError)
    assert outs[3].tag == "x"
    for a, o in zip(alone, [outs[0], outs[2], outs[3]], strict=True):
        assert o.ok and len(a.detections) > 0
        np.testing.assert_array_equal(_rows(a), _rows(o.results))
        assert o.results.timings["total"] > 0 and "sections" in o.results.timings


def test_predictor_is_a_facade_over_runtime(slides):
    good, _ = slides
    model = trtwsi.Model(MODEL)
    with Runtime([model], device="cpu", batch=4, workers=1) as rt:
        want = rt.run(good[0], SlideOptions(section=0))
    with trtwsi.Predictor(good[0], [model], device="cpu", batch=4, workers=1) as p:
        got = p.run(section=0)
        assert p.runtime.pipeline == "reference"
    np.testing.assert_array_equal(_rows(want), _rows(got))
    assert got.params["pipeline"] == "reference" and got.params["section"] == 0


def test_tissue_in_planner_processes_equals_in_threads(slides):
    good, _ = slides
    model = trtwsi.Model(MODEL)
    with Runtime([model], device="cpu", batch=4, workers=1, plan_processes=True) as rt:
        assert rt._planner_pool is not None
        outs = list(rt.stream(good[:2]))
    with Runtime([model], device="cpu", batch=4, workers=1, plan_processes=False) as rt:
        want = list(rt.stream(good[:2]))
    for o, w in zip(outs, want, strict=True):
        assert o.results.sections == w.results.sections
        np.testing.assert_array_equal(_rows(o.results), _rows(w.results))


def test_closed_runtime_refuses_to_run(slides):
    rt = Runtime([trtwsi.Model(MODEL)], device="cpu")
    rt.close()
    rt.close()  # idempotent
    with pytest.raises(trtwsi.TrtwsiError, match="closed"):
        list(rt.stream(slides[0][:1]))


def test_tissue_option_is_checked(monkeypatch):
    model = trtwsi.Model(MODEL)
    with pytest.raises(trtwsi.TrtwsiError, match="tissue='gpu' needs the GPU pipeline"):
        Runtime([model], device="cpu", tissue="gpu")
    with pytest.raises(trtwsi.TrtwsiError, match="'sideways'"):
        Runtime([model], device="cpu", tissue="sideways")
    monkeypatch.setenv("TRTWSI_TISSUE", "nowhere")
    with pytest.raises(trtwsi.TrtwsiError, match="'nowhere'"):
        Runtime([model], device="cpu")
    monkeypatch.setenv("TRTWSI_TISSUE", "cpu")
    with Runtime([model], device="cpu") as rt:
        assert rt.tissue == "cpu"


def test_seam_merge_option_is_checked(monkeypatch):
    model = trtwsi.Model(MODEL)
    with pytest.raises(trtwsi.TrtwsiError, match="seam_merge must be 'thread' or 'process'"):
        Runtime([model], device="cpu", seam_merge="elsewhere")
    monkeypatch.setenv("TRTWSI_SEAM_MERGE", "nowhere")
    with pytest.raises(trtwsi.TrtwsiError, match="'nowhere'"):
        Runtime([model], device="cpu")
    monkeypatch.setenv("TRTWSI_SEAM_MERGE", "process")
    with Runtime([model], device="cpu") as rt:  # the CPU path merges at each slide's end
        assert rt.seam_merge == "process" and rt._seam_proc is None


def test_cpu_runtime_has_no_background_warm_up():
    with Runtime([trtwsi.Model(MODEL)], device="cpu") as rt:
        assert rt.wait_ready() is True
        assert rt.start_timings["warm_up"] == 0.0


def test_bad_device_is_named():
    with pytest.raises(trtwsi.TrtwsiError, match="'gpu' is not a device"):
        Runtime([trtwsi.Model(MODEL)], device="gpu")


# --- bookkeeping of the GPU pipeline, driven without CUDA --------------------------------------
def test_tracker_hands_slides_on_in_order_when_their_batches_are_back():
    done: list[int] = []
    tr = SlideTracker(lambda r: done.append(r.index))
    ring = ChunkRing(2)
    a, b, c = (SlideRun(index=i, source=i) for i in range(3))
    for r in (a, b, c):
        tr.add(r)
    bb = BatchBuilder(3)
    geo = (640, 1.0)
    for run, n in ((a, 2), (b, 1)):
        for _ in range(n):
            d = 0
            bb.add(run=run, group=0, geometry=geo, slot=d, offset=0, stride=1, origin=(0, 0),
                   section=0, tile=0)  # fmt: skip
            ring.pending[d] += 1
            run.pending += 1
    assert bb.full()
    pb = bb.take()
    assert pb.n == 3 and pb.runs == [a, b] and pb.share() == {a: 2 / 3, b: 1 / 3}
    tr.launched(pb, ring)
    assert ring.pending == [0, 0] and a.pending == 0 and a.inflight == 1
    c.issued = True  # c failed to plan: finished at once, but must wait for a and b
    tr.issued(c)
    tr.issued(a)
    assert done == []  # a's batch is still in flight
    tr.returned(pb)
    assert done == [0]
    tr.issued(b)
    assert done == [0, 1, 2]
    tr.drain()


def test_tracker_times_each_slides_first_launch_and_last_return():
    """first_launch_at / last_return_at (and the start marks before them): seconds after the
    slide's start, added once it is handed on; a slide with no batch (nothing to run) gets
    none of those it never reached."""
    import time

    done: list = []
    tr = SlideTracker(done.append)
    t0 = time.perf_counter()
    a = SlideRun(index=0, source=0, t_start=t0)
    a.t_planned, a.t_first_submit, a.t_first_chunk = t0 + 0.001, t0 + 0.002, t0 + 0.005
    a.t_first_queued, a.t_first_read = t0 + 0.003, t0 + 0.004
    empty = SlideRun(index=1, source=1, t_start=t0)
    tr.add(a)
    tr.add(empty)
    batches = []
    for tile in range(2):
        bb = BatchBuilder(1)
        bb.add(run=a, group=0, geometry=(640, 1.0), slot=0, offset=0, stride=1, origin=(0, 0),
               section=0, tile=tile)  # fmt: skip
        a.pending += 1
        pb = bb.take()
        tr.launched(pb)
        batches.append(pb)
        time.sleep(0.01)
    first = a.t_first_launch
    tr.issued(a)
    tr.issued(empty)
    for pb in batches:
        time.sleep(0.01)
        tr.returned(pb)
    assert done == [a, empty]
    t = dict(a.timer.t)
    assert t["first_launch_at"] == pytest.approx(first - t0)
    assert t["last_return_at"] == pytest.approx(a.t_last_return - t0)
    assert t["last_return_at"] >= t["first_launch_at"] + 0.03
    marks = ["planned_at", "first_submit_at", "first_queued_at", "first_read_at", "first_chunk_at"]
    assert [t[k] for k in marks] == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.005])
    assert "first_launch_at" not in empty.timer.t and "last_return_at" not in empty.timer.t
    assert "first_chunk_at" not in empty.timer.t


def test_tracker_reports_each_slides_tiles_of_a_returned_batch():
    """A batch that mixes slides: each slide hears of exactly its own tiles; a failed slide
    hears nothing."""
    from types import SimpleNamespace

    plan = SimpleNamespace()
    a, b = SlideRun(index=0, source=0, plan=plan), SlideRun(index=1, source=1, plan=plan)
    heard: list = []
    tr = SlideTracker(lambda r: None, lambda r, t: heard.append((r.index, t.tolist())))

    def batch(*tiles):
        bb = BatchBuilder(8)
        for run, tile in tiles:
            bb.add(run=run, group=0, geometry=(640, 1.0), slot=0, offset=0, stride=1,
                   origin=(0, 0), section=0, tile=tile)  # fmt: skip
        pb = bb.take()
        tr.launched(pb)
        return pb

    tr.returned(batch((a, 0), (a, 1), (b, 5), (b, 6)))
    assert heard == [(0, [0, 1]), (1, [5, 6])]
    b.fail(RuntimeError("read failed"))
    tr.returned(batch((a, 2), (b, 7)))
    assert heard[2:] == [(0, [2])]


def test_merge_rows_with_the_seam_merger_gives_the_same_detections():
    """finish.merge_rows given the SeamMerger that ran beside the slide equals one merge of
    all rows: same boxes, scores, classes, sections, same order."""
    from trtwsi.runtime.finish import merge_rows
    from trtwsi.runtime.seams import SeamMerger

    rng = np.random.default_rng(3)
    model = trtwsi.Model(MODEL)
    from trtwsi.plan.slide_plan import plan_slide

    slide = trtwsi.open_slide(np.zeros((3000, 4000, 3), np.uint8))
    plan = plan_slide(slide, [640], SlideOptions(region=(0, 0, 4000, 3000)))
    tiles = plan.grids[640][0].tiles
    per_model: list = [[]]
    merger = SeamMerger(plan, per_model, {}, every=8)
    for k in range(0, len(tiles), 4):
        out = []
        for t in range(k, min(k + 4, len(tiles))):
            x, y, w, h = tiles[t]
            n = int(rng.integers(0, 40))
            x1 = rng.uniform(x, x + w - 5, n)
            y1 = rng.uniform(y, y + h - 5, n)
            x2 = np.minimum(x1 + rng.uniform(5, 90, n), x + w)
            y2 = np.minimum(y1 + rng.uniform(5, 90, n), y + h)
            out.append(np.column_stack([x1, y1, x2, y2, rng.integers(1, 5, n) / 4.0,
                                        rng.integers(0, 2, n), np.full(n, -1), np.full(n, t)]))  # fmt: skip
        per_model[0].append(np.concatenate(out))
        if merger.returned(np.arange(k, min(k + 4, len(tiles)))):
            merger.drain()
    got = merge_rows(per_model, [model], {}, merger)
    want = merge_rows(per_model, [model], {})
    assert len(want) > 100 and merger._models[0].pieces
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())
    np.testing.assert_array_equal(got.section, want.section)


def test_builder_refuses_mixing_geometries_and_tracker_catches_leftovers():
    bb = BatchBuilder(4)
    bb.add(run=1, group=0, geometry=(640, 1.0), slot=0, offset=0, stride=1, origin=(0, 0),
           section=0, tile=0)  # fmt: skip
    assert (
        bb.accepts(0, (640, 1.0))
        and not bb.accepts(0, (320, 2.0))
        and not bb.accepts(1, (640, 1.0))
    )
    with pytest.raises(ValueError, match="take"):
        bb.add(run=1, group=1, geometry=(640, 1.0), slot=0, offset=0, stride=1, origin=(0, 0),
               section=0, tile=1)  # fmt: skip
    tr = SlideTracker(lambda r: None)
    tr.add(SlideRun(index=7, source=None))
    with pytest.raises(RuntimeError, match=r"\[7\]"):
        tr.drain()


# --- GPU ----------------------------------------------------------------------------------------
def _gpu_or_skip():
    from trtwsi.runtime.gpu.device import gpu_unavailable_reason

    why = gpu_unavailable_reason()
    if why:
        pytest.skip(f"GPU pipeline unavailable: {why}")


@pytest.mark.gpu
def test_gpu_stream_gives_each_slide_the_results_it_gets_alone(slides):
    _gpu_or_skip()
    good, bad = slides
    model = trtwsi.Model(MODEL)
    # decode="cpu": with 2 readers decode="auto" also decodes on the GPU, and which decoder
    # takes a chunk depends on timing; nvJPEG's pixels differ from libjpeg-turbo's by ±1, and
    # the detections by an fp16 ulp (test_pipeline.py::test_gpu_jpeg_lane_matches_cpu_decode)
    kw = {"device": "cuda", "batch": 8, "workers": 2, "readers": "processes", "decode": "cpu"}
    with Runtime([model], **kw) as rt:
        alone = [rt.run(p) for p in good]
        outs = list(rt.stream([good[2], good[0], bad, good[1], good[0]]))
    assert [o.ok for o in outs] == [True, True, False, True, True], [o.error for o in outs]
    marks = ["planned_at", "first_submit_at", "first_queued_at", "first_read_at"]
    marks += ["first_chunk_at", "first_launch_at"]
    for o in (outs[0], outs[1], outs[3], outs[4]):  # each slide's start, in the order it ran
        t = o.results.timings
        assert [t[k] for k in marks] == sorted(t[k] for k in marks), (o.source, t)
    for o, want in zip(
        [outs[0], outs[1], outs[3], outs[4]], [alone[2], alone[0], alone[1], alone[0]], strict=True
    ):
        # sections first (a difference there changes the tile grid), then every row
        got_s = [(s["index"], s["bbox"], s["area"]) for s in o.results.sections]
        assert got_s == [(s["index"], s["bbox"], s["area"]) for s in want.sections], o.source
        assert o.results.n_tiles == want.n_tiles, o.source
        np.testing.assert_array_equal(_rows(o.results), _rows(want), err_msg=str(o.source))


@pytest.mark.gpu
def test_gpu_seam_merge_in_a_process_gives_the_rows_of_the_threads(slides):
    """Same merge code on the same rows: the same rows to the bit, a failed slide in between
    leaves nothing behind in the process, and its wait is timed."""
    _gpu_or_skip()
    from trtwsi.runtime import seam_process

    good, bad = slides
    model = trtwsi.Model(MODEL)
    kw = {"device": "cuda", "batch": 8, "workers": 2, "decode": "cpu"}
    with Runtime([model], seam_merge="thread", **kw) as rt:
        want = list(rt.stream(good))
    with Runtime([model], seam_merge="process", **kw) as rt:
        assert rt._seam_proc is not None
        outs = list(rt.stream([good[0], bad, *good[1:]]))
        left = rt._seam_proc.submit(seam_process._open_slides).result(timeout=60)
        proc = rt._seam_proc
    assert proc._pool is None and proc.failed is None and left == 0
    assert not outs[1].ok
    for o, w in zip([outs[0], *outs[2:]], want, strict=True):
        np.testing.assert_array_equal(_rows(o.results), _rows(w.results))
        assert "merge_wait" in o.results.timings


@pytest.mark.gpu
def test_gpu_runtime_returns_before_its_warm_up_and_runs_wait_for_it(slides, monkeypatch):
    _gpu_or_skip()
    import threading

    from trtwsi.runtime.gpu.pipeline import GpuPipeline

    good, _ = slides
    model = trtwsi.Model(MODEL)
    # decode="cpu": the rows are compared exactly (the GPU JPEG lane's share depends on timing)
    with Runtime([model], device="cuda", batch=8, workers=2, decode="cpu") as rt:
        want = rt.run(good[0])
        assert rt.start_timings["warm_up"] > 0
    # hold the warm-up: the constructor returns, the slide is planned and read meanwhile, and
    # its first upload waits; same rows as a runtime that was warm before its run
    gate = threading.Event()
    real = GpuPipeline._warm_up

    def held(self):
        assert gate.wait(60)
        real(self)

    monkeypatch.setattr(GpuPipeline, "_warm_up", held)
    rt = Runtime([model], device="cuda", batch=8, workers=2, decode="cpu")
    try:
        assert rt.start_timings["warm_up"] is None and rt.wait_ready(0.05) is False
        got: list = []
        t = threading.Thread(target=lambda: got.append(rt.run(good[0])))
        t.start()
        t.join(1.0)
        assert t.is_alive()  # waiting for the warm-up
        gate.set()
        t.join(120)
        assert rt.wait_ready() is True and rt.start_timings["warm_up"] > 0
    finally:
        gate.set()
        rt.close()
    np.testing.assert_array_equal(_rows(got[0]), _rows(want))

    def broken(self):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(GpuPipeline, "_warm_up", broken)
    with Runtime([model], device="cuda", batch=8, workers=2) as rt:
        with pytest.raises(trtwsi.TrtwsiError, match=r"warm-up .* failed .*injected") as e:
            rt.run(good[0])
        assert isinstance(e.value.__cause__, RuntimeError)
        with pytest.raises(trtwsi.TrtwsiError, match="injected"):
            rt.wait_ready()


@pytest.mark.gpu
def test_gpu_runtime_memory_flat_over_100_slides_and_close_leaves_nothing(tmp_path):
    _gpu_or_skip()
    import glob
    import os
    import resource

    import torch

    small = []
    for i in range(4):
        p = tmp_path / f"m{i}.tif"
        make_slide(p, 1500, 1100, seed=70 + i, n_sections=1)
        small.append(p)
    model = trtwsi.Model(MODEL)
    before_shm = set(glob.glob("/dev/shm/trtwsi-ring-*"))
    rt = Runtime([model], device="cuda", batch=8, workers=2, readers="processes")
    pids = [p.pid for p in rt._pipe.pool._pool._processes.values()]
    rss, gpu = [], []
    for _ in range(5):
        outs = list(rt.stream(small * 5))
        assert all(o.ok for o in outs)
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        gpu.append(torch.cuda.memory_allocated())
    rt.close()
    assert gpu[-1] == gpu[1], gpu
    assert rss[-1] - rss[1] < 200 * 1024, rss  # KiB: no growth beyond noise after warm-up
    assert set(glob.glob("/dev/shm/trtwsi-ring-*")) == before_shm
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.gpu
def test_gpu_tissue_gives_the_sections_and_detections_of_cpu_tissue(slides):
    _gpu_or_skip()
    good, bad = slides
    model = trtwsi.Model(MODEL)
    # decode="cpu": the GPU JPEG lane takes chunks by timing, and nvJPEG's pixels differ by ±1
    kw = {"device": "cuda", "batch": 8, "workers": 2, "plan_processes": False, "decode": "cpu"}
    with Runtime([model], tissue="gpu", **kw) as rt:
        assert rt.tissue == "gpu"
        outs = list(rt.stream([*good, bad]))
        assert rt.tissue == "gpu"  # the bad slide failed alone, the GPU path stays on
    with Runtime([model], tissue="cpu", **kw) as rt:
        want = list(rt.stream(good))
    assert not outs[-1].ok
    for o, w in zip(outs, want, strict=False):
        assert o.results.sections == w.results.sections
        np.testing.assert_array_equal(_rows(o.results), _rows(w.results))


def test_timed_reader_adds_each_calls_seconds_also_when_it_fails():
    """The thumbnail's level reads are timed apart (``sections_thumbnail_read``)."""
    import time

    from trtwsi._util.timer import Timer

    timer = Timer()

    def read(level, fail=False):
        time.sleep(0.01)
        if fail:
            raise OSError("gone")
        return level

    f = timer.timed(read, "r")
    assert f(2) == 2
    with pytest.raises(OSError, match="gone"):
        f(1, fail=True)
    assert timer.t["r"] >= 0.02
