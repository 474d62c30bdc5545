"""Safe ``.pt`` loading (trtwsi.engines.checkpoint): real checkpoints load, pickles that would run
code are refused before anything runs, and ``trust_weights=True`` is the explicit way around.

The payloads are benign but real: each one creates a marker file when it is unpickled. Each
refusal test checks the marker is absent, then loads the same file with ``trust_weights=True``
and checks the marker appears (so the test would catch a loader that runs the payload).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pickle
import shlex
import subprocess
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines import checkpoint
from trtwsi.engines.checkpoint import CALL, CLASS, allowed_globals, load_checkpoint, scan_pickle
from trtwsi.engines.model import Model
from trtwsi.errors import MissingDependencyError, ModelError, UnsafeWeightsError

REPO = Path(__file__).resolve().parents[2]
DEMOS = ["demo-yolo11n.pt", "demo-yolo26n.pt"]


@pytest.fixture(scope="module")
def v11(yolo_pt):
    return yolo_pt("yolo11n.yaml")


def trusted_load(path) -> dict:
    """A checkpoint this test suite made itself, fully unpickled (to edit it)."""
    return torch.load(path, map_location="cpu", weights_only=False)


# --- payloads: each creates ``marker`` when unpickled ----------------------------------------


class Shell:
    """Unpickles as ``os.system("touch MARKER")`` (the global is ``posix.system``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class BoundMethod:
    """Unpickles as ``getattr(PosixPath(MARKER), "touch")()``: no import of os at all."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


class Constructor:
    """Unpickles as ``DetectionModel(cfg)``, an allow-listed class called with arguments from
    the file: its ``parse_model`` evals ``cfg["activation"]``, which creates the marker."""

    def __init__(self, marker: Path):
        from ultralytics.nn.tasks import yaml_model_load

        self.cfg = dict(yaml_model_load("yolo11n.yaml"))
        self.cfg["activation"] = (
            f"(__import__('pathlib').Path({str(marker)!r}).touch(), nn.SiLU())[1]"
        )

    def __reduce__(self):
        from ultralytics.nn.tasks import DetectionModel

        return (DetectionModel, (self.cfg,))


PAYLOADS = {
    Shell: "posix.system",
    BoundMethod: "builtins.getattr",
    Constructor: "ultralytics.nn.tasks.DetectionModel(…) (a call of the class's constructor",
}


def assert_refused(path: Path, marker: Path, offending: str) -> UnsafeWeightsError:
    """Model(path) is refused naming the file, ``offending`` and the three opt-ins; nothing ran."""
    with pytest.raises(UnsafeWeightsError) as e:
        Model(path)
    msg = str(e.value)
    assert not marker.exists(), "the payload ran during a refused load"
    assert str(path) in msg and offending in msg
    assert any(o.startswith(offending) for o in e.value.offending)
    for opt_in in ("trust_weights=True", "trust_weights = true", "--trust-weights"):
        assert opt_in in msg
    assert e.value.path == path and isinstance(e.value, ModelError)
    return e.value


# --- what loads --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEMOS)
def test_bundled_demo_models_load_safely_and_equal_the_full_unpickle(name):
    path = bundled_models_dir() / name
    safe, full = Model(path), Model(path, trust_weights=True)
    assert (safe.head, safe.nc, safe.stride, safe.imgsz, safe.names) == (
        full.head,
        full.nc,
        full.stride,
        full.imgsz,
        full.names,
    )
    assert safe.head == ("nms" if "11n" in name else "end2end")
    a, b = safe.module.state_dict(), full.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert safe.trust_weights is False and full.trust_weights is True


@pytest.mark.parametrize(
    "cfg",
    ["yolo11n.yaml", "yolo26n.yaml", "yolov10n.yaml", "yolo11n-seg.yaml", "yolo11n-pose.yaml"],
)
def test_yolo_save_files_load(yolo_pt, cfg):
    net, ckpt = load_checkpoint(yolo_pt(cfg))  # YOLO.save; non-detect tasks load, Model refuses
    assert isinstance(net, torch.nn.Module) and {"date", "version"} <= set(ckpt)


def test_training_format_checkpoint(tmp_path, v11):
    """The dict ultralytics' trainer writes (save_model), with the types older versions put in
    it: numpy floats, a Path, namespaces, an optimizer state, and the loss object (≤ 8.3)."""
    from ultralytics.utils import IterableSimpleNamespace
    from ultralytics.utils.loss import v8DetectionLoss

    ema = trusted_load(v11)["model"].float()
    args = IterableSimpleNamespace(task="detect", imgsz=320, box=7.5, cls=0.5, dfl=1.5)
    ema.args = args
    ema.criterion = v8DetectionLoss(ema)
    opt = torch.optim.AdamW(ema.parameters(), lr=1e-3)
    for p in ema.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    ckpt = {
        "epoch": 3,
        "best_fitness": np.float64(0.5),
        "stopper": {"best_fitness": np.float64(0.5), "best_epoch": 2},
        "model": None,
        "ema": ema.half(),
        "updates": 12,
        "modelopt": None,
        "optimizer": opt.state_dict(),
        "scaler": {},
        "train_args": {**vars(args), "save_dir": Path("runs/detect/train"), "mode": "train"},
        "train_metrics": {"metrics/mAP50(B)": np.float32(0.25), "fitness": np.float64(0.3)},
        "train_results": {"epoch": [1, 2, 3], "lr/pg0": [0.1, 0.01, 0.001]},
        "extra": types.SimpleNamespace(note="kept"),
        "date": "2026-01-01T00:00:00+00:00",
        "version": "8.3.0",
        "git": {"root": None, "branch": None, "commit": None, "origin": None},
        "license": "AGPL-3.0",
        "docs": "https://docs.ultralytics.com",
    }
    path = tmp_path / "last.pt"
    torch.save(ckpt, path)
    names = scan_pickle(torch._C.PyTorchFileReader(str(path)).get_record("data.pkl")).globals
    for needed in ("numpy.dtype", "pathlib.PosixPath", "types.SimpleNamespace"):
        assert needed in names or sys.platform == "win32"
    assert "ultralytics.utils.loss.v8DetectionLoss" in names
    m = Model(path)
    assert (m.imgsz, m.nc) == (320, 3)


@pytest.mark.slow
def test_real_ultralytics_training_checkpoints(tmp_path, monkeypatch):
    """One epoch of real ultralytics training (64-px images, CPU): its unstripped last.pt (as
    saved during training) and its final stripped best.pt both load safely."""
    import socket

    import cv2
    from ultralytics import YOLO

    attempts = []

    def no_network(sock, address):
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)

    root = tmp_path / "ds"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            img = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / split / f"{i}.jpg"), img)
            (root / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    (root / "data.yaml").write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: a\n"
    )
    yolo = YOLO("yolo11n.yaml")
    unstripped = tmp_path / "unstripped.pt"
    yolo.add_callback("on_model_save", lambda t: unstripped.write_bytes(t.last.read_bytes()))
    yolo.train(
        data=str(root / "data.yaml"), epochs=1, imgsz=64, batch=2, workers=0, device="cpu",
        plots=False, amp=False, project=str(tmp_path / "runs"), name="r", verbose=False,
    )  # fmt: skip
    assert attempts == []  # training stayed offline
    for path in (unstripped, tmp_path / "runs" / "r" / "weights" / "best.pt"):
        m = Model(path)
        assert (m.nc, m.imgsz, m.head) == (1, 64, "nms")


def test_legacy_names_map_to_current_classes(tmp_path, v11):
    """Names written by older ultralytics versions (rewritten into a current file's pickle)."""
    from ultralytics.utils import IterableSimpleNamespace

    src = tmp_path / "src.pt"
    ckpt = trusted_load(v11)
    ckpt["train_args"] = IterableSimpleNamespace(task="detect", imgsz=640)
    ckpt["model"].model[0].act_extra = torch.nn.Identity()
    torch.save(ckpt, src)
    renames = {
        b"cultralytics.nn.tasks\nDetectionModel\n": b"cultralytics.nn.tasks\nYOLOv10DetectionModel\n",
        b"cultralytics.utils\nIterableSimpleNamespace\n": b"cultralytics.yolo.utils\nIterableSimpleNamespace\n",
        b"ctorch.nn.modules.linear\nIdentity\n": b"cultralytics.nn.modules.block\nSilence\n",
    }
    legacy = tmp_path / "legacy.pt"
    reader, writer = torch._C.PyTorchFileReader(str(src)), torch._C.PyTorchFileWriter(str(legacy))
    for name in reader.get_all_records():
        data = reader.get_record(name)
        if name == "data.pkl":
            for old, new in renames.items():
                assert old in data
                data = data.replace(old, new)
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    net, ckpt = load_checkpoint(legacy)
    assert isinstance(ckpt["train_args"], IterableSimpleNamespace)
    assert type(net.model[0].act_extra) is torch.nn.Identity
    assert Model(legacy).nc == Model(legacy, trust_weights=True).nc == 3


# --- what is refused ---------------------------------------------------------------------


@pytest.mark.parametrize("payload", list(PAYLOADS), ids=lambda p: p.__name__)
def test_payload_as_the_whole_file(tmp_path, payload):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save(payload(marker), path)
    assert_refused(path, marker, PAYLOADS[payload])
    with contextlib.suppress(ModelError):  # Constructor's result is a model, the others are not
        Model(path, trust_weights=True)
    assert marker.exists()  # the full unpickle ran the payload


@pytest.mark.parametrize("where", ["extra key", "train_args", "module attribute"])
@pytest.mark.parametrize("payload", list(PAYLOADS), ids=lambda p: p.__name__)
def test_payload_hidden_in_a_valid_checkpoint(tmp_path, v11, payload, where):
    marker = tmp_path / "MARKER"
    ckpt = trusted_load(v11)
    if where == "extra key":
        ckpt["notes"] = payload(marker)
    elif where == "train_args":
        ckpt["train_args"] = {"task": "detect", "imgsz": 640, "project": payload(marker)}
    else:
        ckpt["model"].model[3].cache = payload(marker)
    path = tmp_path / "best.pt"
    torch.save(ckpt, path)
    assert_refused(path, marker, PAYLOADS[payload])
    if payload is Constructor:  # the payload builds a whole (80-class) model: slow, skip the rest
        return
    m = Model(path, trust_weights=True)  # the old behaviour: the payload runs, the model works
    assert marker.exists() and m.nc == 3


def test_an_allow_list_alone_runs_a_constructor_payload(tmp_path):
    """Why scan_pickle exists: torch's weights-only unpickler with the model class allow-listed
    lets REDUCE call it (if torch ever refuses this, the scan is still right, only redundant)."""
    from ultralytics.nn.tasks import DetectionModel

    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"model": Constructor(marker)}, path)
    with torch.serialization.safe_globals([DetectionModel]):
        torch.load(path, weights_only=True)
    assert marker.exists()


