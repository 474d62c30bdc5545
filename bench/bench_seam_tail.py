"""The seam merge left after a slide's last batch (``timings["merge"]``), on the CPU.

    python bench/bench_seam_tail.py [--tiles-side 32] [--objects 27000] [--repeat 3]

A slide as the GPU pipeline returns it, without a GPU: one section's 640-px grid (overlap
0.2) of ``tiles-side``² tiles, ``objects`` objects of 12–60 px reported by a jittery tiled
detector (``simulate_tiled_detections``), tiles coming back in batches of 64 in the order of
the pipeline's chunks (blocks of 7 × 7 tiles), one batch every ``--interval`` seconds (the GPU's
pace: 1,012 tiles in ~0.35 s on the H200 host). As in the runtime, the feeding thread appends
each batch's rows and calls :meth:`~trtwsi.runtime.seams.SeamMerger.returned`, and a pool of two
merge threads drains when it is asked to. After the last batch, the bench times what the
finisher does: :func:`~trtwsi.runtime.finish.merge_rows` (the early merge's ``result`` and the
Detections). Drain policies: ``all-at-end`` (no early merge), ``every`` (a drain per
``SeamMerger.every`` tiles: the default) and ``every-and-tail`` (also once as many tiles are
back undrained as are still to come: ``tail_drains``, off by default since it lost on the 4 Gpx
slide of a loaded GPU host). Every policy's detections are checked equal to the one merge of all
rows; runs interleave the policies.

Writes ``bench/results/seam-tail-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_info, machine_name  # noqa: E402

from trtwsi.runtime.finish import merge_rows  # noqa: E402
from trtwsi.runtime.seams import SeamMerger  # noqa: E402
from trtwsi.synthetic.tiled import rows_by_tile, simulate_tiled_detections, tile_origins  # noqa: E402

TILE, OVERLAP, BATCH, CHUNK = 640, 0.2, 64, 7
MODELS = [{"name": "sim", "classes": ["a", "b"]}]
OPTS = {"method": "nms", "metric": "ios", "threshold": 0.5}


def _slide(side: int, objects: int, seed: int):
    """(plan, rows per tile id, tile order): one grid of ``side``² tiles."""
    rng = np.random.default_rng(seed)
    stride = round(TILE * (1 - OVERLAP))
    length = stride * (side - 1) + TILE
    xy = rng.uniform(0, length - 60, (objects, 2))
    gt = np.column_stack([xy, xy + rng.uniform(12, 60, (objects, 2)), rng.integers(0, 2, objects)])
    sim = simulate_tiled_detections(gt, TILE, OVERLAP, length, length, rng, jitter_px=1.5)
    per_tile = rows_by_tile(sim)
    xs = tile_origins(length, TILE, OVERLAP)
    lattice = np.array([(x, y, TILE, TILE) for y in xs for x in xs], dtype=np.int64)
    plan = SimpleNamespace(
        grids={TILE: [SimpleNamespace(tiles=lattice)]}, tile_base={TILE: [0]},
        targets=[(0, None)], n_tiles=len(lattice),
    )  # fmt: skip
    n = len(xs)
    order = [
        r * n + c
        for br in range(0, n, CHUNK)
        for bc in range(0, n, CHUNK)
        for r in range(br, min(br + CHUNK, n))
        for c in range(bc, min(bc + CHUNK, n))
    ]
    return plan, per_tile, np.asarray(order, dtype=np.int64)


def _run(plan, per_tile, order, policy: str, interval: float) -> dict:
    """Feed the batches like the pipeline thread; time the finisher's merge."""
    rows: list = [[]]
    merger = SeamMerger(plan, rows, OPTS) if policy != "all-at-end" else None
    if merger is not None:
        merger.tail_drains = policy == "every-and-tail"
    drains = 0
    with ThreadPoolExecutor(2) as pool:
        futures = []
        t0 = time.perf_counter()
        for k in range(0, len(order), BATCH):
            due = t0 + (k // BATCH + 1) * interval
            while time.perf_counter() < due:
                time.sleep(0.0005)
            tiles = order[k : k + BATCH]
            got = [per_tile[t] for t in tiles.tolist() if t in per_tile]
            rows[0].append(np.concatenate(got) if got else np.empty((0, 8)))
            if merger is not None and merger.returned(tiles):
                futures.append(pool.submit(merger.drain))
                drains += 1
        t1 = time.perf_counter()
        det = merge_rows(rows, MODELS, OPTS, merger)
        tail = time.perf_counter() - t1
    for f in futures:
        f.result()
    return {
        "tail_s": tail,
        "drains": drains,
        "early_s": merger.seconds if merger is not None else 0.0,
        "rows": sum(len(r) for r in rows[0]),
        "detections": len(det),
        "boxes": np.asarray(det.boxes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles-side", type=int, default=32)
    ap.add_argument("--objects", type=int, default=27000)
    ap.add_argument("--interval", type=float, default=0.022)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    plan, per_tile, order = _slide(a.tiles_side, a.objects, seed=5)
    results = {}
    want = None
    policies = ("all-at-end", "every", "every-and-tail")
    runs_of: dict = {p: [] for p in policies}
    for _ in range(a.repeat):  # interleaved: the VM's pace drifts
        for p in policies:
            runs_of[p].append(_run(plan, per_tile, order, p, a.interval))
    for name in policies:
        runs = runs_of[name]
        for r in runs:
            boxes = r.pop("boxes")
            if want is None:
                want = boxes
            np.testing.assert_array_equal(boxes, want)
        best = min(runs, key=lambda r: r["tail_s"])
        results[name] = {
            "tail_s_best": round(best["tail_s"], 4),
            "tail_s_all": [round(r["tail_s"], 4) for r in runs],
            "drains": best["drains"],
            "early_s": round(best["early_s"], 4),
            "rows": best["rows"],
            "detections": best["detections"],
        }
        print(name, results[name])
    host = host_info("the seam merge (numpy, 2 merge threads)")
    out = a.out or ROOT / "bench" / "results" / f"seam-tail-{machine_name(host)}.json"
    doc = {
        "bench": "bench/bench_seam_tail.py",
        "date": time.strftime("%Y-%m-%d"),
        "host": host,
        "tiles": int(plan.n_tiles),
        "objects": a.objects,
        "interval_s": a.interval,
        "batch": BATCH,
        "merge": OPTS,
        "combine_sort": "score_index_order (packed int64 key)",
        "results": results,
        "same_detections": True,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
