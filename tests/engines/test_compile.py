"""torch.compile for the PyTorch backend: refused off CUDA, its private cache folder, the batch
parameter. (The compiled forward itself runs on a GPU only: tests/runtime/test_pipeline.py
``test_gpu_compiled_model_gives_the_eager_models_detections``.)"""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from trtwsi import Predictor
from trtwsi.batch.jobs import BatchParams
from trtwsi.engines.model import Model
from trtwsi.engines.torch import TorchEngine, compile_cache_dir
from trtwsi.errors import BackendError, BatchError, UsageError
from trtwsi.runtime import Runtime


@pytest.fixture(scope="module")
def v11(yolo_pt):
    return Model(yolo_pt("yolo11n.yaml"))


def test_compile_is_refused_off_cuda(v11):
    with pytest.raises(UsageError, match=r"compile=True compiles the forward for a CUDA GPU.*cpu"):
        TorchEngine(v11, "cpu", compile=True)
    with pytest.raises(UsageError, match=r"this runtime is on cpu: drop compile"):
        Runtime([v11], device="cpu", compile=True)
    with pytest.raises(UsageError, match=r"this Predictor is on cpu: drop compile"):
        Predictor(np.zeros((64, 64, 3), np.uint8), [v11], device="cpu", compile=True)
    # without compile nothing changes
    eng = TorchEngine(v11, "cpu")
    assert not eng.compile and eng.compile_seconds is None and "compile=False" in repr(eng)


def test_compile_cache_dir_is_private_and_set_for_inductor(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = compile_cache_dir()
    assert path == tmp_path / "xdg" / "trtwsi" / "inductor"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert compile_cache_dir() == path  # now the environment names it


def test_compile_cache_dir_others_may_write_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "trtwsi" / "inductor"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.raises(BackendError, match=r"writable by others.*chmod 700"):
        compile_cache_dir()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_compile_cache_dir_keeps_the_users_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


def test_batch_params_compile():
    assert BatchParams(compile=True).compile is True
    assert "compile" not in BatchParams().key_params()  # speed only: results are the same
    with pytest.raises(BatchError, match="compile must be True or False, got 'yes'"):
        BatchParams(compile="yes")
