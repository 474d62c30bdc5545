"""The GPU tile pipeline end to end: same detections as the CPU reference path.

GPU tests (marker ``gpu``) skip with the reason unless torch sees a CUDA GPU and CuPy is
installed; the CPU tests check the pipeline's selection and errors where no GPU exists.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import trtwsi
from trtwsi._util.resources import bundled_models_dir
from trtwsi.errors import TrtwsiError
from trtwsi.ops.boxes import overlap_matrix
from trtwsi.plan.slide_plan import SlideOptions
from trtwsi.results.evaluate import precision_recall
from trtwsi.runtime import Runtime
from trtwsi.runtime.gpu.device import gpu_unavailable_reason
from trtwsi.synthetic import make_array, make_slide

MODELS = bundled_models_dir()
NMS_MODEL = MODELS / "demo-yolo11n.pt"
E2E_MODEL = MODELS / "demo-yolo26n.pt"
WHY = gpu_unavailable_reason()
gpu = pytest.mark.skipif(WHY is not None, reason=f"GPU pipeline unavailable: {WHY}")


def _match(a, b, iou_min=0.9):
    """Greedy one-to-one matching of two Detections tables (same class, IoU >= iou_min; among
    those candidates the closest score, so near-duplicates of one tile that an end-to-end head
    keeps pair with their own twins).

    Returns (matched fraction of the larger table, max |score difference| over matches)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0, 0.0
    iou = overlap_matrix(a.boxes, b.boxes)
    iou[a.class_id[:, None] != b.class_id[None, :]] = 0
    used = np.zeros(len(b), bool)
    diffs = []
    for i in np.argsort(-a.score):
        ok = ~used & (iou[i] >= iou_min)
        if not ok.any():
            continue
        j = int(np.argmin(np.where(ok, np.abs(b.score - a.score[i]), np.inf)))
        if ok[j]:
            used[j] = True
            diffs.append(abs(float(a.score[i]) - float(b.score[j])))
    return len(diffs) / n, max(diffs, default=0.0)


# --- CPU: selection and errors ---------------------------------------------------------------
def test_cpu_device_uses_reference_path():
    img, _ = make_array(700, 600, seed=3)
    p = trtwsi.Predictor(img, [trtwsi.Model(NMS_MODEL)], device="cpu")
    assert p.gpu_pipeline is False and p.batch == 2
    res = p.run(region=(0, 0, 700, 600))
    assert res.params["pipeline"] == "reference"


def test_default_batch_per_device():
    from trtwsi.runtime.runtime import default_batch

    assert default_batch("cpu", False) == 2
    assert default_batch("cuda:1", False) == 8
    assert default_batch("cuda:0", True) == 64


class _EngineUpTo:
    """A model whose TensorRT engine fits batches up to ``hi`` (None: no engine). A stand-in:
    no machine here can run a TensorRT engine on its GPU (TensorRT-RTX does not run on Hopper,
    the full TensorRT is not installable), so the real fit check cannot say yes."""

    def __init__(self, hi):
        self.hi = hi

    def resolve_backend(self, device, batch_size=None):
        if self.hi is None or (batch_size is not None and batch_size > self.hi):
            return "torch", "no engine fits"
        return "tensorrt", "fits"


@pytest.mark.parametrize(
    ("engines", "want"),
    [((None,), 64), ((128,), 64), ((32,), 32), ((48,), 32), ((None, 16), 16), ((1,), 1)],
)
def test_default_gpu_batch_keeps_a_fitting_engine(engines, want):
    from trtwsi.runtime.select import default_batch

    assert default_batch("cuda:0", True, [_EngineUpTo(h) for h in engines]) == want


def test_gpu_pipeline_on_cpu_is_a_clear_error():
    img, _ = make_array(700, 600, seed=3)
    with pytest.raises(TrtwsiError, match="needs a CUDA device"):
        trtwsi.Predictor(img, [trtwsi.Model(NMS_MODEL)], device="cpu", gpu_pipeline=True)


