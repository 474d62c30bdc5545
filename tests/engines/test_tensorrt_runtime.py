"""TensorRTEngine execution: runs only where TensorRT (or TensorRT-RTX) and a GPU it supports
exist, and skips with the reason elsewhere (CI, and this project's H100/H200 machines: full
TensorRT is not installable there and TensorRT-RTX does not run on Hopper). Nothing is mocked.
"""

from __future__ import annotations

import shutil

import pytest

from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines.tensorrt import RTX_COMPUTE_CAPABILITIES, cuda_device_info, load_module

pytestmark = pytest.mark.tensorrt


def _runnable():
    """The flavour that can run engines on this GPU, or skip saying why not."""
    cc, name = cuda_device_info()
    if cc is None:
        pytest.skip("no CUDA GPU visible to torch: TensorRT engines cannot execute here")
    for flavour in ("tensorrt", "tensorrt_rtx"):
        try:
            mod = load_module(flavour)
        except Exception:
            continue
        if flavour == "tensorrt_rtx" and cc not in RTX_COMPUTE_CAPABILITIES:
            continue
        return mod, cc
    pytest.skip(
        f"no TensorRT flavour that runs on {name} (compute capability {cc}) is installed "
        "(TensorRT-RTX runs on " + ", ".join(RTX_COMPUTE_CAPABILITIES) + ")"
    )


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    mod, _ = _runnable()
    from trtwsi.export import build

    root = tmp_path_factory.mktemp("trt")
    out = {}
    for stem in ("demo-yolo11n", "demo-yolo26n"):
        w = root / f"{stem}.pt"
        shutil.copy(bundled_models_dir() / f"{stem}.pt", w)
        args = ["--model", str(w), "--flavour", mod.flavour, "--imgsz", "640", "--batch-size"]
        args += ["8", "--opt-batch", "4", "--no-progress"]
        assert build.main(args) == 0
        out[stem] = w
    return out


@pytest.mark.parametrize("stem", ["demo-yolo11n", "demo-yolo26n"])
def test_engine_matches_pt(engines, stem):
    import torch

    from trtwsi.app.compare import compare_engines
    from trtwsi.engines.model import Model
    from trtwsi.engines.tensorrt import TensorRTEngine

    m = Model(engines[stem])
    eng = m.load_engine("cuda", batch_size=4)
    assert isinstance(eng, TensorRTEngine) and eng.batch_size == 4
    assert eng.input.shape == (4, 3, 640, 640) and eng.input.device.type == "cuda"
    a = compare_engines(m, eng, n=8)
    assert a.passed, a.summary()
    # writing into engine.input and passing it copies nothing; output is the persistent buffer
    eng.input.copy_(torch.rand_like(eng.input))
    y = eng.infer(eng.input)
    torch.cuda.synchronize()
    assert y.data_ptr() == eng.output.data_ptr() and y.dtype == torch.float32


def test_any_batch_and_profile_errors(engines):
    import torch

    from trtwsi.engines.model import Model
    from trtwsi.engines.tensorrt import TensorRTEngine
    from trtwsi.errors import EngineMismatchError

    m = Model(engines["demo-yolo11n"])
    path, _ = m._tensorrt_engine(torch.device("cuda"))
    eng = TensorRTEngine(path, "cuda", batch_size=None)
    for b in (1, 3, 8):
        x = torch.rand(b, 3, 640, 640, device="cuda", dtype=eng.dtype)
        assert eng.infer(x).shape[0] == b
    with pytest.raises(EngineMismatchError, match="outside its profile"):
        eng.infer(torch.rand(9, 3, 640, 640, device="cuda", dtype=eng.dtype))
    with pytest.raises(EngineMismatchError, match="outside"):
        TensorRTEngine(path, "cuda", batch_size=16)


def test_cuda_graph_replay_matches(engines):
    import torch

    from trtwsi.engines.model import Model
    from trtwsi.engines.tensorrt import TensorRTEngine

    m = Model(engines["demo-yolo26n"])
    path, _ = m._tensorrt_engine(torch.device("cuda"), 4)
    plain = TensorRTEngine(path, "cuda", batch_size=4)
    graph = TensorRTEngine(path, "cuda", batch_size=4, cuda_graph=True)
    x = torch.rand(4, 3, 640, 640, device="cuda", dtype=plain.dtype)
    a = plain.infer(x).clone()
    for _ in range(3):
        b = graph.infer(x)
    torch.cuda.synchronize()
    assert torch.allclose(a, b, atol=1e-3)
