"""Model: loading, metadata, head selection, bad inputs, backend resolution, TOML configs, engine."""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings

import pytest
import torch

from trtwsi.engines.base import Engine
from trtwsi.engines.model import Model, ModelNotFoundError, load_models_config
from trtwsi.engines.torch import TorchEngine
from trtwsi.errors import BackendError, ModelError


@pytest.fixture(scope="module")
def v11(yolo_pt):
    return yolo_pt("yolo11n.yaml")


@pytest.fixture(scope="module")
def v26(yolo_pt):
    return yolo_pt("yolo26n.yaml")


# --- loading and metadata -----------------------------------------------------------------


def test_yolo11_metadata(v11):
    m = Model(v11)
    assert (m.nc, m.stride, m.imgsz, m.head) == (3, 32, 640, "nms")
    assert m.names == ["class0", "class1", "class2"]
    assert m.name == v11.stem and m.weights == v11
    assert (m.min_conf, m.iou, m.max_det) == (0.25, 0.45, 300)
    assert m.sha256 == hashlib.sha256(v11.read_bytes()).hexdigest()
    assert "yolo11n" in repr(m)


def test_module_is_fused_eval_float_and_outputs_raw_nms_head(v11):
    m = Model(v11, imgsz=64)
    net = m.module
    assert net is m.module  # built once
    assert not net.training and net.is_fused()
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
    with torch.inference_mode():
        y = net(torch.rand(2, 3, 64, 64))[0]
    assert y.shape == (2, 4 + 3, 8 * 8 + 4 * 4 + 2 * 2)  # xywh + class scores per anchor
    assert y[:, 4:].min() >= 0 and y[:, 4:].max() <= 1  # sigmoid scores


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolov10n.yaml"])
def test_end2end_models(yolo_pt, cfg):
    m = Model(yolo_pt(cfg, contrast=cfg != "yolov10n.yaml"), imgsz=64, max_det=50)
    assert m.head == "end2end"
    with torch.inference_mode():
        y = m.module(torch.rand(1, 3, 64, 64))[0]
    assert y.shape == (1, 50, 6)  # x1 y1 x2 y2 score class, top-50
    assert torch.all(y[0, :-1, 4] >= y[0, 1:, 4])  # by descending score
    assert set(y[0, :, 5].tolist()) <= {0.0, 1.0, 2.0}


def test_end2end_checkpoint_can_run_its_one_to_many_head(v26):
    m = Model(v26, imgsz=64, head="nms")
    assert m.head == "nms"
    with torch.inference_mode():
        y = m.module(torch.rand(1, 3, 64, 64))[0]
    assert y.shape == (1, 7, 84)


def test_nms_model_has_no_end2end_head(v11):
    with pytest.raises(ModelError, match="no end-to-end"):
        Model(v11, head="end2end")


def test_classes_override(v11):
    assert Model(v11, classes=["a", "b", "c"]).names == ["a", "b", "c"]
    assert Model(v11, classes={2: "c", 0: "a", 1: "b"}).names == ["a", "b", "c"]
    assert Model(v11, classes={"0": "a", "1": "b", "2": "c"}).names == ["a", "b", "c"]  # TOML keys


@pytest.mark.parametrize("classes", [["a", "b"], ["a", "b", "c", "d"], {0: "a", 1: "b", 3: "d"}])
def test_classes_mismatch_names_both_counts(v11, classes):
    with pytest.raises(ModelError, match=rf"{len(classes)} classes.*3 classes"):
        Model(v11, classes=classes)


def test_classes_wrong_type(v11):
    with pytest.raises(ModelError, match="list of names"):
        Model(v11, classes="abc")


def test_imgsz(v11):
    assert Model(v11, imgsz=320).imgsz == 320
    with pytest.raises(ModelError, match=r"multiple of the model stride 32.*e\.g\. 96"):
        Model(v11, imgsz=100)
    with pytest.raises(ModelError, match="positive int"):
        Model(v11, imgsz=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_conf": 1.5}, "min_conf"),
        ({"iou": -0.1}, "iou"),
        ({"backend": "onnx"}, "backend"),
        ({"head": "yolo"}, "head"),
        ({"max_det": 0}, "max_det"),
    ],
)
def test_bad_arguments(v11, kwargs, match):
    with pytest.raises(ModelError, match=match):
        Model(v11, **kwargs)


