"""Where a stream of slides spends its time: one in-process Runtime, a timeline per slide.

``bench_batch.py`` times the whole batch job (worker processes, model load, outputs); this
one opens one :class:`trtwsi.Runtime` in this process and streams the same slides through it,
so the runtime's own throughput is measured apart from worker start. It also times each
stage alone on the same slides, to name the one that bounds the stream:

- ``plan``: opening + tissue sections + tile grids, ``--planners`` threads (GPU tissue when a
  GPU is present, else OpenCV);
- ``reads``: every chunk of every slide read through the runtime's reader pool (processes on
  hosts with ≥ 8 CPUs), as many reader threads as the runtime uses, no GPU;
- ``stream``: the full stream, twice (the second pass is warm), with per-slide timestamps
  (plan start/end, first/last chunk read, Results ready) and the main process's CPU seconds
  (user + system: near ``wall × 1`` means one Python thread, i.e. the GIL, bounds it).

Run::

    python bench/bench_stream.py --slides 16 --size 20000x15000

Writes ``bench/results/stream-<gpu or cpu>.json`` naming the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from _machine import host_info, machine_name, update_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL = Path(__file__).resolve().parents[1] / "trtwsi" / "models" / "demo-yolo11n.pt"


def _make(args) -> str:
    from trtwsi.synthetic import make_slide

    path, w, h, seed = args
    if not Path(path).exists():
        make_slide(path, w, h, seed=seed, threads=2)
    return path


def bench_slides(count: int, size: tuple[int, int]) -> list[Path]:
    """The same cached slides as ``bench_batch.py`` (seeds 300…), made in parallel."""
    root = Path(
        os.environ.get("TRTWSI_BENCH_DIR", Path.home() / ".cache" / "trtwsi" / "bench" / "batch")
    )
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"batch-{size[0]}x{size[1]}-{300 + i}.tif"), *size, 300 + i) for i in range(count)]
    todo = [j for j in jobs if not Path(j[0]).exists()]
    if todo:
        n = max(1, min(len(todo), (os.cpu_count() or 2) // 2))
        with ProcessPoolExecutor(n) as ex:
            list(ex.map(_make, todo))
    return [Path(j[0]) for j in jobs]


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def time_plan(slides, planners: int, tissue: str) -> dict:
    """Open + sections + grids of every slide, ``planners`` threads."""
    from trtwsi.plan.slide_plan import SlideOptions, plan_slide
    from trtwsi.slide import open_slide

    gpu = None
    if tissue == "gpu":
        from trtwsi.runtime.gpu.tissue import GpuTissue

        gpu = GpuTissue(0)

    def one(p):
        t0 = time.perf_counter()
        s = open_slide(p)
        secs = gpu.sections(s) if gpu is not None else None
        plan = plan_slide(s, [640], SlideOptions(), secs)
        s.close()
        return time.perf_counter() - t0, plan.n_tiles

    one(slides[0])  # warm (kernels, imports)
    c0, t0 = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(planners) as ex:
        per = list(ex.map(one, slides))
    wall = time.perf_counter() - t0
    return {
        "tissue": tissue,
        "planners": planners,
        "wall_s": round(wall, 3),
        "per_slide_s": round(sum(p[0] for p in per) / len(per), 4),
        "slides_per_s": round(len(slides) / wall, 2),
        "cpu_s": round(cpu_seconds() - c0, 2),
        "tiles": sum(p[1] for p in per),
    }


def time_reads(slides, workers: int, readers: str) -> dict:
    """Every chunk of every slide into the host ring: the pipeline's reads without the GPU."""
    from trtwsi.plan.slide_plan import SlideOptions, plan_slide
    from trtwsi.read.processes import ReaderPool
    from trtwsi.runtime.gpu.pipeline import CHUNK_PIXELS
    from trtwsi.slide import open_slide

    opened = [open_slide(p) for p in slides]
    jobs = []
    for s in opened:
        plan = plan_slide(s, [640], SlideOptions(), None)
        for grid in plan.grids[640]:
            for c in grid.chunks(max_pixels=CHUNK_PIXELS):
                jobs.append((s, c))
    slots = workers + 2
    pool = ReaderPool(workers, slots, CHUNK_PIXELS * 3, pin=False) if readers == "processes" else None
    import numpy as np

    bufs = None if pool else [np.empty((CHUNK_PIXELS * 3,), np.uint8) for _ in range(slots)]
    free = list(range(slots))
    lock = threading.Condition()

    def read(job):
        s, c = job
        with lock:
            while not free:
                lock.wait()
            slot = free.pop()
        try:
            w, h = c.read_size
            if pool is not None:
                pool.read(slot, s, c.region[0], c.region[1], w, h, c.level)
            else:
                s.read_region(c.region[0], c.region[1], w, h, level=c.level, out=bufs[slot][: w * h * 3].reshape(h, w, 3))
        finally:
            with lock:
                free.append(slot)
                lock.notify()
        return c.read_size[0] * c.read_size[1]

    try:
        read(jobs[0])
        c0, t0 = cpu_seconds(), time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            px = sum(ex.map(read, jobs))
        wall = time.perf_counter() - t0
    finally:
        if pool is not None:
            pool.close()
        for s in opened:
            s.close()
    return {
        "readers": readers,
        "workers": workers,
        "chunks": len(jobs),
        "read_gpx": round(px / 1e9, 3),
        "wall_s": round(wall, 3),
        "gpx_per_s": round(px / 1e9 / wall, 3),
        "main_cpu_s": round(cpu_seconds() - c0, 2),
    }


