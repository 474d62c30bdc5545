"""trtwsi.export.build with the real TensorRT-RTX builder on the CPU, and the FP16 ONNX numerics.

Nothing is mocked: the demo models are exported to ONNX, converted to the mixed FP16 graph,
checked with onnxruntime against the .pt, parsed and built by TensorRT-RTX for compute
capability 8.6 (its builder needs no GPU), once per session at imgsz 320, batch 1..4 (the
default 640 / batch 32 build works too; timed by hand in the README).
"""

from __future__ import annotations

import json
import shutil

import pytest

from trtwsi.engines.model import Model

pytest.importorskip("onnxruntime", reason="export needs onnxruntime (pip install 'trtwsi[export]')")
pytest.importorskip("onnxconverter_common", reason="pip install 'trtwsi[export]'")

from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines import tensorrt as trt_adapter
from trtwsi.engines.sidecar import engine_filename, find_engines, read_sidecar
from trtwsi.export import build

ARGS = ["--fp16", "--imgsz", "320", "--batch-size", "4", "--opt-batch", "2"]
ARGS += ["--compute-capability", "8.6", "--no-progress", "--keep-onnx"]


def _rtx():
    try:
        return trt_adapter.load_module("tensorrt_rtx")
    except Exception as e:
        pytest.skip(f"TensorRT-RTX is not installed ({e}); pip install 'trtwsi[tensorrt-rtx]'")


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The two demo models copied to a tmp folder and built there: {stem: (weights, engine)}."""
    _rtx()
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for stem in ("demo-yolo11n", "demo-yolo26n"):
        w = root / f"{stem}.pt"
        shutil.copy(bundled_models_dir() / f"{stem}.pt", w)
        assert build.main(["--model", str(w), "--flavour", "tensorrt_rtx", *ARGS]) == 0
        (engine,) = root.glob(f"{stem}.*.engine")
        out[stem] = (w, engine)
    return out


@pytest.mark.parametrize("stem", ["demo-yolo11n", "demo-yolo26n"])
def test_engine_and_sidecar(built, stem):
    weights, engine = built[stem]
    mod = _rtx()
    meta = read_sidecar(engine)
    model = Model(weights, imgsz=320)
    assert engine.stat().st_size > 1_000_000  # a real plan (the demo models are ~9 MiB)
    assert engine.name == engine_filename(weights, meta)
    head = "nms" if stem.endswith("11n") else "end2end"
    assert engine.name == (f"{stem}.320.{head}.b1-4.fp16.trtrtx-{mod.version}.sm86.engine")
    assert (meta.imgsz, meta.stride, meta.head, meta.precision) == (320, 32, head, "fp16")
    assert (meta.batch_min, meta.batch_opt, meta.batch_max) == (1, 2, 4)
    assert (meta.flavour, meta.trt_version) == ("tensorrt_rtx", mod.version)
    assert meta.compute_capabilities == ["8.6"] and meta.gpu_name is None
    assert meta.weights_sha256 == model.sha256 and meta.names == ["nucleus", "metaphase"]
    assert meta.output_shape == ([-1, 6, 2100] if head == "nms" else [-1, 300, 6])
    assert meta.build_seconds is not None and meta.built_at
    raw = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert raw["sidecar_version"] == 1
    # the FP16 ONNX was checked against the .pt before building (stated tolerances)
    check = meta.fp16_check
    assert check["passed"] and check["n_ref"] > 0
    assert check["matched_fraction"] >= 0.95
    assert check["max_score_diff"] <= 0.02 and check["max_box_diff_px"] <= 1.0
    assert [p for p, _ in find_engines(weights)] == [engine]


def test_fp16_onnx_graph(built):
    """fp32 input/output, fp16 weights in the convs, the Detect tail kept in fp32."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto

    from trtwsi.export.fp16 import HEAD_BRANCHES

    _, engine = built["demo-yolo11n"]
    fp16 = engine.with_name(engine.name.removesuffix(".engine") + ".onnx")
    g = onnx.load(str(fp16)).graph
    assert g.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert g.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    types = {i.name: i.data_type for i in g.initializer}
    conv_w = [n.input[1] for n in g.node if n.op_type == "Conv" and n.input[1] in types]
    tail_w = [w for n in g.node if n.op_type == "Conv" and "/dfl/" in n.name for w in n.input[1:2]]
    assert tail_w and all(types[w] == TensorProto.FLOAT for w in tail_w)  # DFL conv in fp32
    half = [w for w in conv_w if w not in tail_w]
    assert half and all(types[w] == TensorProto.FLOAT16 for w in half)
    assert not any(b in w for w in tail_w for b in HEAD_BRANCHES)


def test_fp16_numerics_onnxruntime(built):
    """The FP16 ONNX vs the .pt with onnxruntime on the CPU, on 8 synthetic tiles."""
    from trtwsi.app.compare import sample_tiles
    from trtwsi.export.fp16 import check_numerics

    for stem in ("demo-yolo11n", "demo-yolo26n"):
        weights, engine = built[stem]
        fp16 = engine.with_name(engine.name.removesuffix(".engine") + ".onnx")
        model = Model(weights, imgsz=320)
        a = check_numerics(fp16, model, sample_tiles(320, 8))
        assert a.passed, a.summary()
        assert a.n_ref >= 10 and a.matched == a.n_ref == a.n_test
        assert a.max_score_diff <= 0.02 and a.max_box_diff_px <= 1.0


def test_up_to_date_is_not_rebuilt(built, capsys):
    weights, engine = built["demo-yolo11n"]
    mtime = engine.stat().st_mtime_ns
    assert build.main(["--model", str(weights), "--flavour", "tensorrt_rtx", *ARGS]) == 0
    assert "up to date" in capsys.readouterr().err
    assert engine.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--compute-capability", "9.0"], "Hopper 9.0"),
        (["--min-batch", "8"], "--min-batch"),
    ],
)
def test_bad_options(built, capsys, extra, match):
    weights, _ = built["demo-yolo11n"]
    args = ["--model", str(weights), "--flavour", "tensorrt_rtx", "--imgsz", "320"]
    args += ["--batch-size", "4", "--no-progress", *extra]
    if "--compute-capability" not in extra:
        args += ["--compute-capability", "8.6"]
    assert build.main([*args, "--force"]) == 1
    assert match in capsys.readouterr().err


def test_no_gpu_needs_a_target(built, capsys):
    if trt_adapter.cuda_device_info()[0] is not None:
        pytest.skip("a GPU is visible: the build would target it")
    weights, _ = built["demo-yolo11n"]
    args = ["--model", str(weights), "--flavour", "tensorrt_rtx", "--no-progress", "--force"]
    assert build.main(args) == 1
    assert "--compute-capability X.Y" in capsys.readouterr().err
