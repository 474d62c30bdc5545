"""AOTInductor packages of the compiled forward (trtwsi.engines.compiled), built for real on the
CPU by the child process (the C++ compiler's code path; on a GPU the same export runs with
Triton kernels: tests/runtime/test_pipeline.py ``test_gpu_compiled_package_...``). A package
build takes 20-30 s on 2 cores, so each head builds once."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import threading

import pytest
import torch

from trtwsi.engines import compiled, compiled_build
from trtwsi.engines.model import Model
from trtwsi.engines.torch import TorchEngine
from trtwsi.errors import BackendError, PackageBuildError

IMGSZ = 64


@pytest.fixture
def private(tmp_path, monkeypatch):
    folder = tmp_path / "compiled"
    monkeypatch.setenv("TRTWSI_COMPILED_DIR", str(folder))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return folder


def _eager(weights, batch):
    """(model, channels_last input, eager output of a TorchEngine's module) on the CPU."""
    m = Model(weights, imgsz=IMGSZ)
    eng = TorchEngine(m, "cpu", batch_size=batch)
    x = torch.rand((batch, 3, IMGSZ, IMGSZ), generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = eng._eager(x)
    return m, x, want


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo26n.yaml"], ids=["nms", "end2end"])
def test_package_is_built_once_then_loaded_and_gives_the_eager_output(yolo_pt, private, cfg):
    m, x, want = _eager(yolo_pt(cfg), batch=2)
    got = {}

    def worker(i):  # two at once: one builds (a child process) under the lock, the other waits
        fn, how, path = compiled.obtain(m, x.device, x.dtype, 2, True)
        with torch.inference_mode():
            got[i] = (how, path, fn(x))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(h for h, _, _ in got.values()) == ["built", "loaded"]
    path = got[0][1]
    assert path == got[1][1] and path.parent == private and path.suffix == ".pt2"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    key = json.loads(path.with_name(path.name + ".json").read_text())
    assert key["weights_sha256"] == m.sha256 and key["batch"] == 2 and key["head"] == m.head
    assert key["imgsz"] == IMGSZ and key["channels_last"] is True and key["dtype"] == "float32"
    assert not [p for p in private.iterdir() if ".tmp" in p.name]
    for _, _, y in got.values():
        assert y.shape == want.shape and y.dtype == want.dtype
        # Inductor's fused C++ kernels sum in another order than the eager convolutions
        torch.testing.assert_close(y, want, atol=1e-3 * float(want.abs().max()), rtol=1e-3)
    # a later call (a later process) loads the file and runs the same code
    fn, how, again = compiled.obtain(m, x.device, x.dtype, 2, True)
    with torch.inference_mode():
        assert how == "loaded" and again == path and torch.equal(fn(x), got[0][2])


def test_package_key_names_everything_the_code_depends_on(yolo_pt, private):
    m = Model(yolo_pt("yolo11n.yaml"), imgsz=IMGSZ)
    cpu = torch.device("cpu")
    base = compiled.package_key(m, cpu, torch.float16, 64, True)
    assert base["torch"] == torch.__version__ and base["format"] == compiled.FORMAT
    paths = {compiled.package_path(m, base)}
    for change in (
        compiled.package_key(m, cpu, torch.float32, 64, True),
        compiled.package_key(m, cpu, torch.float16, 32, True),
        compiled.package_key(m, cpu, torch.float16, 64, False),
        compiled.package_key(
            Model(yolo_pt("yolo11n.yaml", seed=1), imgsz=IMGSZ), cpu, torch.float16, 64, True
        ),
        compiled.package_key(
            Model(yolo_pt("yolo11n.yaml"), imgsz=128), cpu, torch.float16, 64, True
        ),
        compiled.package_key(
            Model(yolo_pt("yolo11n.yaml"), imgsz=IMGSZ, max_det=10), cpu, torch.float16, 64, True
        ),
    ):
        paths.add(compiled.package_path(m, change))
    assert len(paths) == 7
    assert compiled.package_path(m, base) == compiled.package_path(m, dict(base))


def test_a_package_others_may_write_is_not_loaded(yolo_pt, private):
    m, x, _ = _eager(yolo_pt("yolo11n.yaml"), batch=1)
    key = compiled.package_key(m, x.device, x.dtype, 1, True)
    path = compiled.package_path(m, key)
    path.write_bytes(b"not a package")  # planted where the real one would go
    path.chmod(0o666)
    with pytest.raises(BackendError, match=r"not this user's alone .*it is not loaded"):
        compiled.obtain(m, x.device, x.dtype, 1, True)


def test_a_compiled_folder_others_may_write_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(0o777)
    monkeypatch.setenv("TRTWSI_COMPILED_DIR", str(folder))
    with pytest.raises(BackendError, match=r"writable by others.*chmod 700.*TRTWSI_COMPILED_DIR"):
        compiled.compiled_dir()
    monkeypatch.delenv("TRTWSI_COMPILED_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    made = compiled.compiled_dir()
    assert made == tmp_path / "xdg" / "trtwsi" / "compiled"
    assert stat.S_IMODE(made.stat().st_mode) == 0o700 and made.stat().st_uid == os.getuid()


@pytest.mark.parametrize(
    "code, said",
    [
        (
            "import faulthandler, os, signal; faulthandler.enable(); os.kill(os.getpid(), "
            "signal.SIGSEGV)",
            r"was killed by SIGSEGV: Fatal Python error: Segmentation fault.*line 1",
        ),
        ("import sys; print('no C++ compiler', file=sys.stderr); sys.exit(2)", "exited with 2"),
    ],
    ids=["crash", "error"],
)
def test_a_build_that_crashes_or_fails_costs_only_its_child(
    yolo_pt, private, monkeypatch, code, said
):
    m = Model(yolo_pt("yolo11n.yaml"), imgsz=IMGSZ)
    monkeypatch.setattr(compiled, "_child_command", lambda spec: [sys.executable, "-c", code])
    with pytest.raises(PackageBuildError, match=re.compile(said, re.S)):
        compiled.obtain(m, torch.device("cpu"), torch.float32, 1, True)
    assert not list(private.glob("*.pt2"))  # nothing half-built is kept, nothing is loaded


def test_the_build_child_refuses_weights_changed_since_the_parent_hashed_them(
    yolo_pt, private, tmp_path
):
    weights = tmp_path / "m.pt"
    weights.write_bytes(yolo_pt("yolo11n.yaml").read_bytes())
    m = Model(weights, imgsz=IMGSZ)
    key = compiled.package_key(m, torch.device("cpu"), torch.float32, 1, True)
    path = compiled.package_path(m, key)
    weights.write_bytes(yolo_pt("yolo11n.yaml", seed=1).read_bytes())  # swapped mid-run
    spec = {
        "weights": str(weights),
        "name": m.name,
        "imgsz": IMGSZ,
        "head": m.head,
        "max_det": m.max_det,
        "trust_weights": False,
        "device": "cpu",
        "half": False,
        "batch": 1,
        "channels_last": True,
        "path": str(path),
    }
    assert compiled_build.main([json.dumps(spec)]) == 4
    assert not path.exists()
