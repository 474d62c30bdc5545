"""Detector throughput on the same tiles: trtwsi TensorRT vs trtwsi torch vs ultralytics PyTorch.

Not part of the default test run. Needs a CUDA GPU (each benchmark skips with the reason
otherwise) and, for the TensorRT row, a TensorRT flavour that runs on that GPU (full TensorRT;
TensorRT-RTX only on compute capability 7.5–8.9 / 12.x)::

    python -m pytest bench/bench_tensorrt.py                      # demo-yolo11n, batch 32, 640 px
    TRTWSI_BENCH_WEIGHTS=m.pt TRTWSI_BENCH_BATCH=16 python -m pytest bench/bench_tensorrt.py

What is timed, per call, on a batch of ``B`` letterboxed 640² tiles already on the GPU:

* ``trtwsi-tensorrt``: ``TensorRTEngine.infer(engine.input)`` (FP16 engine from
  ``python -m trtwsi.export.build``, fixed batch, CUDA graph replay) + a stream synchronize;
* ``trtwsi-torch``: ``TorchEngine.infer`` (the .pt in fp16 on CUDA) + synchronize;
* ``ultralytics``: ``YOLO(weights).predict`` on the same ``B`` tiles as uint8 HWC arrays with
  ``half=True``, i.e. including ultralytics' own pre/post-processing (what users ran before).

Results (median seconds, tiles/s, device) go to ``bench/results/tensorrt-<machine>.json``.
**Not run yet**: this project's GPUs (H100/H200) have no runnable TensorRT.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from _machine import host_info, machine_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("YOLO_OFFLINE", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BATCH = int(os.environ.get("TRTWSI_BENCH_BATCH", "32"))
WEIGHTS = os.environ.get("TRTWSI_BENCH_WEIGHTS")

torch = pytest.importorskip("torch", reason="needs torch (pip install 'trtwsi[torch]')")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch: nothing to benchmark", allow_module_level=True)

RESULTS: dict[str, dict] = {}


def _weights() -> Path:
    from trtwsi._util.resources import bundled_models_dir

    return Path(WEIGHTS) if WEIGHTS else bundled_models_dir() / "demo-yolo11n.pt"


@pytest.fixture(scope="module")
def tiles():
    """``(BATCH, 3, 640, 640)`` float32 in [0, 1] on the CPU (synthetic scene tiles)."""
    from trtwsi.app.compare import sample_tiles
    from trtwsi.engines.model import Model

    return torch.from_numpy(sample_tiles(Model(_weights()).imgsz, BATCH))


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    if not RESULTS:
        return
    info = host_info("the GPU")
    info["device"] = f"{torch.cuda.get_device_name()} ({info['cpu']}, {info['cores']} cores)"
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"tensorrt-{machine_name(info)}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "detector forward on the same tiles",
                "batch": BATCH,
                "weights": _weights().name,
                "machine": info,
                "results": RESULTS,
            },
            indent=2,
        )
    )


def _record(name: str, benchmark, extra: dict | None = None) -> None:
    med = benchmark.stats["median"]
    RESULTS[name] = {"median_s": med, "tiles_per_s": BATCH / med, **(extra or {})}
    benchmark.extra_info.update(RESULTS[name])


def test_trtwsi_tensorrt(benchmark, tiles, tmp_path_factory):
    from trtwsi.engines.model import Model
    from trtwsi.engines.tensorrt import RTX_COMPUTE_CAPABILITIES, cuda_device_info, load_module
    from trtwsi.errors import TrtwsiError

    cc, name = cuda_device_info()
    try:
        mod = load_module()
    except TrtwsiError as e:
        pytest.skip(f"no TensorRT module: {e}")
    if mod.flavour == "tensorrt_rtx" and cc not in RTX_COMPUTE_CAPABILITIES:
        pytest.skip(f"{mod.label} cannot run engines on {name} (compute capability {cc})")
    from trtwsi.export import build

    root = tmp_path_factory.mktemp("bench-trt")
    w = root / _weights().name
    shutil.copy(_weights(), w)
    t0 = time.perf_counter()
    assert build.main(["--model", str(w), "--batch-size", str(BATCH), "--no-progress"]) == 0
    build_s = time.perf_counter() - t0
    eng = Model(w).load_engine("cuda", batch_size=BATCH, cuda_graph=True)
    eng.input.copy_(tiles.to(eng.device, eng.dtype))
    stream = torch.cuda.current_stream()

    def run():
        eng.infer(eng.input)
        stream.synchronize()

    run()
    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
    _record("trtwsi-tensorrt", benchmark, {"engine": str(eng), "build_s": build_s})


def test_trtwsi_torch(benchmark, tiles):
    from trtwsi.engines.model import Model
    from trtwsi.engines.torch import TorchEngine

    eng = TorchEngine(Model(_weights(), backend="torch"), "cuda", half=True, batch_size=BATCH)
    x = tiles.to("cuda", torch.float16)

    def run():
        eng.infer(x)
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, rounds=30, iterations=1, warmup_rounds=3)
    _record("trtwsi-torch", benchmark)


def test_ultralytics(benchmark, tiles):
    ultralytics = pytest.importorskip("ultralytics")
    yolo = ultralytics.YOLO(str(_weights()))
    imgs = list((tiles.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")[..., ::-1].copy())

    def run():
        yolo.predict(imgs, half=True, device=0, verbose=False, batch=BATCH)

    run()
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)
    _record("ultralytics", benchmark)