def test_quantization_aware_checkpoints_need_trust(tmp_path, v11):
    ckpt = trusted_load(v11)
    ckpt["modelopt"] = {"modelopt": [("quantize", {})], "ranges": {}}
    path = tmp_path / "qat.pt"
    torch.save(ckpt, path)
    with pytest.raises(UnsafeWeightsError, match=r"quantization-aware.*trust_weights=True"):
        Model(path)
    if importlib.util.find_spec("modelopt") is None:  # never pip-installed at run time
        with pytest.raises(MissingDependencyError, match="nvidia-modelopt"):
            Model(path, trust_weights=True)


def test_torchscript_and_legacy_format_files(tmp_path, v11):
    ts = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(ts))
    for trust in (False, True):
        with pytest.raises(ModelError, match=r"scripted\.pt.*TorchScript archive"):
            Model(ts, trust_weights=trust)
    old = tmp_path / "old-format.pt"
    torch.save(trusted_load(v11), old, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelError, match=r"old-format\.pt.*not the zip archive torch\.save"):
        Model(old)
    assert Model(old, trust_weights=True).nc == 3


# --- the scanner and the allow-list ------------------------------------------------------


def _pickle(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (_pickle(b"cbuiltins\neval\n", b"X\x03\x00\x00\x001+1", b"\x85R"), "builtins.eval"),
        (_pickle(b"cposix\nsystem\n", b"X\x01\x00\x00\x00x", b"\x85R"), "posix.system"),
        (_pickle(b"c__builtin__\ngetattr\n", b"N", b"N", b"\x86R"), "builtins.getattr"),
        (  # an allow-listed class kept in the memo, fetched back and called
            _pickle(b"cultralytics.nn.tasks\nDetectionModel\nq\x00", b"h\x00", b")R", b"\x86"),
            "ultralytics.nn.tasks.DetectionModel(…)",
        ),
        (_pickle(b"ctorch\nfloat32\n", b")R"), "torch.float32(…) (a call of a value)"),
        (_pickle(b"ccollections\nOrderedDict\n", b")R", b")R"), "REDUCE of a computed object"),
        (_pickle(b"ccollections\nOrderedDict\n", b")", b"i__main__\nX\n"), "pickle opcode INST"),
        (pickle.dumps(OrderedDict(), protocol=4), "pickle opcode FRAME"),
        (_pickle(b"R"), "a malformed pickle"),
        (_pickle(b"h\x07"), "a malformed pickle"),
    ],
)
def test_scan_pickle_refuses(data, problem):
    assert any(p.startswith(problem) for p in scan_pickle(data).problems)


