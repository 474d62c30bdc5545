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
    assert "JPEG on GPU" in out and "off: no GPU (torchvision" in out
    assert "torch.compile" in out and "off: no GPU (--compile compiles for a CUDA GPU)" in out
    assert "backend='onnxruntime' can run models on the CPU" in out  # test extras install it
    assert "models run on the CPU with it (backend='auto'" in out  # OpenVINO: test extras too
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


def test_doctor_checks_kernels_and_models(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "preprocess.cu, postprocess.cu, common.cuh" in out  # the kernels row
    assert "models.toml: demo-yolo11n.pt, demo-yolo26n.pt, all present" in out
    assert "kernel compile" not in out  # only with --check-kernels


def test_doctor_reports_missing_kernels_and_models(tmp_path, monkeypatch):
    from trtwsi._util import resources

    monkeypatch.setattr(resources, "kernels_dir", lambda: tmp_path / "no-kernels")
    models = tmp_path / "models"
    models.mkdir()
    (models / "models.toml").write_text('[[model]]\nname = "x"\nweights = "gone.pt"\n')
    monkeypatch.setenv("TRTWSI_MODELS", str(models))
    text = doctor.format_report(doctor.collect(check_kernels=True))
    assert "missing preprocess.cu, postprocess.cu, common.cuh" in text
    assert "kernel compile  skipped: kernel sources missing" in text
    assert "names weights that are not there: gone.pt" in text


def test_doctor_without_models_toml_is_a_problem_only_for_the_default(tmp_path, monkeypatch):
    text = doctor.format_report(doctor.collect(tmp_path))
    assert "(0 .pt, no models.toml)" in text and "models.toml is missing" not in text
    monkeypatch.setenv("TRTWSI_MODELS", str(tmp_path))
    text = doctor.format_report(doctor.collect())
    assert "models.toml is missing" in text


def test_doctor_check_kernels(capsys):
    from trtwsi.ops import nvrtc

    assert main(["doctor", "--check-kernels"]) == 0
    out = capsys.readouterr().out
    if nvrtc.available():
        assert "postprocess, preprocess compiled (NVRTC, compute_75)" in out
    else:
        assert "kernel compile  skipped" in out


def test_doctor_names_packages_that_every_process_compiles(tmp_path, monkeypatch):
    import compileall
    import sys

    pkg = tmp_path / "slowpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    r = doctor.Report()
    doctor._check_bytecode(r, packages=("slowpkg", "no_such_package_here"))
    assert dict(r.items)["bytecode"].startswith("missing for slowpkg, and PYTHONDONTWRITEBYTECODE")
    assert len(r.problems) == 1 and "slowpkg has no compiled bytecode" in r.problems[0]
    assert r.fixes == [f"python -m compileall -q {pkg}"]
    # once compiled (as a pip install does), or where Python may write it, nothing to report
    assert compileall.compile_dir(str(pkg), quiet=1)
    r = doctor.Report()
    doctor._check_bytecode(r, packages=("slowpkg",))
    assert dict(r.items)["bytecode"] == "compiled, or written on first import" and not r.problems
    shutil.rmtree(pkg / "__pycache__")
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    r = doctor.Report()
    doctor._check_bytecode(r, packages=("slowpkg",))
    assert not r.problems  # a writable folder: the first import writes it


def test_doctor_reports_trtwsi_settings_from_the_environment(monkeypatch):
    for name in ("TRTWSI_TISSUE", "TRTWSI_DECODE", "TRTWSI_SEAM_MERGE", "TRTWSI_LAUNCH_GRAPHS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRTWSI_TISSUE", "cpu")
    monkeypatch.setenv("TRTWSI_READ_STRIPS", "lots")
    r = doctor.collect()
    rows = dict(r.items)
    assert rows["TRTWSI_TISSUE"] == "'cpu' (from the environment)"
    assert rows["TRTWSI_READ_STRIPS"] == "'lots' (not valid)"
    assert "TRTWSI_DECODE" not in rows
    assert any("TRTWSI_READ_STRIPS='lots'" in p and "positive integer" in p for p in r.problems)
    assert "unset TRTWSI_READ_STRIPS   (or set it to a value it takes)" in r.fixes


def test_doctor_counts_compiled_packages_and_flags_a_shared_folder(tmp_path, monkeypatch):
    folder = tmp_path / "compiled"
    monkeypatch.setenv("TRTWSI_COMPILED_DIR", str(folder))
    r = doctor.Report()
    assert doctor._packages(r) == f"0 packages in {folder}" and not r.problems
    (folder / "m-0123.pt2").write_bytes(b"")
    assert doctor._packages(r) == f"1 package in {folder}"
    folder.chmod(0o775)  # group-writable: packages are code this process would run
    assert doctor._packages(r) == "no folder for them"
    assert (
        r.problems
        and "writable by others" in r.problems[0]
        and "TRTWSI_COMPILED_DIR" in r.problems[0]
    )
