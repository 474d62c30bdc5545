"""backend="onnxruntime" and backend="openvino": the model's graph on the CPU, against PyTorch.

Both are real runtimes installed by the test extras (``trtwsi[onnxruntime]`` via ``export``,
``trtwsi[openvino]``); a test skips only where its runtime is not importable.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import trtwsi
from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines.graph_check import MAX_ABS_DIFF, output_difference
from trtwsi.errors import BackendError
from trtwsi.results.evaluate import match_detections
from trtwsi.synthetic import make_array

pytest.importorskip("onnx")

MODELS = bundled_models_dir()
BACKENDS = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(b) is None, reason=f"pip install 'trtwsi[{b}]'"
        ),
    )
    for b in ("onnxruntime", "openvino")
]


def _engine_class(backend):
    if backend == "onnxruntime":
        from trtwsi.engines.onnxrt import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    from trtwsi.engines.openvino import OpenVinoEngine

    return OpenVinoEngine


@pytest.fixture(scope="module")
def image():
    img, _ = make_array(1400, 1100, seed=8)
    return img


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights", ["demo-yolo11n.pt", "demo-yolo26n.pt"], ids=["nms", "end2end"])
def test_raw_outputs_match_torch(backend, weights, image):
    """Real tiles (a synthetic scene) through the graph backend and PyTorch: the raw head
    outputs agree within the engine's own build check, at batch 1 and 3 (dynamic batch):
    elementwise for the NMS head, row by row (paired by class and closeness) for the
    end-to-end top K."""
    import torch

    m = trtwsi.Model(MODELS / weights)
    eng = _engine_class(backend)(m)
    torch_eng = trtwsi.Model(MODELS / weights, backend="torch").load_engine("cpu")
    tiles = np.stack([image[y : y + 640, x : x + 640] for y, x in ((0, 0), (400, 700), (460, 0))])
    for n in (1, 3):  # 640² tiles at imgsz 640: the letterbox is the identity
        x = torch.from_numpy(tiles[:n]).permute(0, 3, 1, 2).float() / 255
        a, b = eng.infer(x), torch_eng.infer(x)
        assert a.shape == b.shape and a.dtype == torch.float32
        assert output_difference(a, b, m.head) <= MAX_ABS_DIFF
        if m.head == "end2end":  # boxes found on these tiles, so the pairing was exercised
            assert (b[..., 4] >= 0.1).sum() > 5
    assert 0 <= eng.max_abs_diff <= MAX_ABS_DIFF
    eng.close()


@pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="pip install 'trtwsi[openvino]'"
)
@pytest.mark.parametrize("weights", ["demo-yolo11n.pt", "demo-yolo26n.pt"], ids=["nms", "end2end"])
def test_openvino_static_shape_pads_and_splits_other_batches(weights, image):
    """Compiled for batch 2 (``shape_batch``), batches of 1, 2, 3 and 5 (padded, exact, split
    and padded) give each tile the output the dynamic-batch engine gives it."""
    import torch

    from trtwsi.engines.openvino import OpenVinoEngine

    m = trtwsi.Model(MODELS / weights)
    static, dynamic = OpenVinoEngine(m, shape_batch=2), OpenVinoEngine(m)
    assert static.shape_batch == 2 and dynamic.shape_batch is None
    corners = ((0, 0), (400, 700), (460, 0), (0, 760), (300, 300))
    tiles = np.stack([image[y : y + 640, x : x + 640] for y, x in corners])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    want = dynamic.infer(x)
    for n in (1, 2, 3, 5):
        got = static.infer(x[:n])
        assert got.shape == want[:n].shape
        assert output_difference(got, want[:n], m.head) <= 1e-3
    with pytest.raises(ValueError, match="shape_batch"):
        OpenVinoEngine(m, shape_batch=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_predictor_detections_match_torch(backend, image):
    """The same region through the Predictor with either backend: every box matched at IoU
    0.9, same classes, scores within 0.01."""
    region = (0, 0, 1400, 1100)
    got = trtwsi.Predictor(
        image, [trtwsi.Model(MODELS / "demo-yolo11n.pt", backend=backend)], device="cpu"
    ).run(region=region)
    want = trtwsi.Predictor(
        image, [trtwsi.Model(MODELS / "demo-yolo11n.pt", backend="torch")], device="cpu"
    ).run(region=region)
    assert got.models[0]["backend"] == backend and want.models[0]["backend"] == "torch"
    g, w = got.detections, want.detections
    assert len(w) > 10 and len(g) == len(w)
    gt = np.column_stack([w.boxes, w.class_id])
    idx, iou = match_detections(g.boxes, g.score, g.class_id, gt, 0.9)
    assert (idx >= 0).all(), iou
    assert np.abs(g.score - w.score[idx]).max() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_build_check_refuses_a_differing_graph(backend):
    """The build-time comparison with PyTorch is a real gate: with no tolerance it refuses,
    naming the runtime and the fix."""
    from trtwsi.engines.graph_check import check_against_torch

    eng = _engine_class(backend)(trtwsi.Model(MODELS / "demo-yolo11n.pt"))
    with pytest.raises(BackendError, match=r"differs from PyTorch's.*backend='torch'"):
        check_against_torch(eng, backend, limit=-1.0)
    assert check_against_torch(eng, backend) == eng.max_abs_diff


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="needs openvino")
def test_auto_on_the_cpu_is_openvino_and_falls_back_to_torch(monkeypatch):
    """backend="auto" on the CPU runs OpenVINO when it is installed; if OpenVINO cannot build
    the model, one warning names why and PyTorch runs it."""
    from trtwsi.engines import openvino
    from trtwsi.engines.model import cpu_graph_backend
    from trtwsi.engines.torch import TorchEngine

    assert cpu_graph_backend() == "openvino"
    m = trtwsi.Model(MODELS / "demo-yolo11n.pt")
    assert type(m.load_engine("cpu")).__name__ == "OpenVinoEngine"

    def broken(self, *a, **k):
        raise RuntimeError("no CPU plugin")

    monkeypatch.setattr(openvino.OpenVinoEngine, "__init__", broken)
    with pytest.warns(
        UserWarning, match=r"OpenVINO could not run it \(RuntimeError: no CPU plugin"
    ):
        assert isinstance(m.load_engine("cpu"), TorchEngine)
    for strict in (
        trtwsi.Model(MODELS / "demo-yolo11n.pt", backend="openvino"),  # asked for by name
        trtwsi.Model(MODELS / "demo-yolo11n.pt", fallback_to_pt=False),  # PyTorch refused
    ):
        with pytest.raises(RuntimeError, match="no CPU plugin"):
            strict.load_engine("cpu")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_backend_is_named_in_config_and_cli(backend, tmp_path):
    from trtwsi.app.cli import build_parser
    from trtwsi.engines.model import load_models_config

    toml = tmp_path / "models.toml"
    toml.write_text(f'[[model]]\nweights = "{MODELS / "demo-yolo11n.pt"}"\nbackend = "{backend}"\n')
    (m,) = load_models_config(toml)
    assert m.backend == backend
    assert m.resolve_backend("cpu")[0] == backend
    a = build_parser().parse_args(["predict", "s.tif", "--backend", backend])
    assert a.backend == backend
    toml.write_text(f'[[model]]\nweights = "{MODELS / "demo-yolo11n.pt"}"\nbackend = "onnx"\n')
    with pytest.raises(trtwsi.TrtwsiError, match=backend):
        load_models_config(toml)