# --- bad files ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelNotFoundError, match=r"nope\.pt") as e:
        Model(missing)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ModelError)
    with pytest.raises(ModelError, match="not a file"):
        Model(tmp_path)


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match=r"random\.pt.*not a readable PyTorch checkpoint"):
        Model(bad)


def test_truncated_checkpoint(tmp_path, v11):
    bad = tmp_path / "truncated.pt"
    data = v11.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"truncated\.pt.*not a readable PyTorch checkpoint"):
        Model(bad)


def test_plain_dict_and_state_dict(tmp_path, v11):
    plain = tmp_path / "plain.pt"
    torch.save({"a": 1}, plain)
    with pytest.raises(ModelError, match=r"plain\.pt.*not an ultralytics YOLO checkpoint.*\['a'\]"):
        Model(plain)
    sd = tmp_path / "state_dict.pt"
    torch.save(Model(v11).module.state_dict(), sd)
    with pytest.raises(
        ModelError, match=r"state_dict\.pt.*not an ultralytics YOLO checkpoint.*dict with keys"
    ):
        Model(sd)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {"weights": torch.zeros(3)}}, wrapped)
    with pytest.raises(ModelError, match="not an ultralytics YOLO checkpoint"):
        Model(wrapped)


@pytest.mark.parametrize(
    ("cfg", "task"),
    [
        ("yolo11n-seg.yaml", "segment"),
        ("yolo11n-cls.yaml", "classify"),
        ("yolo11n-pose.yaml", "pose"),
    ],
)
def test_wrong_task(yolo_pt, cfg, task):
    with pytest.raises(ModelError, match=rf"is a '{task}' model.*needs a detect model"):
        Model(yolo_pt(cfg))


# --- backends and engines -----------------------------------------------------------------


def test_resolve_backend(v11, monkeypatch):
    import trtwsi.engines.model as model_mod

    monkeypatch.setattr(model_mod, "cpu_graph_backend", lambda: None)  # OpenVINO not installed
    kind, reason = Model(v11).resolve_backend("cpu")
    assert kind == "torch" and "CUDA" in reason and "PyTorch" in reason
    monkeypatch.setattr(model_mod, "cpu_graph_backend", lambda: "openvino")
    kind, reason = Model(v11).resolve_backend("cpu")
    assert kind == "openvino" and "backend='torch' to opt out" in reason
    kind, reason = Model(v11, backend="torch").resolve_backend("cpu")
    assert kind == "torch" and "backend='torch'" in reason
    kind, reason = Model(v11).resolve_backend("cuda")  # resolution only; nothing runs on the GPU
    assert kind == "torch" and "no TensorRT engine next to" in reason
    assert "python -m trtwsi.export.build --fp16 --model" in reason


def test_resolve_backend_errors(v11, monkeypatch):
    import trtwsi.engines.model as model_mod

    with pytest.raises(BackendError, match=r"backend='tensorrt' but .* not a CUDA GPU"):
        Model(v11, backend="tensorrt").resolve_backend("cpu")
    monkeypatch.setattr(model_mod, "cpu_graph_backend", lambda: None)  # no OpenVINO: PyTorch
    with pytest.raises(BackendError, match="fallback_to_pt=False"):
        Model(v11, fallback_to_pt=False).resolve_backend("cpu")
    with pytest.raises(BackendError):
        Model(v11, backend="tensorrt").load_engine("cpu")


