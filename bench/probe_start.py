"""A slide's first chunk in the reader processes, outside the pipeline (the rest of a
slide's start, tissue detection step by step, is bench/bench_tissue.py's ``steps_median_ms``).

    python bench/probe_start.py [--slide PATH] [--repeat 5] [--processes N] [--out FILE]

Slide: ``$TRTWSI_BENCH_CACHE/bench-31744.tif`` (the 1 Gpx bench slide) by default.

- ``reads``: a :class:`~trtwsi.read.processes.ReaderPool` of one process per core reading the
  plan's chunks (the GPU pipeline's ``CHUNK_PIXELS``): the first chunk alone, cut into strips
  by each rule (``balanced``: what ``ReaderPool.submit`` cuts, each strip the same share of
  the file tiles the chunk's parts reach; ``before``: the rule before it, alternating), with
  when a worker started and ended each strip (``queue``: submit to the first strip's start;
  ``strip``: the strips' decode times; ``spread``: the first strip's start to the last one's
  end) and the tiles of the largest strip; then every chunk submitted in order (as the
  pipeline queues them) with the first chunk's time to done; and the first chunk decoded by
  one thread of this process.

Writes ``bench/results/start-<machine>.json`` (the device named in ``device``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_info, machine_name  # noqa: E402

from trtwsi.plan.slide_plan import SlideOptions, plan_slide  # noqa: E402
from trtwsi.read.processes import (  # noqa: E402
    ReaderPool,
    SlideRef,
    _strip_parts,
    row_weights,
    strips,
    touched_rows,
)
from trtwsi.slide import open_slide  # noqa: E402
from trtwsi.slide.base import region_parts  # noqa: E402


def _ms(xs) -> dict:
    xs = sorted(float(x) * 1e3 for x in xs)
    return {"median_ms": round(statistics.median(xs), 2), "min_ms": round(xs[0], 2),
            "all_ms": [round(x, 2) for x in xs]}  # fmt: skip


def _strips_before(top: int, h: int, n: int, unit: int) -> list[tuple[int, int]]:
    """The strip rule before balanced strips (ninth session): ``min(n, ceil(h / unit))``
    strips, cuts at the tile rows nearest ``k·h/n``, whatever the rows hold."""
    n = max(1, min(n, -(-h // unit)))
    cuts = [0]
    for k in range(1, n):
        c = round((top + k * h / n) / unit) * unit - top
        if cuts[-1] < c < h:
            cuts.append(c)
    cuts.append(h)
    return list(zip(cuts[:-1], np.diff(cuts).tolist(), strict=True))


def probe_reads(slide, repeat: int, processes: int | None = None) -> dict:
    import _probe_worker

    plan = plan_slide(slide, [640], SlideOptions())
    from trtwsi.runtime.gpu.pipeline import CHUNK_PIXELS

    grid = plan.grids[640][0]
    chunks = grid.chunks(max_pixels=CHUNK_PIXELS)
    procs = processes or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    biggest = max(c.read_size[0] * c.read_size[1] * 3 for c in chunks)
    slots = min(len(chunks), procs + 2)
    out: dict = {"processes": procs, "chunks": len(chunks), "slots": slots}
    c0 = chunks[0]
    w, h = c0.read_size
    only = region_parts(c0.windows(grid.read_size))
    out["first_chunk"] = {"read_size": [w, h], "level": c0.level}
    buf = np.empty((h, w, 3), np.uint8)
    one = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        slide.read_region(c0.region[0], c0.region[1], w, h, c0.level, buf, only=only)
        one.append(time.perf_counter() - t0)
    out["first_chunk"]["one_thread_here"] = _ms(one)
    pool = ReaderPool(procs, slots, biggest, pin=False)
    try:
        ref = SlideRef.of(slide)
        lv = slide.levels[c0.level]
        unit, top = lv.tile_height or 512, c0.region[1] // int(lv.downsample)
        x = c0.region[0] // int(lv.downsample)
        weights = row_weights(only, x, top, h, unit, lv.tile_width or 512)
        rules = {  # the strips ReaderPool.submit cuts now, and the rule before (equal rows)
            "balanced": strips(top, h, procs, unit, weights),
            "before": _strips_before(top, h, procs, unit),
        }
        for _ in range(2):  # every worker opens the slide once
            pool.read(0, slide, c0.region[0], c0.region[1], w, h, c0.level, only)
        runs: dict = {k: {"wall": [], "queue": [], "strip": [], "spread": []} for k in rules}
        for _ in range(repeat):  # the rules alternate
            for name, parts in rules.items():
                r = runs[name]
                t0 = time.perf_counter()
                fs = [
                    pool._pool.submit(
                        _probe_worker.timed_read, ref, pool.buffers[0].offset + r0 * w * 3,
                        c0.region[0], c0.region[1] + r0, w, rows, c0.level,
                        _strip_parts(only, r0, rows),
                    )
                    for r0, rows in parts
                ]  # fmt: skip
                res = [f.result() for f in fs]
                r["wall"].append(time.perf_counter() - t0)
                r["queue"].append(min(a for a, _, _ in res) - t0)
                r["spread"].append(max(b for _, b, _ in res) - min(a for a, _, _ in res))
                r["strip"] += [b - a for a, b, _ in res]
        first, _ = touched_rows(top, h, unit)

        def tiles(a: int, n: int) -> float:  # the file tiles strip (a, n) decodes
            f, count = touched_rows(top + a, n, unit)
            return float(weights[f - first : f - first + count].sum())

        out["first_chunk"]["alone_in_pool"] = {
            name: {
                "strips": len(parts),
                "max_strip_tiles": max(tiles(a, n) for a, n in parts),
                **{k: _ms(v) for k, v in runs[name].items()},
            }
            for name, parts in rules.items()
        }  # fmt: skip
        first, every = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            pending = [
                pool.submit(k, slide, c.region[0], c.region[1], *c.read_size, c.level,
                            c.windows(grid.read_size))
                for k, c in enumerate(chunks[:slots])
            ]  # fmt: skip
            pending[0].result()
            first.append(time.perf_counter() - t0)
            for p in pending[1:]:
                p.result()
            every.append(time.perf_counter() - t0)
        out["in_order"] = {"reads": slots, "first_chunk": _ms(first), "all": _ms(every)}
    finally:
        pool.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cache = Path(os.environ.get("TRTWSI_BENCH_CACHE", "/tmp/bc"))
    ap.add_argument("--slide", type=Path, default=cache / "bench-31744.tif")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--processes", type=int, help="reader processes (default: one per core)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    doc: dict = {"bench": "bench/probe_start.py", "date": time.strftime("%Y-%m-%d"),
                 "slide": a.slide.name}  # fmt: skip
    host = host_info("the reads")
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        host["gpu"] = props["name"].decode()
        host["device"] = f"GPU: {host['gpu']}; " + host["device"]
    except Exception:
        pass
    doc["host"] = host
    with open_slide(a.slide) as slide:
        doc["slide_px"] = [slide.width, slide.height]
        doc["reads"] = probe_reads(slide, a.repeat, a.processes)
        print("reads", json.dumps(doc["reads"]))
    name = machine_name(host) if "gpu" not in host else host["gpu"].lower().replace(" ", "-")
    out = a.out or ROOT / "bench" / "results" / f"start-{name}.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
