"""Cross-tile merge: speed, and the measurement behind the merge defaults.

Not part of the default test run (``testpaths = ["tests"]``). Two ways to run it::

    python -m pytest bench/bench_merge.py          # pytest-benchmark timings (+ writes JSON)
    python bench/bench_merge.py [--quick]          # prints the timings and the defaults table

Both write ``bench/results/merge-<machine>.json``: the machine (CPU, cores, numpy), merge times
for 10⁵ and 10⁶ boxes (random boxes with ~1.5 % near-duplicates, and a simulated tiled run where
~40 % of the objects are reported by several tiles), and the precision/recall table of every
method × metric × threshold on simulated tiled layouts (trtwsi.synthetic.tiled).
The merge is given each report's tile (``tiles=sim.tile_index``: same-tile boxes are never
compared, issue 10); ``--all-pairs`` measures the old rule (every pair compared) into the
``defaults_table_all_pairs`` section instead, ``--seed N`` (N > 0) into ``..._seedN``.
``--seams`` measures only the CPU cost of merging while tiles come back (:func:`seam_costs`),
``--seams-contention`` those drains beside busy Python threads, in a merge thread against the
seam-merge process (:func:`seam_contention`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _machine import host_info, machine_name, update_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trtwsi.merge import (
    DEFAULT_METHOD,
    DEFAULT_METRIC,
    DEFAULT_THRESHOLD,
    merge_detections,
)
from trtwsi.results.evaluate import evaluate_detections
from trtwsi.synthetic.tiled import (
    make_layout,
    rows_by_tile,
    simulate_tiled_detections,
    tile_origins,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TILE, OVERLAP = 640, 0.2
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)

#: Layouts of the defaults measurement: (label, layout kind, slide side px, min_visible, jitter)
LAYOUTS = (
    ("seams", "seams", 6400, 0.5, 1.0),
    ("nuclei", "nuclei", 6400, 0.5, 1.0),
    ("metaphases", "metaphases", 12800, 0.5, 1.0),
    ("large", "large", 12800, 0.5, 1.0),
    ("nuclei mv=0.25", "nuclei", 6400, 0.25, 1.0),
    ("seams mv=0.25 j=3", "seams", 6400, 0.25, 3.0),
)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def random_boxes(n: int, rng: np.random.Generator, dup: float = 0.015):
    """``n`` boxes of 20–40 px spread at ~1 per 60×60 px, ``dup`` of them jittered copies."""
    side = float(np.sqrt(n) * 60)
    xy = rng.uniform(0, side, (n, 2))
    wh = rng.uniform(20, 40, (n, 2))
    b = np.concatenate([xy, xy + wh], 1)
    k = int(n * dup)
    d = b[rng.choice(n - k, k, replace=False)] + rng.normal(0, 1.0, (k, 4))
    d[:, 2:] = np.maximum(d[:, 2:], d[:, :2] + 1)
    b[n - k :] = d
    return b, rng.uniform(0.2, 1, n).astype(np.float32), rng.integers(0, 2, n), None


def tiled_boxes(n: int, rng: np.random.Generator):
    """About ``n`` detections (boxes, scores, classes, tile ids) of a simulated tiled run over a
    nuclei layout."""
    side = int(np.sqrt(n / 1.6) * 32)  # nuclei pitch 32 px, ~1.6 reports per object
    gt = make_layout("nuclei", side, side, rng, tile=TILE, overlap=OVERLAP, n_classes=2)
    sim = simulate_tiled_detections(gt, TILE, OVERLAP, side, side, rng)
    return sim.boxes, sim.scores, sim.classes, sim.tile_index


# ------------------------------------------------------------------------------------------
# the defaults measurement
# ------------------------------------------------------------------------------------------
def measure_defaults(
    seed: int = 0, thresholds=THRESHOLDS, layouts=LAYOUTS, use_tiles: bool = True
) -> list[dict]:
    """Precision/recall/F1 at IoU 0.5 of every (method, metric, threshold) on each layout;
    ``use_tiles``: pass the simulated tile of each report as ``tiles=`` (same-tile pairs are
    never compared), else compare every pair (the rule before tile ids)."""
    rows = []
    for label, kind, side, min_visible, jitter in layouts:
        rng = np.random.default_rng(seed)
        gt = make_layout(kind, side, side, rng, tile=TILE, overlap=OVERLAP, n_classes=2)
        sim = simulate_tiled_detections(
            gt, TILE, OVERLAP, side, side, rng, jitter_px=jitter, min_visible=min_visible
        )
        tiles = sim.tile_index if use_tiles else None
        base = {"layout": label, "n_gt": int(gt.shape[0]), "n_reports": int(sim.scores.size)}
        ev = evaluate_detections(sim.boxes, sim.scores, sim.classes, gt)
        rows.append({**base, "method": "none", "metric": "-", "threshold": None, **ev})
        for method in ("nms", "greedy"):
            for metric in ("iou", "ios"):
                for thr in thresholds:
                    r = merge_detections(
                        sim.boxes,
                        sim.scores,
                        sim.classes,
                        method=method,
                        metric=metric,
                        threshold=thr,
                        tiles=tiles,
                    )
                    ev = evaluate_detections(r.boxes, r.scores, r.classes, gt)
                    rows.append(
                        {**base, "method": method, "metric": metric, "threshold": thr, **ev}
                    )
    return rows


def format_table(rows: list[dict]) -> str:
    """F1 and mean IoU per (method, metric, threshold) × layout, and details of the defaults."""
    layouts = list(dict.fromkeys(r["layout"] for r in rows))
    by = {(r["layout"], r["method"], r["metric"], r["threshold"]): r for r in rows}
    configs = list(dict.fromkeys((r["method"], r["metric"], r["threshold"]) for r in rows))
    default = (DEFAULT_METHOD, DEFAULT_METRIC, DEFAULT_THRESHOLD)
    w = max(10, *(len(x) for x in layouts))
    head = f"{'method':7} {'metric':6} {'thr':>4}  " + "  ".join(f"{x:>{w}}" for x in layouts)
    lines = []
    for field, title in (("f1", "F1 at IoU 0.5"), ("mean_iou", "mean IoU of true positives")):
        lines += [title, head]
        for m, me, t in configs:
            ts = "-" if t is None else f"{t:.1f}"
            cells = "  ".join(f"{by[(x, m, me, t)][field]:>{w}.4f}" for x in layouts)
            mark = "  <- default" if (m, me, t) == default else ""
            lines.append(f"{m:7} {me:6} {ts:>4}  {cells}{mark}")
        lines.append("")
    lines.append(
        f"defaults: method={DEFAULT_METHOD} metric={DEFAULT_METRIC} threshold={DEFAULT_THRESHOLD}"
    )
    for x in layouts:
        r = by[(x, *default)]
        lines.append(
            f"  {x:>{w}}: objects {r['n_gt']}, reports {r['n_reports']}, "
            f"P {r['precision']:.4f} R {r['recall']:.4f} F1 {r['f1']:.4f} "
            f"fp {r['fp']} fn {r['fn']} mean IoU {r['mean_iou']:.3f}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# machine + JSON
# ------------------------------------------------------------------------------------------
def machine_info() -> dict:
    info = host_info("merge")
    info["numpy"] = np.__version__
    return info


def write_results(update: dict) -> Path:
    """Merge ``update`` into bench/results/merge-<machine>.json (keeps other sections)."""
    info = machine_info()
    return update_results(RESULTS_DIR / f"merge-{machine_name(info)}.json", update, info)


def time_merge(maker, n: int, repeat: int = 3, **kw) -> dict:
    rng = np.random.default_rng(0)
    b, s, c, t = maker(n, rng)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = merge_detections(b, s, c, tiles=t, **kw)
        best = min(best, time.perf_counter() - t0)
    return {"n_boxes": int(s.size), "n_kept": len(r), "seconds": best, "tiles": t is not None, **kw}


def seam_costs(sections: int = 3, side: int = 18000, objects: int = 36000, batch: int = 64):
    """CPU cost of merging a slide while its tiles come back (``runtime/seams.py``) against
    merging all at the end: ``sections`` square sections of ``side`` level-0 px tiled 640 px
    with 0.2 overlap, tiles in the GPU pipeline's order (7 × 7 chunks, row-major), ``objects``
    boxes of 15–45 px per section reported by :func:`simulate_tiled_detections`, batches of
    ``batch`` tiles. Rows per drain interval: total drain seconds, the merge left after the
    last batch (``tail_s``), and the per-section merges the runtime did before."""
    from trtwsi.runtime.seams import SeamMerger

    plan, per, order = _seam_layout(sections, side, objects)
    base = plan.n_tiles
    empty = np.empty((0, 8))
    out = {"tiles": base, "sections": sections, "batch": batch, "intervals": []}
    for every in (batch, None, 2**62):
        rows: list = [[]]
        m = SeamMerger(plan, rows, {}, every=every)
        drains, spent = 0, 0.0
        for k in range(0, base, batch):
            ids = np.array(order[k : k + batch])
            rows[0].append(np.concatenate([per.get(t, empty) for t in ids]))
            if m.returned(ids):
                t0 = time.perf_counter()
                m.drain()
                spent += time.perf_counter() - t0
                drains += 1
        n = sum(len(r) for r in rows[0])
        t0 = time.perf_counter()
        m.result(0, n)
        out["rows"] = n
        out["intervals"].append({
            "every_tiles": m.every if every != 2**62 else "never",
            "drains": drains,
            "drain_s": round(spent, 4),
            "tail_s": round(time.perf_counter() - t0, 4),
        })  # fmt: skip
    d = np.concatenate([per.get(t, empty) for t in order])
    secs = []
    for sec in range(sections):
        x = d[d[:, 6] == sec]
        t0 = time.perf_counter()
        merge_detections(x[:, :4], x[:, 4], x[:, 5].astype(np.int64), tiles=x[:, 7].astype(np.int64))
        secs.append(time.perf_counter() - t0)
    out["per_section_merge_s"] = [round(v, 4) for v in secs]
    return out


def _seam_layout(sections: int, side: int, objects: int):
    """``(plan, rows per tile id, tile order)`` of :func:`seam_costs`' simulated slide."""
    from types import SimpleNamespace

    rng = np.random.default_rng(0)
    origins = tile_origins(side, TILE, OVERLAP)
    lattice = np.array([(x, y, TILE, TILE) for y in origins for x in origins], np.int64)
    k = len(origins)
    blocks = [  # lattice tiles in chunk order: 7 x 7 blocks, row-major
        r * k + c for by in range(0, k, 7) for bx in range(0, k, 7)
        for r in range(by, min(by + 7, k)) for c in range(bx, min(bx + 7, k))
    ]  # fmt: skip
    grids, bases, per, order = [], [], {}, []
    for sec in range(sections):
        x0 = sec * (side + 2000)
        base = sec * len(lattice)
        xy = rng.uniform(0, side, (objects, 2))
        gt = np.column_stack([xy, xy + rng.uniform(15, 45, (objects, 2)), rng.integers(0, 2, objects)])
        sim = simulate_tiled_detections(gt, TILE, OVERLAP, side, side, rng)
        per.update(rows_by_tile(sim, (x0, 0), sec, base))
        grids.append(SimpleNamespace(tiles=lattice + np.array([x0, 0, 0, 0])))
        bases.append(base)
        order += [base + t for t in blocks]
    base = sections * len(lattice)
    plan = SimpleNamespace(grids={TILE: grids}, tile_base={TILE: bases}, n_tiles=base)
    return plan, per, order


