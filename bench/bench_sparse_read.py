"""Chunk reads of a whole slide: the chunk's bounding box vs only its tiles (``only=``).

    python bench/bench_sparse_read.py [--gigapixels 1] [--threads 2] [--processes 0]

The slide: the pipeline bench's synthetic JPEG TIFF (``make_slide(side, side, seed=3,
n_sections=3)``, 256² tiles, cached in ``$TRTWSI_BENCH_CACHE`` or /tmp). Its tissue sections
and 640-px tile grids (overlap 0.2) are planned as the runtime plans them, and every chunk of
the GPU pipeline's size (``CHUNK_PIXELS``) is read twice over: the whole read region (what
the runtime did before) and only the tiles' windows (``Chunk.windows`` → ``read_region(only=)``,
what it does now). Both passes decode with the slide's pool of ``--threads`` threads, or, with
``--processes N``, through a :class:`~trtwsi.read.processes.ReaderPool` of N processes (strips).
Reported: file tiles decoded (counted from the plan), seconds (best of ``--repeat``), and that
every tile's pixels are equal. Writes ``bench/results/sparse-read-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import host_info, machine_name  # noqa: E402

from trtwsi.plan.slide_plan import SlideOptions, plan_slide  # noqa: E402
from trtwsi.runtime.gpu.pipeline import CHUNK_PIXELS  # noqa: E402
from trtwsi.slide.tiff import TiffSlide  # noqa: E402
from trtwsi.synthetic import make_slide  # noqa: E402


def _file_tiles(c, rs: int, ft: int) -> tuple[int, int]:
    """(file tiles the chunk's read touches, file tiles its tiles' windows touch); level 0."""
    x0, y0 = c.region[0], c.region[1]
    w, h = c.read_size
    whole = ((x0 + w - 1) // ft - x0 // ft + 1) * ((y0 + h - 1) // ft - y0 // ft + 1)
    need = set()
    for ox, oy, ww, hh in c.windows(rs).tolist():
        gx, gy = x0 + ox, y0 + oy
        for r in range(gy // ft, (gy + hh - 1) // ft + 1):
            for col in range(gx // ft, (gx + ww - 1) // ft + 1):
                need.add((r, col))
    return whole, len(need)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gigapixels", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    side = int(round((a.gigapixels * 1e9) ** 0.5 / 256) * 256)
    cache = Path(os.environ.get("TRTWSI_BENCH_CACHE", "/tmp"))
    path = cache / f"bench-{side}.tif"
    if not path.exists():
        make_slide(path, side, side, seed=3, n_sections=3)
    slide = TiffSlide(path, threads=a.threads)
    plan = plan_slide(slide, [640], SlideOptions())
    chunks = [(g, c) for g in plan.grids[640] for c in g.chunks(max_pixels=CHUNK_PIXELS)]
    ft = slide.levels[0].tile_width
    assert all(c.level == 0 for _, c in chunks), "the bench slide is read at level 0"
    counts = np.array([_file_tiles(c, g.read_size, ft) for g, c in chunks])
    pool = None
    if a.processes:
        from trtwsi.read.processes import ReaderPool

        big = max(c.read_size[0] * c.read_size[1] * 3 for _, c in chunks)
        pool = ReaderPool(processes=a.processes, slots=1, slot_bytes=big, pin=False)
        pool.ready()

    def read(g, c, sparse: bool) -> np.ndarray:
        w, h = c.read_size
        only = c.windows(g.read_size) if sparse else None
        if pool is not None:
            return pool.read(0, slide, c.region[0], c.region[1], w, h, c.level, only=only)
        return slide.read_region(c.region[0], c.region[1], w, h, c.level, only=only)

    def one_pass(sparse: bool) -> float:
        t = time.perf_counter()
        for g, c in chunks:
            read(g, c, sparse)
        return time.perf_counter() - t

    # the same pixels in every tile window (checked once, outside the timing)
    for g, c in chunks:
        full = read(g, c, False).copy()
        part = read(g, c, True)
        for ox, oy, w, h in c.windows(g.read_size).tolist():
            if not np.array_equal(full[oy : oy + h, ox : ox + w], part[oy : oy + h, ox : ox + w]):
                raise SystemExit(f"tile window {(ox, oy, w, h)} of {c} differs")
    times = {"whole": [], "only": []}
    for _ in range(a.repeat):
        for k in times:
            times[k].append(one_pass(k == "only"))
    if pool is not None:
        pool.close()
    machine = host_info("slide reading")
    res = {
        "bench": "chunk reads of a whole slide: bounding box vs only the tiles (read_region only=)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "slide": {"path": str(path), "side": side, "file_tile": ft},
        "tiles": plan.n_tiles,
        "chunks": len(chunks),
        "tissue_gpx": round(sum(s["area"] for s in plan.sections) / 1e9, 4),
        "readers": f"{a.processes} processes" if a.processes else f"{a.threads} threads",
        "file_tiles_decoded": {"whole": int(counts[:, 0].sum()), "only": int(counts[:, 1].sum())},
        "seconds_best": {k: round(min(v), 3) for k, v in times.items()},
        "seconds_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "tile_pixels_equal": True,
    }
    res["speedup"] = round(res["seconds_best"]["whole"] / res["seconds_best"]["only"], 3)
    out = a.out or ROOT / "bench" / "results" / f"sparse-read-{machine_name(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("file_tiles_decoded", "seconds_best", "speedup")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
