"""Batch throughput: slides/hour and Gpx/s for 1..N devices (local worker pool, or Ray).

Not part of the default test run (``testpaths = ["tests"]``). Two ways to run it::

    python bench/bench_batch.py                          # every GPU count 1..all (else CPU 1..2)
    python bench/bench_batch.py --kind cpu --max 2 --slides 6 --size 2000x1500
    python bench/bench_batch.py --ray --kind cpu --max 2 # the same batch through a local Ray
    python -m pytest bench/bench_batch.py                # pytest-benchmark, 1, 2, 4, 8 devices

Both write ``bench/results/batch-<machine>.json``: the host (CPU, cores, GPUs by name), then
per device count: wall time of ``run_batch`` (worker start, model load and every slide), the
worker seconds spent on slides, slides/hour and level-0 Gpx/s on the wall clock, and the
speed-up over one device. Device counts beyond what the machine has are skipped, and the
reason is recorded.

Slides: ``--slides`` (default 4 per device of the largest count, at least 8) synthetic
pyramidal TIFFs (``trtwsi.synthetic.make_slide``, seeds 300…) of ``--size`` (default 8000x6000,
48 Mpx), cached in ``$TRTWSI_BENCH_DIR`` or ``~/.cache/trtwsi/bench/batch``. Model: the bundled
demo yolo11n. Every count runs into a fresh output folder, so nothing is skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _machine import host_info, machine_name, update_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = Path(__file__).resolve().parents[1] / "trtwsi" / "models" / "demo-yolo11n.pt"


def gpus() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_info() -> dict:
    names = gpus()
    info = host_info("batch")
    info["gpus"] = names
    if names:
        info["device"] = f"{len(names)}× {names[0]} (+ host {info['cpu']}, {info['cores']} cores)"
    return info


def bench_slides(count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` cached synthetic slides of ``size`` (made once)."""
    from trtwsi.synthetic import make_slide

    root = Path(
        os.environ.get("TRTWSI_BENCH_DIR", Path.home() / ".cache" / "trtwsi" / "bench" / "batch")
    )
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        p = root / f"batch-{size[0]}x{size[1]}-{300 + i}.tif"
        if not p.exists():
            make_slide(p, size[0], size[1], seed=300 + i)
        out.append(p)
    return out