def seam_contention(busy=(0, 1, 3), batch: int = 64, rounds: int = 3) -> dict:
    """The seam-merge drains beside busy Python threads (the runtime's launch loop, reader
    and planner threads): :func:`seam_costs`' slide, its batches appended by a "pipeline"
    thread that does ~1 ms of Python per batch, drains of the default interval in a merge
    thread (``thread``) or shipped to the seam-merge process (``process``,
    :mod:`trtwsi.runtime.seam_process`), beside ``busy`` threads that only run Python. Per
    case, the best of ``rounds``: the pipeline loop's wall (``loop_s``: what the drains cost
    the thread that launches GPU work), the merge left after the last batch (``tail_s``) and
    the drains' own seconds (``drain_s``: thread time, or the process's)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from trtwsi.runtime.seam_process import SeamProcess
    from trtwsi.runtime.seams import SeamMerger

    plan, per, order = _seam_layout(3, 18000, 36000)
    empty = np.empty((0, 8))
    batches = [np.array(order[k : k + batch]) for k in range(0, plan.n_tiles, batch)]
    arrays = [np.concatenate([per.get(t, empty) for t in ids]) for ids in batches]
    n = sum(len(a) for a in arrays)
    proc = SeamProcess()
    proc.submit(len, []).result(timeout=120)  # started (a runtime starts it at its own start)

    def python_ms() -> int:
        x = 0
        for i in range(20000):
            x += i
        return x

    def one(where: str, n_busy: int) -> dict:
        stop = threading.Event()

        def spin():
            while not stop.is_set():
                python_ms()

        spinners = [threading.Thread(target=spin) for _ in range(n_busy)]
        for t in spinners:
            t.start()
        rows: list = [[]]
        m = proc.merger(plan, rows, {}) if where == "process" else SeamMerger(plan, rows, {})
        with ThreadPoolExecutor(2) as merger:
            t0 = time.perf_counter()
            for ids, a in zip(batches, arrays, strict=True):
                python_ms()
                rows[0].append(a)
                if m.returned(ids):
                    merger.submit(m.drain)
            loop = time.perf_counter() - t0
            t1 = time.perf_counter()
            got = m.result(0, n)
            tail = time.perf_counter() - t1
        stop.set()
        for t in spinners:
            t.join()
        assert got is not None and len(got.cluster) == n
        return {"loop_s": loop, "tail_s": tail, "drain_s": m.seconds}

    out = {"tiles": plan.n_tiles, "rows": n, "batch": batch, "cases": []}
    try:
        for n_busy in busy:
            for where in ("thread", "process"):
                runs = [one(where, n_busy) for _ in range(rounds)]
                best = {k: round(min(r[k] for r in runs), 4) for k in runs[0]}
                out["cases"].append({"merge": where, "busy_threads": n_busy, **best})
                print(out["cases"][-1], flush=True)
    finally:
        proc.close()
    return out


# ------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ------------------------------------------------------------------------------------------
_SPEED: dict = {}


def _bench(benchmark, maker, n, method):
    import pytest  # noqa: F401  (only under pytest)

    b, s, c, t = maker(n, np.random.default_rng(0))
    kw = {"method": method, "tiles": t}
    r = benchmark.pedantic(merge_detections, args=(b, s, c), kwargs=kw, rounds=3, iterations=1)
    key = f"{maker.__name__}-{n}-{method}"
    _SPEED[key] = {"n_boxes": int(s.size), "n_kept": len(r), "seconds": benchmark.stats["min"]}
    write_results({"speed_pytest_benchmark": _SPEED})


def test_merge_random_1e5(benchmark):
    _bench(benchmark, random_boxes, 100_000, DEFAULT_METHOD)


def test_merge_random_1e6(benchmark):
    _bench(benchmark, random_boxes, 1_000_000, DEFAULT_METHOD)


def test_merge_tiled_1e6(benchmark):
    _bench(benchmark, tiled_boxes, 1_000_000, DEFAULT_METHOD)


def test_merge_tiled_1e6_greedy(benchmark):
    _bench(benchmark, tiled_boxes, 1_000_000, "greedy")


def test_defaults_table():
    rows = measure_defaults()
    print("\n" + format_table(rows))
    write_results({"defaults_table": rows, "defaults": _defaults()})


def test_seam_merge_costs():
    r = seam_costs()
    print(r)
    write_results({"seams": r})


def _defaults() -> dict:
    return {"method": DEFAULT_METHOD, "metric": DEFAULT_METRIC, "threshold": DEFAULT_THRESHOLD}


# ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10^5 boxes only; skip 10^6")
    ap.add_argument("--table-only", action="store_true", help="only the defaults table")
    ap.add_argument(
        "--all-pairs",
        action="store_true",
        help="defaults table under the old rule (same-tile pairs compared too), saved as "
        "defaults_table_all_pairs",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulated layouts")
    ap.add_argument("--seams", action="store_true", help="only the seam-merge drain costs")
    ap.add_argument(
        "--seams-contention",
        action="store_true",
        help="only the drains beside busy Python threads, in a thread vs in the merge process",
    )
    args = ap.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['device']}; numpy {info['numpy']}")
    if args.seams_contention:
        r = seam_contention()
        print(f"wrote {write_results({'seams_contention': r})}")
        return 0
    if args.seams:
        r = seam_costs()
        print(r)
        print(f"wrote {write_results({'seams': r})}")
        return 0
    out: dict = {"defaults": _defaults()}
    if not args.table_only:
        speed = []
        sizes = (100_000,) if args.quick else (100_000, 1_000_000)
        for n in sizes:
            for maker in (random_boxes, tiled_boxes):
                for method in ("nms", "greedy"):
                    r = time_merge(maker, n, method=method)
                    r["input"] = maker.__name__
                    speed.append(r)
                    print(
                        f"{maker.__name__:13} n={r['n_boxes']:>8} {method:6} "
                        f"kept={r['n_kept']:>8}  {r['seconds']:.3f} s"
                    )
        out["speed"] = speed
    rows = measure_defaults(seed=args.seed, use_tiles=not args.all_pairs)
    print(format_table(rows))
    key = "defaults_table_all_pairs" if args.all_pairs else "defaults_table"
    out[key if args.seed == 0 else f"{key}_seed{args.seed}"] = rows
    print(f"wrote {write_results(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