def test_scan_pickle_accepts_data_constructors():
    data = pickle.dumps(
        {"a": OrderedDict(x=1), "b": {1, 2}, "c": types.SimpleNamespace(y=[1.5, None])}, protocol=2
    )
    scan = scan_pickle(data)
    assert scan.problems == ()
    assert set(scan.globals) == {"collections.OrderedDict", "builtins.set", "types.SimpleNamespace"}


def test_allow_list_holds_no_code_runners():
    allow = allowed_globals()
    calls = {name for name, (_, kind) in allow.items() if kind == CALL}
    assert calls == {
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.Size",
        "torch.device",
        "collections.OrderedDict",
        "builtins.set",
        "_codecs.encode",
        "types.SimpleNamespace",
        "ultralytics.utils.IterableSimpleNamespace",
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
    }
    prefixes = (
        "ultralytics.nn.modules.",
        "ultralytics.nn.tasks.",
        "torch.nn.modules.",
        "ultralytics.utils.loss.",
        "ultralytics.utils.tal.",
    )
    for name, (obj, kind) in allow.items():
        if kind == CLASS:
            assert isinstance(obj, type) and name.startswith(prefixes), name
    for bad in ("builtins.getattr", "builtins.eval", "builtins.exec", "posix.system", "os.system"):
        assert bad not in allow and checkpoint._resolve(bad) is None
    assert "ultralytics.nn.tasks.DetectionModel" in allow
    assert "torch.nn.modules.conv.Conv2d" in allow


