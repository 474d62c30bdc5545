"""Where does loading or running an AOTInductor package crash? A diagnostic, not a benchmark.

    TRTWSI_COMPILE_PACKAGE=1 python -X faulthandler bench/probe_package_threads.py MODE

MODE: ``main`` (load and run in the main thread), ``thread-load`` (load in a second thread, run
in the main one), ``thread-load-run`` (both in a second thread), ``main-load-thread-run``. The
demo yolo11n's package at batch 64, fp16, channels_last on cuda:0 is built first (by the child
process of :func:`trtwsi.engines.compiled.obtain`) when the cache lacks it. Prints the mode, how
the package came and the output's shape; a crash leaves faulthandler's stack on stderr.

Seen on an H100 with torch 2.11.0+cu130 (2026-12-07): every mode segfaulted inside
``AOTIModelPackageLoader`` (README, "The compiled model kept on disk").
"""

import sys
import threading

import torch

import trtwsi
from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines.compiled import obtain


def main(mode: str) -> None:
    m = trtwsi.Model(bundled_models_dir() / "demo-yolo11n.pt")
    dev = torch.device("cuda", 0)
    x = torch.zeros((64, 3, 640, 640), dtype=torch.float16, device=dev)
    x = x.contiguous(memory_format=torch.channels_last)
    box = {}

    def load():
        box["fn"], box["how"], _ = obtain(m, dev, torch.float16, 64, True)

    def run():
        with torch.inference_mode():
            box["y"] = box["fn"](x)
        torch.cuda.synchronize()

    def in_thread(f):
        t = threading.Thread(target=f)
        t.start()
        t.join()

    steps = {
        "main": [load, run],
        "thread-load": [lambda: in_thread(load), run],
        "thread-load-run": [lambda: in_thread(lambda: (load(), run()))],
        "main-load-thread-run": [load, lambda: in_thread(run)],
    }[mode]
    for step in steps:
        step()
    print(mode, box.get("how"), tuple(box["y"].shape) if "y" in box else None, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