@pytest.mark.skipif(WHY is None, reason="this machine has a GPU")
def test_unavailable_reason_names_the_missing_part():
    assert WHY and ("GPU" in WHY or "CuPy" in WHY or "torch" in WHY)


# --- GPU ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "pipe.tif"
    gt = make_slide(path, 6000, 4500, seed=21)
    return path, gt


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("weights", [NMS_MODEL, E2E_MODEL], ids=["nms", "end2end"])
def test_gpu_pipeline_matches_cpu_path(slide, weights):
    path, gt = slide
    cpu = trtwsi.Predictor(path, [trtwsi.Model(weights)], device="cpu").run()
    # same pixels (libjpeg-turbo) on both sides: fp32 vs fp16 alone; the GPU JPEG lane's own
    # difference is measured by test_gpu_jpeg_lane_matches_cpu_decode
    gpu_res = trtwsi.Predictor(path, [trtwsi.Model(weights)], device="cuda", decode="cpu").run()
    assert gpu_res.params["pipeline"] == "gpu"
    frac, dscore = _match(cpu.detections, gpu_res.detections)
    # fp16 model vs fp32 model: a handful of borderline boxes may differ
    assert frac >= 0.97, (frac, len(cpu.detections), len(gpu_res.detections))
    assert dscore < 0.05
    # all sections go through one pipeline pass: each detection keeps its section
    assert len(cpu.sections) >= 2
    n_cpu = np.bincount(cpu.detections.section, minlength=len(cpu.sections))
    n_gpu = np.bincount(gpu_res.detections.section, minlength=len(cpu.sections))
    assert np.all(np.abs(n_cpu - n_gpu) <= np.maximum(2, 0.03 * n_cpu)), (n_cpu, n_gpu)
    for s in precision_recall(
        gpu_res.detections.boxes,
        gpu_res.detections.score,
        gpu_res.detections.class_id,
        gt.boxes,
        gt.class_names,
    ):
        assert s.precision >= 0.9 and s.recall >= 0.9, s.as_dict()
    t = gpu_res.timings
    for stage in ("gpu_preprocess", "gpu_infer", "gpu_postprocess"):
        assert t.get(stage, 0) > 0, (stage, t)
    for stage in ("read", "gpu_h2d"):
        assert t.get(stage, 0) > 0, (stage, t)


@gpu
@pytest.mark.gpu
def test_gpu_pipeline_matches_torch_cuda_reference_path(slide):
    """Same fp16 model on the same GPU: kernels vs reference ops must agree almost exactly."""
    path, _ = slide
    models = [trtwsi.Model(NMS_MODEL), trtwsi.Model(E2E_MODEL)]
    ref = trtwsi.Predictor(path, models, device="cuda", gpu_pipeline=False, batch=16).run()
    got = trtwsi.Predictor(
        path, models, device="cuda", gpu_pipeline=True, batch=16, decode="cpu"
    ).run()  # the same pixels: libjpeg-turbo on both sides
    for mi in range(2):
        a = ref.detections[ref.detections.model == mi]
        b = got.detections[got.detections.model == mi]
        frac, dscore = _match(a, b, iou_min=0.99)
        assert frac >= 0.995, (mi, frac, len(a), len(b))
        assert dscore < 5e-3