class Timeline:
    """Per-slide timestamps from wrapped runtime functions (this benchmark only)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.ev: dict[str, dict] = {}
        self.lock = threading.Lock()

    def mark(self, slide: str, key: str, first: bool = False) -> None:
        t = round(time.perf_counter() - self.t0, 4)
        with self.lock:
            d = self.ev.setdefault(Path(slide).name, {})
            if not first or key not in d:
                d[key] = t


def install_timeline(tl: Timeline) -> None:
    import trtwsi.read.processes as rp
    import trtwsi.runtime.runtime as rr

    plan_slide = rr.plan_slide

    def plan_wrapped(slide, *a, **k):
        tl.mark(slide.path, "grid_start")
        try:
            return plan_slide(slide, *a, **k)
        finally:
            tl.mark(slide.path, "plan_end")

    rr.plan_slide = plan_wrapped
    read = rp.ReaderPool.read

    def read_wrapped(self, slot, slide, *a, **k):
        tl.mark(slide.path, "read_first", first=True)
        try:
            return read(self, slot, slide, *a, **k)
        finally:
            tl.mark(slide.path, "read_last")

    rp.ReaderPool.read = read_wrapped


def time_stream(
    slides, batch: int | None, passes: int, planners: int = 2, workers: int | None = None
) -> dict:
    import torch

    import trtwsi

    tl = Timeline()
    install_timeline(tl)
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rt = trtwsi.Runtime(
        [str(MODEL)], device=device, batch=batch, planners=planners, workers=workers
    )
    start_s = time.perf_counter() - t0
    out = {"runtime_start_s": round(start_s, 3), "start_timings": rt.start_timings,
           "tissue": rt.tissue, "batch": rt.batch, "planners": planners,
           "readers": rt.reader_kind, "workers": rt.workers, "decode": rt.decode,
           "passes": []}  # fmt: skip
    try:
        for p in range(passes):
            tl.ev.clear()
            tl.t0 = time.perf_counter()
            c0 = cpu_seconds()
            rows = []
            for o in rt.stream(slides):
                t = round(time.perf_counter() - tl.t0, 4)
                r = {"slide": Path(str(o.source)).name, "ok": o.ok, "done": t, "seconds": round(o.seconds, 4)}
                if o.ok:
                    r["tiles"] = o.results.n_tiles
                    r["timings"] = o.results.timings
                else:
                    r["error"] = repr(o.error)
                rows.append(r)
            wall = time.perf_counter() - tl.t0
            for r in rows:
                r.update(tl.ev.get(r["slide"], {}))
            stages: dict[str, float] = {}
            for r in rows:
                for k, v in r.get("timings", {}).items():
                    if isinstance(v, (int, float)):
                        stages[k] = stages.get(k, 0.0) + v
            gpu = sum(v for k, v in stages.items() if k.startswith("gpu_") and k != "gpu_h2d")
            out["passes"].append({
                "wall_s": round(wall, 3),
                "slides_per_hour": round(len(rows) / wall * 3600, 1),
                "main_cpu_s": round(cpu_seconds() - c0, 2),
                "gpu_busy_fraction": round(gpu / wall, 4),
                "stage_sums_s": {k: round(v, 3) for k, v in sorted(stages.items())},
                "slides": rows,
            })  # fmt: skip
            lane = getattr(rt._pipe, "lane", None)
            if lane is not None:  # totals since the runtime started
                out["passes"][-1]["gpu_jpeg_lane"] = {
                    "chunks": lane.chunks, "device_tiles": lane.device_tiles,
                    "cpu_tiles": lane.cpu_tiles,
                    # the nvJPEG probe, in the background since the runtime started
                    "probe_s": rt._pipe.decode_probe_seconds,
                }  # fmt: skip
            print(f"pass {p}: {wall:.2f} s, cpu {out['passes'][-1]['main_cpu_s']} s", flush=True)
        t0 = time.perf_counter()
    finally:
        rt.close()
    out["runtime_close_s"] = round(time.perf_counter() - t0, 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slides", type=int, default=16)
    ap.add_argument("--size", default="20000x15000")
    ap.add_argument("--planners", type=int, default=4)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="reader processes (default: CPUs)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--only", default="plan,reads,stream", help="comma list of plan,reads,stream")
    ap.add_argument("--tag", default="", help="suffix of the results key (e.g. a variant name)")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))
    t0 = time.perf_counter()
    slides = bench_slides(args.slides, (w, h))
    print(f"slides ready in {time.perf_counter() - t0:.1f} s", flush=True)
    info = host_info("stream")
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            info["device"] = f"1× {name} (+ host {info['cpu']}, {info['cores']} cores)"
            info["gpus"] = [name]
    except ImportError:
        pass
    gpu = "gpus" in info
    res: dict = {"slides": len(slides), "size": [w, h]}
    only = set(args.only.split(","))
    cores = os.cpu_count() or 1
    if "plan" in only:
        res["plan"] = [time_plan(slides, n, t) for t in (["gpu", "cpu"] if gpu else ["cpu"])
                       for n in sorted({1, args.planners, 4})]  # fmt: skip
        print(res["plan"], flush=True)
    if "reads" in only:
        kinds = ["processes", "threads"] if cores >= 8 else ["threads"]
        res["reads"] = [time_reads(slides, cores if gpu else 2, k) for k in kinds]
        print(res["reads"], flush=True)
    if "stream" in only:
        res["stream"] = time_stream(slides, args.batch, args.passes, args.planners, args.workers)
    key = "stream" + (f"-{args.tag}" if args.tag else "")
    slug = info["gpus"][0].lower().replace(" ", "-") if gpu else machine_name(info)
    path = update_results(RESULTS_DIR / f"stream-{slug}.json", {key: res}, info)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
