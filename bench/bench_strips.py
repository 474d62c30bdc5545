"""Reader-pool strips: chunk reads cut on file-tile rows vs the old fixed 512-row cut.

Not part of the default test run. ``python bench/bench_strips.py [--processes N]`` reads the
GPU pipeline's chunk shape (3713 × 4225 level-0 px: 7 × 8 tiles of 640 px with 0.2 overlap) at
offsets that do not start on a file-tile row, through a :class:`~trtwsi.read.processes.ReaderPool`
of ``N`` processes (default 16, the GPU hosts' readers; more processes than cores measures the
decode work, not the latency), once with :func:`~trtwsi.read.processes.strips` (cuts on the
level's tile rows) and once with the rule it replaced (a strip every 512 rows from the region's
top, so every inner cut of a 256-row-tiled level decodes one tile row twice). Alternates the two,
reports each one's best pass and the tile rows each decodes, and writes
``bench/results/strips-<machine>.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _machine import host_info, machine_name, update_results
from bench_read import default_slide_path, ensure_slide

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trtwsi.read.processes as rp
from trtwsi.slide import open_slide

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHUNK = (3713, 4225)


def fixed_512(top: int, h: int, n: int, unit: int) -> list[tuple[int, int]]:
    """The cut before tile-row strips: ``ceil(h / n)`` rounded up to 512 rows, from the top."""
    n = max(1, min(n, -(-h // 512)))
    per = -(-h // n)
    rows = -(-per // 512) * 512
    return [(r0, min(rows, h - r0)) for r0 in range(0, h, rows)]


def tile_rows_decoded(parts, top: int, unit: int) -> int:
    return sum((top + a + r - 1) // unit - (top + a) // unit + 1 for a, r in parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gigapixels", type=float, default=1.0)
    ap.add_argument("--processes", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3, help="alternating passes of each rule")
    args = ap.parse_args(argv)
    path = ensure_slide(default_slide_path(args.gigapixels), args.gigapixels)
    slide = open_slide(path)
    w, h = CHUNK
    unit = slide.levels[0].tile_height
    regions = [(700 + w * i, 100 + 4096 * j, w, h) for i in range(3) for j in range(2)]
    rules = {"tile_rows": rp.strips, "fixed_512": fixed_512}
    pool = rp.ReaderPool(args.processes, 1, w * h * 3, pin=False)
    seconds: dict[str, list[float]] = {k: [] for k in rules}
    try:
        pool.ready()
        for x, y, rw, rh in regions[:1]:  # each worker opens the slide once, untimed
            pool.read(0, slide, x, y, rw, rh, 0)
        for _ in range(args.repeat):
            for name, rule in rules.items():
                rp.strips = rule
                t0 = time.perf_counter()
                for x, y, rw, rh in regions:
                    pool.read(0, slide, x, y, rw, rh, 0)
                seconds[name].append(round(time.perf_counter() - t0, 4))
    finally:
        rp.strips = rules["tile_rows"]
        pool.close()
        slide.close()
    out = {}
    for name, rule in rules.items():
        decoded = sum(tile_rows_decoded(rule(y, rh, args.processes, unit), y, unit)
                      for _, y, _, rh in regions)  # fmt: skip
        out[name] = {"best_s": min(seconds[name]), "seconds": seconds[name],
                     "tile_rows_decoded": decoded}  # fmt: skip
        print(f"{name:10} best {min(seconds[name]):.3f} s, {decoded} tile rows decoded")
    info = host_info("reader processes decoding JPEG chunks (CPU)")
    update = {
        "strips": {
            "slide": str(path.name),
            "tile_height": unit,
            "chunk_px": list(CHUNK),
            "chunks": len(regions),
            "processes": args.processes,
            **out,
            "speedup": round(out["fixed_512"]["best_s"] / out["tile_rows"]["best_s"], 3),
        }
    }
    dest = update_results(RESULTS_DIR / f"strips-{machine_name(info)}.json", update, info)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
