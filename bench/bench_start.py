"""A fresh process's start, step by step: imports, CUDA init, model load, Runtime, again.

Not part of the default test run. ``python bench/bench_start.py`` (on a GPU machine; the
Runtime steps need CUDA) prints one JSON line: seconds to ``import torch``, ``import cupy``,
trtwsi's runtime, CUDA's first allocation, the demo model's load, a first ``Runtime`` (with its
``start_timings``, waiting for the background warm-up) and a second one in the same process
(what is left once the process's one-time costs are paid). Run it in a fresh process each
time, with and without compiled bytecode (``PYTHONDONTWRITEBYTECODE`` hosts compile every
module at every import: see bench/README.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    out: dict = {}
    t_all = time.perf_counter()

    def timed(key, fn):
        t = time.perf_counter()
        r = fn()
        out[key] = round(time.perf_counter() - t, 3)
        return r

    torch = timed("import_torch", lambda: __import__("torch"))
    timed("import_cupy", lambda: __import__("cupy"))
    runtime = timed("import_trtwsi_runtime", lambda: __import__("trtwsi.runtime").runtime)
    from trtwsi._util.resources import bundled_models_dir
    from trtwsi.engines.model import Model

    timed("cuda_init", lambda: torch.zeros(1, device="cuda"))
    m = timed("model_load", lambda: Model(bundled_models_dir() / "demo-yolo11n.pt"))
    for key in ("runtime", "runtime_again"):
        rt = timed(key, lambda: runtime.Runtime([m], device="cuda"))
        rt.wait_ready()
        out[f"{key}_start_timings"] = rt.start_timings
        rt.close()
    out["total"] = round(time.perf_counter() - t_all, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
