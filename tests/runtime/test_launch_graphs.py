"""CUDA graphs of a batch's launches (runtime/gpu/launch_graphs.py) and the raw async copy
they capture (ops.cuda.copy_async): the graphs change no detection, replay what they
captured, recapture when a guarded pointer moves, and fall back when a capture fails.

GPU tests skip with the reason where torch sees no CUDA GPU or CuPy is missing; the CPU tests
check the arguments and the switched-off path.
"""

import numpy as np
import pytest
import torch

import trtwsi
from trtwsi._util.resources import bundled_models_dir
from trtwsi.runtime import Runtime
from trtwsi.runtime.gpu.device import gpu_unavailable_reason
from trtwsi.runtime.gpu.launch_graphs import LaunchGraphs
from trtwsi.synthetic import make_slide

MODELS = bundled_models_dir()
WHY = gpu_unavailable_reason()
gpu = pytest.mark.skipif(WHY is not None, reason=f"GPU pipeline unavailable: {WHY}")


# --- CPU -----------------------------------------------------------------------------------
def test_switched_off_graphs_run_the_steps_each_time():
    calls = []
    g = LaunchGraphs(torch.device("cpu"), enabled=False)
    for _ in range(3):
        g.launch("k", None, lambda: calls.append(1))
    assert len(calls) == 3 and g.uncaptured == 3 and g.captures == g.replays == 0
    assert "off" in g.off


class _Replayed:
    """Stands in for a captured torch.cuda.CUDAGraph (none can exist without a GPU): counts
    replays. The dispatch around it is what this CPU test checks; the GPU tests capture real
    graphs."""

    def __init__(self):
        self.n = 0

    def replay(self):
        self.n += 1


def test_a_graph_replays_only_while_its_guard_holds_and_new_keys_stop_at_the_cap(monkeypatch):
    from trtwsi.runtime.gpu import launch_graphs

    calls = []
    g = LaunchGraphs(torch.device("cpu"))
    fake = _Replayed()
    g._graphs["k"] = (fake, 7)
    g.launch("k", 7, lambda: calls.append("k"))
    assert fake.n == 1 and g.replays == 1 and not calls
    g.launch("k", 8, lambda: calls.append("k"))  # the guarded pointer moved: uncaptured
    assert fake.n == 1 and calls == ["k"] and g.uncaptured == 1
    g.launch("k", 7, lambda: calls.append("k"))  # back: the graph again
    assert fake.n == 2 and calls == ["k"]
    monkeypatch.setattr(launch_graphs, "MAX_GRAPHS", 1)
    g.launch("new", None, lambda: calls.append("new"))  # full: no capture is tried
    assert calls == ["k", "new"] and g.captures == 0 and g.uncaptured == 2


def test_copy_async_refuses_what_it_cannot_copy():
    from trtwsi.ops.cuda import copy_async

    with pytest.raises(ValueError, match="not pinned"):
        copy_async(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="contiguous"):
        copy_async(torch.zeros(4, 4).t(), torch.zeros(4, 4))


# --- GPU -----------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
def test_gpu_copy_async_copies_both_ways_and_checks_sizes():
    from trtwsi.ops.cuda import copy_async

    src = torch.arange(1000, dtype=torch.float64).pin_memory()
    dev = torch.empty(1000, dtype=torch.float64, device="cuda")
    back = torch.zeros(1000, dtype=torch.float64).pin_memory()
    copy_async(dev, src)
    copy_async(back, dev)
    torch.cuda.current_stream().synchronize()
    assert torch.equal(back, src)
    with pytest.raises(ValueError, match="bytes"):
        copy_async(dev[:10], src)


@gpu
@pytest.mark.gpu
def test_gpu_graph_replays_its_steps_and_not_while_its_guard_moved():
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.zeros(8, device=dev)
    y = torch.zeros(8, device=dev)
    host_calls = []

    def steps():
        host_calls.append(1)
        y.copy_(x * 2 + 1)

    g = LaunchGraphs(dev)
    for i in range(4):
        x.fill_(i)
        g.launch("k", 0, steps)
        torch.cuda.current_stream(dev).synchronize()
        assert torch.equal(y, torch.full_like(y, 2 * i + 1)), (i, y)
    assert len(host_calls) == 1 and g.captures == 1 and g.replays == 4
    x.fill_(10)
    g.launch("k", 1, steps)  # the guard moved: the steps run uncaptured
    torch.cuda.current_stream(dev).synchronize()
    assert len(host_calls) == 2 and g.captures == 1 and g.uncaptured == 1
    assert torch.equal(y, torch.full_like(y, 21))
    g.launch("other", 0, steps)
    assert g.captures == 2 and g.off is None