@gpu
@pytest.mark.gpu
def test_partial_batches_small_rings_borders_and_resize(slide):
    """Tiny batch and rings force partial-batch flushes and slot reuse; a region over the slide
    border gives filled tiles; mpp=1.0 on a 0.5 µm/px slide reads level 1 (or resizes)."""
    path, _ = slide
    m = trtwsi.Model(NMS_MODEL)
    region = (4500, 3000, 2000, 2000)  # runs past the 6000x4500 slide
    for kw in ({}, {"mpp": 1.0}):
        cpu = trtwsi.Predictor(path, [m], device="cpu", **kw).run(region=region)
        rings = {"host_slots": 2, "device_slots": 2, "depth": 2}
        with Runtime([m], device="cuda", batch=3, workers=2, pipeline_rings=rings) as rt:
            assert rt._pipe.host_slots == 2 and rt._pipe.depth == 2
            got = rt.run(path, SlideOptions(region=region, **kw))
        frac, _ = _match(cpu.detections, got.detections)
        assert frac >= 0.95, (kw, frac, len(cpu.detections), len(got.detections))
        assert got.n_tiles == cpu.n_tiles


@gpu
@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    import torch

    from trtwsi.engines.torch import TorchEngine

    m = trtwsi.Model(NMS_MODEL)
    g = m.load_engine("cuda", half=True, batch_size=4)
    e = TorchEngine(m, "cuda", half=True, batch_size=4, cuda_graph=False)
    assert g.use_graph and not e.use_graph
    # the preprocess kernel writes NHWC there: the forward converts nothing
    assert g.input.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand((4, 3, m.imgsz, m.imgsz), device="cuda", dtype=torch.float16)
    a = g.infer(x).clone()
    b = e.infer(x)
    assert torch.equal(a, b) or torch.allclose(a, b, atol=1e-2, rtol=1e-3)
    x2 = torch.rand_like(x)
    g.input.copy_(x2)
    assert torch.allclose(g.infer(g.input), e.infer(x2), atol=1e-2, rtol=1e-3)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("weights", [NMS_MODEL, E2E_MODEL], ids=["nms", "end2end"])
def test_gpu_compiled_model_gives_the_eager_models_detections(slide, weights):
    """torch.compile's fused kernels round fp16 differently from cuDNN's: the same boxes (the
    issue's bar for a changed model path: >= 99 % matched at IoU 0.9, class counts within 1 %),
    and the compile is timed in the runtime's start."""
    path, _ = slide
    m = trtwsi.Model(weights)
    kw = {"device": "cuda", "batch": 16, "workers": 4, "decode": "cpu"}
    with Runtime([m], **kw) as rt:
        want = rt.run(path)
        assert "compile" not in rt.start_timings
    with Runtime([m], compile=True, **kw) as rt:
        got = rt.run(path)
        eng = rt.engines[0]
        assert eng.compile and eng._compiled is not None and eng._graph is not None
        assert rt.start_timings["compile"] > 0
        assert eng.compiled_by == "torch.compile" and eng.package is None
    assert len(want.detections) > 100
    frac, dscore = _match(want.detections, got.detections)
    assert frac >= 0.99, (frac, len(want.detections), len(got.detections))
    assert dscore < 0.05  # the fp16 bar of the other model-path tests (measured 0.030, end2end)
    n_want = np.bincount(want.detections.class_id, minlength=2)
    n_got = np.bincount(got.detections.class_id, minlength=2)
    assert np.all(np.abs(n_want - n_got) <= np.maximum(1, 0.01 * n_want)), (n_want, n_got)