def run_once(
    slides: list[Path], devices: list[str], ray: bool = False, threads=None, compile=False
) -> dict:
    """One batch into a fresh folder; returns the timings. ``compile``: the workers compile the
    model (``BatchParams(compile=True)``)."""
    from trtwsi.batch import BatchParams, run_batch
    from trtwsi.engines.model import Model

    model = Model(MODEL)
    load_before = os.getloadavg()
    done_at: list[float] = []

    def log(line: str) -> None:  # one line per finished slide ("[k/n] name: done, ...")
        if ": done," in line:
            done_at.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="trtwsi-bench-batch-") as tmp:
        t0 = time.perf_counter()
        s = run_batch(
            slides,
            Path(tmp) / "out",
            [model],
            BatchParams(threads=threads, compile=compile),
            devices=devices,
            ray=ray,
            log=log,
        )
        wall = time.perf_counter() - t0
    recs = [r for r in s.records.values() if r["status"] == "done"]
    if len(recs) != len(slides):
        raise RuntimeError(f"{len(slides) - len(recs)} slide(s) failed: {s.failed}")
    pixels = sum(r["pixels"] for r in recs)
    busy = sum(r["seconds"] for r in recs)
    stages: dict[str, float] = {}
    for r in recs:
        for k, v in (r.get("timings") or {}).items():
            stages[k] = stages.get(k, 0.0) + float(v)
    # compute-stream time from CUDA events (preprocess + model + decode/NMS) over the wall
    # clock of all devices: the fraction of the batch each GPU was busy computing
    gpu_s = sum(v for k, v in stages.items() if k.startswith(("gpu_pre", "gpu_infer", "gpu_post")))
    return {
        "devices": devices,
        "compile": compile,
        # the workers' seam merge (Runtime reads $TRTWSI_SEAM_MERGE; spawned workers inherit it)
        "seam_merge": os.environ.get("TRTWSI_SEAM_MERGE") or "thread",
        "runner": "ray" if ray else "local",
        "n_slides": len(recs),
        "gigapixels": pixels / 1e9,
        "wall_s": round(wall, 3),
        "worker_busy_s": round(busy, 3),
        "slides_per_hour": round(len(recs) / wall * 3600, 1),
        "gpx_per_s": round(pixels / 1e9 / wall, 4),
        # the per-slide rate inside workers, without worker start-up and model load
        "gpx_per_s_in_workers": round(pixels / 1e9 / busy * len(devices), 4),
        "tiles": sum(r["n_tiles"] for r in recs),
        "gpu_compute_s": round(gpu_s, 3),
        # the slowest worker's model load + runtime start, and the wall time after it
        "worker_start_s": max(r.get("worker_start_s", 0.0) for r in recs),
        # its parts in the first worker (boot: spawn to worker main; import; models; engines;
        # pipeline; tissue; planners; warm_up: the engines' warm-up, which runs in the
        # background after the start, beside the first slides' planning and reads)
        "worker_start": recs[0].get("worker_start") if recs else None,
        "steady_wall_s": round(wall - max(r.get("worker_start_s", 0.0) for r in recs), 3),
        "gpu_busy_fraction": round(gpu_s / (wall * len(devices)), 4),
        # when the first and last slide were done (s after run_batch was called), and the rate
        # in between: the steady state of a long batch, without the one-time start
        "first_done_s": round(done_at[0], 3) if done_at else None,
        "last_done_s": round(done_at[-1], 3) if done_at else None,
        # after the last slide: the workers' shutdown the coordinator waits for
        "after_last_done_s": round(wall - done_at[-1], 3) if done_at else None,
        "steady_slides_per_hour": (
            round((len(done_at) - 1) / (done_at[-1] - done_at[0]) * 3600, 1)
            if len(done_at) > 1 and done_at[-1] > done_at[0]
            else None
        ),
        # mean seconds per slide and stage (stages overlap: open/sections run ahead in planner
        # threads, reads in reader processes, merge in the finisher thread)
        "per_slide_s": {k: round(v / len(recs), 4) for k, v in sorted(stages.items())},
        # other work on the machine shows here (shared CI/VM cores)
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def device_list(kind: str, n: int) -> list[str]:
    return ["cpu"] * n if kind == "cpu" else [f"cuda:{i}" for i in range(n)]


def available(kind: str) -> int:
    if kind == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return len(gpus())


def write_results(update: dict) -> Path:
    """Merge ``update`` into bench/results/batch-<machine>.json (keeps other sections)."""
    info = machine_info()
    gpu = f"-{len(info['gpus'])}gpu" if info["gpus"] else ""
    return update_results(RESULTS_DIR / f"batch-{machine_name(info)}{gpu}.json", update, info)


def scaling(
    kind: str, counts: list[int], slides: list[Path], ray=False, threads=None, compile=False
) -> dict:
    rows, skipped = [], []
    have = available(kind)
    for n in counts:
        if n > have:
            skipped.append({"devices": n, "reason": f"this machine has {have} {kind} device(s)"})
            continue
        r = run_once(slides, device_list(kind, n), ray=ray, threads=threads, compile=compile)
        rows.append(r)
        base = rows[0]
        r["speedup_vs_first"] = round(base["wall_s"] / r["wall_s"], 3)
        print(
            f"{n} {kind}{' (ray)' if ray else ''}: {r['n_slides']} slides "
            f"{r['gigapixels']:.3f} Gpx in {r['wall_s']:.1f} s → {r['slides_per_hour']:.0f} "
            f"slides/h, {r['gpx_per_s']:.4f} Gpx/s (in workers {r['gpx_per_s_in_workers']:.4f}), "
            f"×{r['speedup_vs_first']:.2f}, GPU busy {r['gpu_busy_fraction']:.1%}, "
            f"worker start {r['worker_start_s']:.1f} s",
            flush=True,
        )
    return {"kind": kind, "rows": rows, "skipped": skipped}


# ------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ------------------------------------------------------------------------------------------
_ROWS: dict = {}


def _pytest_bench(benchmark, n: int):
    import pytest

    kind = "cuda" if gpus() else "cpu"
    have = available(kind)
    if n > have:
        pytest.skip(f"{n} {kind} device(s) asked for, this machine has {have}")
    size = tuple(int(v) for v in os.environ.get("TRTWSI_BENCH_BATCH_SIZE", "8000x6000").split("x"))
    slides = bench_slides(int(os.environ.get("TRTWSI_BENCH_BATCH_SLIDES", "16")), size)
    out = {}

    def once():
        out.update(run_once(slides, device_list(kind, n)))

    benchmark.pedantic(once, rounds=1, iterations=1)
    _ROWS[f"{kind}-{n}"] = out
    write_results({"pytest_benchmark": _ROWS})


def test_batch_1_device(benchmark):
    _pytest_bench(benchmark, 1)


def test_batch_2_devices(benchmark):
    _pytest_bench(benchmark, 2)


def test_batch_4_devices(benchmark):
    _pytest_bench(benchmark, 4)


def test_batch_8_devices(benchmark):
    _pytest_bench(benchmark, 8)


# ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["cuda", "cpu"], default=None, help="default: cuda if any")
    ap.add_argument("--max", type=int, default=None, help="largest device count (default: all)")
    ap.add_argument("--slides", type=int, default=None)
    ap.add_argument("--size", default="8000x6000", help="WxH of each slide in px")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    ap.add_argument("--ray", action="store_true", help="run through a local Ray instead")
    ap.add_argument("--compile", action="store_true", help="workers compile the model")
    args = ap.parse_args(argv)
    kind = args.kind or ("cuda" if gpus() else "cpu")
    top = args.max or (available(kind) if kind == "cuda" else min(2, available(kind)))
    counts = sorted({1, *[c for c in (2, 4, 8) if c < top], top})
    size = tuple(int(v) for v in args.size.lower().split("x"))
    slides = bench_slides(args.slides or max(8, 4 * top), size)
    info = machine_info()
    print(f"machine: {info['device']}; {len(slides)} slides of {size[0]}x{size[1]}", flush=True)
    res = scaling(kind, counts, slides, ray=args.ray, threads=args.threads, compile=args.compile)
    res["slide_size"] = list(size)
    key = f"scaling-{kind}{'-ray' if args.ray else ''}{'-compile' if args.compile else ''}"
    print(f"wrote {write_results({key: res})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
