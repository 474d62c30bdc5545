"""Engine sidecars, file names, the fit check and Model backend resolution with its warnings.

The sidecars here are written by the test (the plan files are placeholders: resolution decides
from the sidecar alone, before reading a plan). The GPU and the TensorRT module are faked with
monkeypatch where a test needs "a GPU of compute capability X with TensorRT Y", because no such
GPU exists on CI; everything else is real.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings

import pytest

from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines import sidecar, tensorrt
from trtwsi.engines.model import Model
from trtwsi.engines.sidecar import EngineMeta, RuntimeInfo, check_fit, engine_filename
from trtwsi.errors import BackendError, EngineMismatchError

RTX = "1.7.1.116"


@pytest.fixture
def pt(tmp_path):
    w = tmp_path / "demo-yolo11n.pt"
    shutil.copy(bundled_models_dir() / "demo-yolo11n.pt", w)
    return w


@pytest.fixture(scope="module")
def sha():
    return Model.file_sha256(bundled_models_dir() / "demo-yolo11n.pt")


def meta_for(sha: str, **kw) -> EngineMeta:
    base = dict(
        weights="demo-yolo11n.pt",
        weights_sha256=sha,
        names=["nucleus", "metaphase"],
        imgsz=640,
        stride=32,
        head="nms",
        max_det=300,
        precision="fp16",
        batch_min=1,
        batch_opt=32,
        batch_max=32,
        flavour="tensorrt_rtx",
        trt_version=RTX,
        compute_capabilities=["8.6"],
        output_shape=[-1, 6, 8400],
    )
    base.update(kw)
    return EngineMeta(**base)


def place(weights, meta: EngineMeta):
    """Write a placeholder plan and the real sidecar next to ``weights``; return the plan."""
    path = weights.parent / engine_filename(weights, meta)
    path.write_bytes(b"not a plan: resolution never reads it")
    sidecar.sidecar_path(path).write_text(meta.to_json())
    return path


@pytest.fixture
def gpu(monkeypatch):
    """Pretend torch sees a GPU of compute capability ``cc`` and TensorRT-RTX ``version`` is
    importable (neither exists on CI)."""

    def set_(cc="8.6", flavour="tensorrt_rtx", version=RTX):
        def fake(device=None, flav=None):
            f = flav or flavour
            ok = flavour is not None and f == flavour
            return RuntimeInfo(f if ok else None, version if ok else None, cc, "Fake GPU")

        monkeypatch.setattr(tensorrt, "runtime_info", fake)

    return set_


# --- sidecar ------------------------------------------------------------------------------


def test_sidecar_roundtrip_and_name(pt, sha):
    m = meta_for(sha, compute_capabilities=["7.5", "8.6"])
    path = place(pt, m)
    assert path.name == f"demo-yolo11n.640.nms.b1-32.fp16.trtrtx-{RTX}.sm75-86.engine"
    assert sidecar.read_sidecar(path) == m
    assert sidecar.find_engines(pt) == [(path, m)]
    assert m.targets == "sm75-86"
    assert dataclasses.replace(m, hardware_compatibility="ampere_plus").targets == "sm80plus"


def test_sidecar_errors(pt, sha):
    path = place(pt, meta_for(sha))
    sidecar.sidecar_path(path).write_text("{not json")
    with pytest.raises(EngineMismatchError, match="not readable JSON"):
        sidecar.read_sidecar(path)
    sidecar.sidecar_path(path).write_text('{"sidecar_version": 99}')
    with pytest.raises(EngineMismatchError, match="sidecar_version 99"):
        sidecar.read_sidecar(path)
    sidecar.sidecar_path(path).write_text('{"sidecar_version": 1, "imgsz": 640}')
    with pytest.raises(EngineMismatchError, match="missing keys"):
        sidecar.read_sidecar(path)
    sidecar.sidecar_path(path).unlink()
    with pytest.raises(EngineMismatchError, match="has no sidecar"):
        sidecar.read_sidecar(path)


@pytest.mark.parametrize(
    ("meta_kw", "rt", "need", "match"),
    [
        ({}, ("tensorrt_rtx", RTX, "8.6"), {}, None),
        ({}, ("tensorrt_rtx", RTX, "9.0"), {}, "built for compute capability 8.6, this GPU is 9.0"),
        (
            {},
            ("tensorrt_rtx", "1.6.1.120", "8.6"),
            {},
            f"TensorRT-RTX {RTX}, this is TensorRT-RTX 1.6",
        ),
        ({}, (None, None, "8.6"), {}, "no TensorRT Python module"),
        ({}, ("tensorrt", "10.13.0", "8.6"), {}, "only TensorRT is importable"),
        ({}, ("tensorrt_rtx", RTX, None), {}, "no CUDA GPU"),
        ({}, ("tensorrt_rtx", RTX, "8.6"), {"batch": 64}, r"batch size 64 is outside .*\[1, 32\]"),
        ({}, ("tensorrt_rtx", RTX, "8.6"), {"imgsz": 1024}, "engine input is 640 px"),
        ({}, ("tensorrt_rtx", RTX, "8.6"), {"head": "end2end"}, "'nms' head"),
        ({}, ("tensorrt_rtx", RTX, "8.6"), {"weights_sha256": "0" * 64}, "other weights"),
        (
            {"hardware_compatibility": "ampere_plus", "flavour": "tensorrt", "trt_version": "10.9"},
            ("tensorrt", "10.9", "9.0"),
            {},
            None,
        ),
        (
            {"hardware_compatibility": "ampere_plus", "flavour": "tensorrt", "trt_version": "10.9"},
            ("tensorrt", "10.9", "7.5"),
            {},
            "≥ 8.0",
        ),
    ],
)
def test_check_fit(sha, meta_kw, rt, need, match):
    why = check_fit(meta_for(sha, **meta_kw), RuntimeInfo(*rt), **need)
    if match is None:
        assert why is None
    else:
        assert why is not None
        assert pytest.importorskip("re").search(match, why), why


# --- Model resolution ---------------------------------------------------------------------


def test_resolves_to_a_matching_engine(pt, sha, gpu):
    gpu("8.6")
    path = place(pt, meta_for(sha))
    kind, reason = Model(pt).resolve_backend("cuda")
    assert kind == "tensorrt" and path.name in reason
    assert Model(pt).resolve_backend("cuda", batch_size=32)[0] == "tensorrt"


def test_engine_missing(pt, gpu):
    gpu("8.6")
    kind, reason = Model(pt).resolve_backend("cuda")
    assert kind == "torch"
    assert "no TensorRT engine next to demo-yolo11n.pt" in reason
    assert f"python -m trtwsi.export.build --fp16 --model {pt}" in reason


def test_wrong_compute_capability(pt, sha, gpu):
    gpu("9.0")  # an H100
    place(pt, meta_for(sha))
    kind, reason = Model(pt).resolve_backend("cuda")
    assert kind == "torch"
    assert "built for compute capability 8.6, this GPU is 9.0" in reason
    assert "python -m trtwsi.export.build" in reason and "PyTorch" in reason


def test_wrong_version(pt, sha, gpu):
    gpu("8.6", version="1.6.1.120")
    place(pt, meta_for(sha))
    kind, reason = Model(pt).resolve_backend("cuda")
    assert (
        kind == "torch"
        and f"built with TensorRT-RTX {RTX}, this is TensorRT-RTX 1.6.1.120" in reason
    )


def test_profile_too_small(pt, sha, gpu):
    gpu("8.6")
    place(pt, meta_for(sha, batch_max=8, batch_opt=8))
    kind, reason = Model(pt).resolve_backend("cuda", batch_size=64)
    assert kind == "torch" and "batch size 64 is outside the engine's profile [1, 8]" in reason
    assert "--batch-size 64" in reason
    kind, reason = Model(pt, imgsz=320).resolve_backend("cuda", batch_size=4)
    assert kind == "torch" and "engine input is 640 px" in reason and "--imgsz 320" in reason


def test_no_tensorrt_module(pt, sha, gpu):
    gpu("8.6", flavour=None)
    place(pt, meta_for(sha))
    kind, reason = Model(pt).resolve_backend("cuda")
    assert kind == "torch" and "no TensorRT Python module is importable" in reason
    assert "pypi.nvidia.com" in reason and "trtwsi[tensorrt-rtx]" in reason


def test_fallback_forbidden_and_forced(pt, sha, gpu):
    gpu("9.0")
    place(pt, meta_for(sha))
    with pytest.raises(BackendError, match=r"this GPU is 9\.0.*fallback_to_pt=False"):
        Model(pt, fallback_to_pt=False).resolve_backend("cuda")
    with pytest.raises(BackendError, match="backend='tensorrt' but"):
        Model(pt, backend="tensorrt").resolve_backend("cuda")
    assert Model(pt, backend="torch").resolve_backend("cuda")[0] == "torch"


def test_fallback_warns_once_with_reason(pt, sha, gpu, monkeypatch):
    """load_engine on "cuda" without a fitting engine: one warning naming the reason and the
    fix. The TorchEngine is replaced by a stub because torch cannot move a model to a GPU that
    does not exist here."""
    gpu("9.0")
    place(pt, meta_for(sha))
    import trtwsi.engines.torch as te

    monkeypatch.setattr(te, "TorchEngine", lambda model, **kw: ("torch-engine", kw))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eng = Model(pt).load_engine("cuda")
    assert eng[0] == "torch-engine"
    assert len(w) == 1
    msg = str(w[0].message)
    assert "this GPU is 9.0" in msg and "python -m trtwsi.export.build" in msg