_PACKAGE_RUN = """
import sys, numpy as np, trtwsi
from trtwsi.runtime import Runtime
path, weights, out = sys.argv[1:4]
kw = {"device": "cuda", "batch": 16, "workers": 4, "decode": "cpu"}
hows = []
for i in range(2):  # the first runtime builds the package (or finds it), the second loads it
    with Runtime([trtwsi.Model(weights)], compile=True, **kw) as rt:
        d = rt.run(path).detections
        hows.append(rt.engines[0].compiled_by)
np.savez(out, boxes=d.boxes, scores=d.score, class_id=d.class_id, hows=np.array(hows))
"""


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(
    os.environ.get("TRTWSI_TEST_COMPILE_PACKAGE") != "1",
    reason="on demand (TRTWSI_TEST_COMPILE_PACKAGE=1): loading a package segfaulted in 6 of 9 "
    "loads on an H100 with torch 2.11 (README, 'The compiled model kept on disk')",
)
@pytest.mark.parametrize("weights", [NMS_MODEL, E2E_MODEL], ids=["nms", "end2end"])
def test_gpu_compiled_package_gives_the_eager_models_detections(slide, weights, tmp_path):
    """TRTWSI_COMPILE_PACKAGE=1 (experimental): the AOTInductor package, built by a child
    process then loaded, passes the eager model's bar. Run in a process of its own: its first
    run on an H100 (torch 2.11) crashed with a segfault, which here fails this test only."""
    path, _ = slide
    m = trtwsi.Model(weights)
    with Runtime([m], device="cuda", batch=16, workers=4, decode="cpu") as rt:
        want = rt.run(path).detections
    env = {**os.environ, "TRTWSI_COMPILE_PACKAGE": "1"}
    out = tmp_path / "got.npz"
    r = subprocess.run(
        [
            sys.executable,
            "-X",
            "faulthandler",
            "-c",
            _PACKAGE_RUN,
            str(path),
            str(weights),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    got = np.load(out)
    assert got["hows"][0] in ("package built", "package loaded"), got["hows"]
    assert got["hows"][1] == "package loaded", got["hows"]
    assert len(want) > 100
    table = trtwsi.Detections.from_arrays(got["boxes"], got["scores"], got["class_id"])
    frac, dscore = _match(want, table)
    assert frac >= 0.99, (frac, len(want), len(got["boxes"]))
    assert dscore < 0.05
    n_want = np.bincount(want.class_id, minlength=2)
    n_got = np.bincount(got["class_id"], minlength=2)
    assert np.all(np.abs(n_want - n_got) <= np.maximum(1, 0.01 * n_want)), (n_want, n_got)


@gpu
@pytest.mark.gpu
def test_device_info():
    from trtwsi.runtime.gpu.device import device_info

    info = device_info(0)
    assert info.compute_capability[0] >= 5 and info.multiprocessors > 0
    assert info.as_dict()["compute_capability"].count(".") == 1


@gpu
@pytest.mark.gpu
def test_gpu_jpeg_lane_matches_cpu_decode(slide):
    """JPEG chunks decoded by nvJPEG (the lane) vs by the CPU readers, same fp16 model: the
    issue's bar is >= 99 % of boxes matched at IoU 0.9 and per-class counts within 1 %. With
    ``decode_depth=1`` both decoders take chunks of the same slide."""
    path, gt = slide
    m = trtwsi.Model(NMS_MODEL)
    with Runtime([m], device="cuda", decode="cpu") as rt:
        assert rt.decode == "cpu"
        ref = rt.run(path)
    from trtwsi.read.jpeg_batch import jpeg_batch_unavailable

    why = jpeg_batch_unavailable("cuda")
    if why:
        pytest.skip(why)
    for rings in ({}, {"decode_depth": 1}):
        with Runtime([m], device="cuda", decode="gpu", pipeline_rings=rings) as rt:
            got = rt.run(path)
            lane = rt._pipe.lane
            assert got.params["decode"] == "gpu+cpu"
            assert lane.chunks > 0 and lane.cpu_tiles == 0
        t = got.timings
        assert t.get("read_gpu", 0) > 0 and t.get("gpu_place", 0) > 0, t
        if rings:
            assert t.get("gpu_h2d", 0) > 0, t  # the CPU readers took some chunks too
        frac, dscore = _match(ref.detections, got.detections)
        assert dscore < 0.05
        assert frac >= 0.99, (rings, frac, len(ref.detections), len(got.detections))
        n_ref = np.bincount(ref.detections.class_id, minlength=2)
        n_got = np.bincount(got.detections.class_id, minlength=2)
        assert np.all(np.abs(n_ref - n_got) <= np.maximum(1, 0.01 * n_ref)), (n_ref, n_got)
        assert got.n_tiles == ref.n_tiles and not got.errors
        for st in precision_recall(
            got.detections.boxes, got.detections.score, got.detections.class_id,
            gt.boxes, gt.class_names,
        ):  # fmt: skip
            assert st.precision >= 0.9 and st.recall >= 0.9, st.as_dict()


@gpu
@pytest.mark.gpu
def test_gpu_jpeg_lane_joins_after_its_probe(slide):
    """decode="auto" with few CPU readers does not wait for the nvJPEG probe: the runtime
    starts with the CPU readers and the lane joins once its probe is done; a failed probe
    leaves the CPU. With many readers there is no lane and no probe."""
    path, _ = slide
    m = trtwsi.Model(NMS_MODEL)
    with Runtime([m], device="cuda", decode="auto", workers=8) as rt:
        # with 8 CPU readers the lane is not worth its start (pipeline.LANE_WORKERS)
        assert rt._pipe._lane_probe is None and rt._pipe.lane is None
        assert rt.decode == "cpu" and "keeps up" in rt._pipe.decode_off
    with Runtime([m], device="cuda", decode="auto", workers=4) as rt:
        pipe = rt._pipe
        probe = pipe._lane_probe
        if probe is not None:
            assert rt.decode == "cpu" or probe.done()
            probe.result()
        why = pipe.decode_off if pipe.adopt_lane() is None else None
        if why:
            assert rt.decode == "cpu"
            pytest.skip(why)
        assert rt.decode == "gpu+cpu" and pipe.decode_probe_seconds > 0
        got = rt.run(path)
        assert got.params["decode"] == "gpu+cpu" and pipe.lane.chunks > 0
        assert not got.errors


@gpu
@pytest.mark.gpu
def test_gpu_process_exits_cleanly_while_the_jpeg_probe_runs(slide):
    """A script that starts a Runtime (decode="auto"), runs a slide and exits without closing
    it while the nvJPEG probe may still run: exit code 0 (a daemon probe thread inside
    torchvision's CUDA code at exit aborted the process on the H200)."""
    import subprocess
    import sys

    path, _ = slide
    code = (
        "import trtwsi\n"
        "if __name__ == '__main__':\n"
        f"    rt = trtwsi.Runtime([trtwsi.Model({str(NMS_MODEL)!r})], device='cuda', workers=4)\n"
        f"    print(len(rt.run({str(path)!r}).detections))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip().splitlines()[-1]) > 0


@gpu
@pytest.mark.gpu
def test_gpu_jpeg_lane_corrupt_tile(slide, tmp_path):
    """A tile of junk under the lane: the batch falls back per tile, the slide's CPU reader
    records the error and fills the tile, every other tile keeps its detections."""
    import shutil

    from tests.slide.conftest import segment_location

    src, _ = slide
    path = tmp_path / "bad.tif"
    shutil.copy(src, path)
    # a tile well inside the first section's tissue (level 0, 256-px tiles)
    with trtwsi.open_slide(path) as s:
        sec = trtwsi.find_sections(s)[0]
        x, y, w, h = sec.bbox
        lv = s.levels[0]
        r, c = (y + h // 2) // lv.tile_height, (x + w // 2) // lv.tile_width
        index = r * -(-s.width // lv.tile_width) + c
    off, _ = segment_location(path, index)
    with open(path, "r+b") as f:
        f.seek(off + 2)
        f.write(b"\x00junk" * 8)
    m = trtwsi.Model(NMS_MODEL)
    outs = {}
    for decode in ("cpu", "gpu"):
        with (
            Runtime([m], device="cuda", decode=decode) as rt,
            pytest.warns(RuntimeWarning, match="could not be read"),
        ):
            outs[decode] = rt.run(path)
    for res in outs.values():
        assert [tuple(e["tile"]) for e in res.errors] == [(r, c)], res.errors
    frac, _ = _match(outs["cpu"].detections, outs["gpu"].detections)
    assert frac >= 0.99, frac
