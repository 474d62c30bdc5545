"""``trtwsi doctor`` on a machine without a GPU (CI): real probes; "TensorRT not installed" is
simulated by monkeypatching the module probe, since TensorRT-RTX is installed in the test env."""

from __future__ import annotations

import shutil

import pytest

from trtwsi._util.resources import bundled_models_dir
from trtwsi.app import doctor
from trtwsi.app.cli import main
from trtwsi.engines import tensorrt
from trtwsi.engines.tensorrt import cuda_device_info

pytestmark = pytest.mark.skipif(
    cuda_device_info()[0] is not None, reason="these tests describe a machine without a GPU"
)


def test_doctor_without_gpu(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for label in ("torch", "GPU", "NVIDIA driver", "CuPy", "TensorRT", "TensorRT-RTX", "export"):
        assert f"\n{label} " in "\n" + out
    assert "none visible to torch" in out
    assert "demo-yolo11n.pt: no engine (python -m trtwsi.export.build --fp16 --model" in out
    assert "runs on the CPU" in out


def test_doctor_lists_engines_with_reasons(tmp_path, capsys):
    from tests.engines.test_resolution import meta_for, place

    pt = tmp_path / "demo-yolo11n.pt"
    shutil.copy(bundled_models_dir() / "demo-yolo11n.pt", pt)
    from trtwsi.engines.model import Model

    place(pt, meta_for(Model.file_sha256(pt)))
    broken = tmp_path / "demo-yolo11n.320.nms.b1-4.fp16.trtrtx-1.0.sm86.engine"
    broken.write_bytes(b"x")  # no sidecar
    assert main(["doctor", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sm86.engine: not usable: " in out
    assert "has no sidecar" in out


def test_doctor_without_tensorrt(monkeypatch):
    monkeypatch.setattr(
        tensorrt,
        "available_modules",
        lambda: {f: ImportError(f"No module named {f!r}") for f in ("tensorrt", "tensorrt_rtx")},
    )
    text = doctor.format_report(doctor.collect())
    assert "TensorRT       not importable" in text or "not importable (No module" in text
    assert "no TensorRT flavour is installed" in text
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13" in text
    assert "pip install 'trtwsi[tensorrt-rtx]'" in text
    assert "tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" in text
