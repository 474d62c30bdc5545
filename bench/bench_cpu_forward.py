"""The model's forward alone on the CPU, per backend and thread count: PyTorch vs ONNX Runtime vs
OpenVINO on the same float32 graph (demo yolo11n, 640², random input), as trtwsi's engines run
them (:class:`~trtwsi.engines.torch.TorchEngine` channels_last; ONNX Runtime with spinning off;
OpenVINO with the LATENCY hint, f32, threads not pinned). No slide, no reads, no merge: what
``--backend`` changes. ``bench/bench_cpu.py`` measures the whole job against the peers.

Usage::

    python bench/bench_cpu_forward.py [--threads 1,2,4,8] [--batches 1,4] [--out PATH]

Writes ``bench/results/cpu-forward-<machine>.json`` (tiles/s per case); a backend that is not
installed is listed under ``skipped``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from _machine import host_info, machine_name  # noqa: E402

MODEL = ROOT / "trtwsi" / "models" / "demo-yolo11n.pt"


def _rate(fn, batch: int, seconds: float = 2.0) -> float:
    """Tiles/s of ``fn`` (one forward of ``batch`` tiles) after two warm-up calls."""
    fn()
    fn()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return round(n * batch / (time.perf_counter() - t0), 2)


def _case(model, graph, have: dict, threads: int, batch: int) -> dict:
    """Tiles/s of each installed backend at ``threads`` threads and ``batch`` tiles a call."""
    import numpy as np
    import torch

    x = np.random.default_rng(0).random((batch, 3, 640, 640), dtype=np.float32)
    torch.set_num_threads(threads)
    eng = model.load_engine("cpu")
    xt = torch.from_numpy(x)
    row = {"threads": threads, "batch": batch, "torch": _rate(lambda: eng.infer(xt), batch)}
    if have["onnxruntime"]:
        import onnxruntime as ort

        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        s = ort.InferenceSession(str(graph), o, providers=["CPUExecutionProvider"])
        row["onnxruntime"] = _rate(lambda: s.run(None, {"images": x}), batch)
    if have["openvino"]:
        import openvino as ov

        cfg = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": False,
        }
        req = ov.Core().compile_model(str(graph), "CPU", cfg).create_infer_request()
        row["openvino"] = _rate(lambda: req.infer({0: x}), batch)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2,4,8")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import trtwsi
    from trtwsi.engines.onnx_export import export_onnx

    machine = host_info("the forward")
    model = trtwsi.Model(MODEL)
    graph = export_onnx(model, Path(tempfile.mkdtemp()) / "model.onnx", simplify=False)
    have = {b: importlib.util.find_spec(b) is not None for b in ("onnxruntime", "openvino")}
    rows = []
    for th in [int(v) for v in a.threads.split(",")]:
        for batch in [int(v) for v in a.batches.split(",")]:
            rows.append(_case(model, graph, have, th, batch))
            print(rows[-1], flush=True)
    out = {
        "bench": "bench/bench_cpu_forward.py",
        "date": time.strftime("%Y-%m-%d"),
        "device": machine["device"],
        "machine": machine,
        "versions": {
            m: getattr(sys.modules.get(m), "__version__", None)
            for m in ("torch", "onnxruntime", "openvino")
        },
        "unit": "tiles/s (640² tiles, forward only)",
        "skipped": [b for b, ok in have.items() if not ok],
        "rows": rows,
    }
    path = Path(a.out or ROOT / "bench" / "results" / f"cpu-forward-{machine_name(machine)}.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