@gpu
@pytest.mark.gpu
def test_gpu_failed_capture_warns_and_runs_the_steps_uncaptured():
    dev = torch.device("cuda", torch.cuda.current_device())
    y = torch.zeros(4, device=dev)
    calls = []

    def syncing_steps():  # a host synchronization cannot be captured
        calls.append(1)
        y.add_(1)
        torch.cuda.current_stream(dev).synchronize()

    g = LaunchGraphs(dev)
    with pytest.warns(RuntimeWarning, match="capture"):
        g.launch("k", None, syncing_steps)
    assert g.off and not g.enabled and g.uncaptured == 1
    g.launch("k", None, syncing_steps)  # from now on uncaptured
    torch.cuda.synchronize()
    assert g.uncaptured == 2 and float(y[0]) == 2.0  # the failed capture ran nothing
    # the device is usable after the failed capture
    assert float((torch.ones(3, device=dev) * 2).sum()) == 6.0


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("graphs") / "g.tif"
    make_slide(path, 5000, 3800, seed=27, n_sections=2)
    return path


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [16, 5])
def test_gpu_launch_graphs_change_no_row(slide, batch, monkeypatch):
    """Both heads, one runtime each way; batch 5 also leaves partial batches (uncaptured
    decode) and several read geometries (mpp)."""
    models = [trtwsi.Model(MODELS / "demo-yolo11n.pt"), trtwsi.Model(MODELS / "demo-yolo26n.pt")]
    kw = {"device": "cuda", "batch": batch, "workers": 2, "decode": "cpu"}
    rows, graphs = {}, {}
    for on in ("1", "0"):
        monkeypatch.setenv("TRTWSI_LAUNCH_GRAPHS", on)
        with Runtime(models, **kw) as rt:
            outs = [rt.run(slide), rt.run(slide, trtwsi.SlideOptions(mpp=1.0))]
            g = rt._pipe.graphs
            graphs[on] = (g.enabled, g.captures, g.replays, g.off)
        rows[on] = [o.detections.to_numpy() for o in outs]
    enabled, captures, replays, off = graphs["1"]
    assert enabled and off is None and captures > 0 and replays >= captures, graphs
    if batch == 5:  # enough full batches that graphs are replayed, not only captured
        assert replays > captures, graphs
    assert graphs["0"][0] is False and graphs["0"][1] == 0
    for a, b in zip(rows["1"], rows["0"], strict=True):
        assert len(a) > 0
        np.testing.assert_array_equal(a, b)


def _threshold_change(slide, **kw):
    """(low, high, fresh): the slide at the default threshold, then in the same runtime after
    raising the model's min_conf to the median score (the demo model scores every box of this
    slide > 0.89: a fixed 0.6 dropped nothing), then in a fresh runtime built with it."""
    model = trtwsi.Model(MODELS / "demo-yolo11n.pt")
    with Runtime([model], **kw) as rt:
        low = rt.run(slide).detections
        thr = float(np.median(low.score))
        model.min_conf = thr
        high = rt.run(slide).detections
    with Runtime([trtwsi.Model(MODELS / "demo-yolo11n.pt", min_conf=thr)], **kw) as rt:
        fresh = rt.run(slide).detections
    assert 0 < len(high) < len(low) and high.score.min() > thr
    return low, high, fresh


def test_a_models_threshold_changed_between_slides_is_used_on_the_cpu(slide):
    _, high, fresh = _threshold_change(slide, device="cpu", batch=2, workers=1)
    np.testing.assert_array_equal(high.to_numpy(), fresh.to_numpy())


@gpu
@pytest.mark.gpu
def test_gpu_a_models_threshold_changed_between_slides_is_used(slide, monkeypatch):
    """Model.min_conf is a kernel argument the post-engine graph bakes in: raising it between
    two runs of one runtime must drop the low-score rows, as a fresh runtime does."""
    monkeypatch.setenv("TRTWSI_LAUNCH_GRAPHS", "1")
    kw = {"device": "cuda", "batch": 5, "workers": 2, "decode": "cpu"}
    _, high, fresh = _threshold_change(slide, **kw)
    np.testing.assert_array_equal(high.to_numpy(), fresh.to_numpy())


@gpu
@pytest.mark.gpu
def test_gpu_launch_graphs_capture_on_a_second_gpu(slide):
    """A runtime on cuda:1: the pipeline thread's current device is 0, the capture must still
    take cuda:1's stream (needs two GPUs)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    model = trtwsi.Model(MODELS / "demo-yolo11n.pt")
    kw = {"batch": 5, "workers": 2, "decode": "cpu"}
    with Runtime([model], device="cuda:1", **kw) as rt:
        on1 = rt.run(slide).detections
        g = rt._pipe.graphs
        assert g.enabled and g.off is None and g.replays > g.captures > 0, vars(g)
    with Runtime([model], device="cuda:0", **kw) as rt:
        on0 = rt.run(slide).detections
    # two cards of one model may still pick other conv algorithms: counts, not bits
    assert len(on1) > 0 and abs(len(on1) - len(on0)) <= max(2, 0.01 * len(on0))