def test_load_engine_cpu(v11, monkeypatch):
    import trtwsi.engines.model as model_mod

    monkeypatch.setattr(model_mod, "cpu_graph_backend", lambda: None)  # the PyTorch default
    m = Model(v11, imgsz=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning on the CPU
        eng = m.load_engine("cpu", batch_size=2)
    assert isinstance(eng, TorchEngine) and isinstance(eng, Engine)
    assert (eng.batch_size, eng.imgsz, eng.dtype, eng.device, eng.head) == (
        2,
        64,
        torch.float32,
        torch.device("cpu"),
        "nms",
    )
    # the engine runs its own NHWC copy; the Model's module stays as it was
    assert eng.module is not m.module and eng.channels_last
    assert m.module.model[0].conv.weight.is_contiguous()
    assert eng.module.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64)
    y = eng.infer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 7, 84)
    with torch.inference_mode():  # NHWC convolutions sum in another order: last bits differ
        torch.testing.assert_close(y, m.module(x)[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(eng.infer(x.double()), y)  # inputs are cast to the engine dtype


@pytest.mark.parametrize(
    ("shape", "match"),
    [((3, 3, 64, 64), "exactly 2"), ((2, 3, 32, 32), r"\(B, 3, 64, 64\)"), ((2, 64, 64), "shape")],
)
def test_engine_rejects_bad_batches(v11, shape, match):
    eng = Model(v11, imgsz=64).load_engine("cpu", batch_size=2)
    with pytest.raises(ValueError, match=match):
        eng.infer(torch.rand(shape))


def test_engine_rejects_uint8(v11):
    eng = Model(v11, imgsz=64).load_engine("cpu")
    with pytest.raises(ValueError, match="float"):
        eng.infer(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_torch_engine_half_keeps_its_own_copy(v11):
    m = Model(v11, imgsz=64)
    eng = TorchEngine(m, "cpu", half=True)
    assert eng.dtype == torch.float16 and eng.module is not m.module
    assert next(m.module.parameters()).dtype == torch.float32


# --- configs ------------------------------------------------------------------------------


def test_load_models_config(tmp_path, v11, v26):
    (tmp_path / "weights").mkdir()
    shutil.copy(v11, tmp_path / "weights" / "demo-yolo11n.pt")
    cfg = tmp_path / "models.toml"
    cfg.write_text(
        f"""
[[model]]
name = "demo"
weights = "weights/demo-yolo11n.pt"   # relative to this file
min_conf = 0.3
iou = 0.5
classes = ["nucleus", "metaphase", "other"]

[[model]]
weights = "{v26.as_posix()}"
imgsz = 320
classes = {{0 = "a", 1 = "b", 2 = "c"}}
"""
    )
    a, b = load_models_config(cfg)
    assert (a.name, a.min_conf, a.iou, a.names) == (
        "demo",
        0.3,
        0.5,
        ["nucleus", "metaphase", "other"],
    )
    assert a.weights == tmp_path / "weights" / "demo-yolo11n.pt"
    assert (b.name, b.imgsz, b.head, b.names) == (v26.stem, 320, "end2end", ["a", "b", "c"])


def test_from_config(v11):
    m = Model.from_config({"weights": v11.name, "name": "x"}, base_dir=v11.parent)
    assert m.name == "x" and m.weights == v11
    with pytest.raises(ModelError, match=r"unknown model config key\(s\) \['min_confidence'\]"):
        Model.from_config({"weights": str(v11), "min_confidence": 0.3})
    with pytest.raises(ModelError, match="no 'weights'"):
        Model.from_config({"name": "x"})


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("[[model]\nname = 1", ModelError, "not valid TOML"),
        ("title = 'no models'", ModelError, r"no \[\[model\]\] tables"),
        (
            '[[model]]\nname = "m1"\nweights = "missing.pt"',
            ModelNotFoundError,
            "model #1 'm1': model weights not found",
        ),
        (
            '[[model]]\nweights = "w.pt"\nclasess = ["a"]',
            ModelError,
            "model #1: unknown model config key",
        ),
    ],
)
def test_bad_models_config(tmp_path, text, error, match):
    cfg = tmp_path / "models.toml"
    cfg.write_text(text)
    with pytest.raises(error, match=match):
        load_models_config(cfg)


def test_models_config_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match="models config not found"):
        load_models_config(tmp_path / "nope.toml")