# --- the opt-in travels: CLI flag, batch reload ------------------------------------------


def test_cli_trust_weights_flag_reaches_the_model(v11):
    from trtwsi.app.cli import _models_from_args, build_parser

    for argv, trusted in (([], False), (["--trust-weights"], True)):
        a = build_parser().parse_args(["predict", "slide.tif", "--model", str(v11), *argv])
        assert a.trust_weights is trusted
        (m,) = _models_from_args(a)
        assert m.trust_weights is trusted


def test_batch_reload_in_another_process_stays_safe(tmp_path, v11):
    """A batch worker rebuilds each model from ``model_spec`` in its own process and only then
    checks the file's hash: when the file was swapped for one with a payload in between, the
    reload must refuse it, not run it."""
    from trtwsi.batch import model_spec

    weights, marker = tmp_path / "m.pt", tmp_path / "MARKER"
    weights.write_bytes(v11.read_bytes())
    model = Model(weights)
    spec = {**model_spec(model), "sha256": model.sha256}
    assert spec.get("trust_weights", False) is False
    ckpt = trusted_load(v11)
    ckpt["notes"] = Shell(marker)
    torch.save(ckpt, weights)
    code = (
        "import json, sys\n"
        "from trtwsi.batch import BatchParams, SlideRunner\n"
        "from trtwsi.errors import UnsafeWeightsError\n"
        "try:\n"
        "    SlideRunner([json.loads(sys.argv[1])], BatchParams(), 'cpu')\n"
        "except UnsafeWeightsError as e:\n"
        "    print('REFUSED', *e.offending)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "YOLO_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFUSED posix.system" in run.stdout and not marker.exists()


def test_model_spec_carries_trust_weights(v11):
    from trtwsi.batch import model_spec

    assert model_spec(Model(v11, trust_weights=True)).get("trust_weights") is True
