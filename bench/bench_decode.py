"""JPEG decode alone, on the same tiles: nvJPEG on the GPU vs libjpeg-turbo on 1 and N cores.

    python bench/bench_decode.py                      # 16384² synthetic slide, cached
    python bench/bench_decode.py --side 8192 --procs 1,4 --out /tmp/decode.json

The tiles: every 256² JPEG tile (YCbCr 4:2:0, q90, tifffile) of the 4096² chunks that cover
the tissue sections of a synthetic slide (``trtwsi.synthetic.make_slide``, seed 3, 3 sections,
cached as ``bench-<side>.tif`` in ``$TRTWSI_BENCH_CACHE``, the same file ``bench_pipeline.py``
uses). The compressed bytes are read once, before any timing. Modes:

- ``cpu_1``: ``imagecodecs.jpeg8_decode`` of every tile in this process (one core).
- ``cpu_procs_N``: the tiles dealt over N spawned processes (tile k to process k mod N), each
  decoding its share; all start together at a set time (after reading their bytes) and the
  wall runs to the last one's end.
- ``gpu_decode_jpeg``: ``torchvision.io.decode_jpeg(list, device="cuda")`` of one chunk's tiles
  per call (what the pipeline's lane does), synchronised after each call: nvJPEG alone.
- ``gpu_region``: :class:`~trtwsi.read.jpeg_batch.JpegBatchDecoder` per chunk, with the tile
  layout into an HWC region (what the lane hands the pipeline), synchronised per chunk.
- ``gpu_region_2threads``: the same from 2 threads at once (the lane's threads).

Also the pixel difference of nvJPEG against libjpeg-turbo over every decoded chunk (max, mean,
99.9th percentile, share of values off by more than 2). Writes
``bench/results/decode-<gpu or cpu>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _machine import host_info  # noqa: E402

CHUNK = 4096


def _slide(side: int) -> Path:
    from trtwsi.synthetic import make_slide

    cache = Path(os.environ.get("TRTWSI_BENCH_CACHE", Path.home() / ".cache/trtwsi/bench"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"bench-{side}.tif"
    if not path.exists():
        t = time.perf_counter()
        make_slide(path, side, side, seed=3, n_sections=3)
        print(f"generated {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def _chunks(slide) -> list[tuple[int, int, int, int]]:
    """4096² level-0 windows covering the tissue sections (as the pipeline reads them)."""
    from trtwsi.plan.tissue import find_sections

    out = []
    for s in find_sections(slide):
        x, y, w, h = s.bbox
        for cy in range(y, y + h, CHUNK):
            for cx in range(x, x + w, CHUNK):
                out.append((cx, cy, min(CHUNK, x + w - cx), min(CHUNK, y + h - cy)))
    return out


def _cpu_worker(args):
    """Tiles ``k::n`` of the chunks' tiles: read (untimed), then decoded (timed)."""
    path, chunks, k, n, start = args
    import imagecodecs

    from trtwsi.slide import open_slide

    with open_slide(path, threads=1) as s:
        streams = [b for c in chunks for b in s.compressed_region(*c).streams if b][k::n]
    time.sleep(max(0.0, start - time.time()))  # all processes start decoding together
    t0 = time.time()
    for b in streams:
        imagecodecs.jpeg8_decode(b)
    return t0, time.time(), len(streams)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=16384)
    ap.add_argument("--procs", default=f"1,{os.cpu_count()}")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import imagecodecs

    from trtwsi.slide import open_slide

    path = _slide(a.side)
    slide = open_slide(path, threads=1)
    chunks = _chunks(slide)
    regions = [slide.compressed_region(*c) for c in chunks]
    streams = [b for r in regions for b in r.streams if b]
    th, tw = regions[0].tile
    px = len(streams) * th * tw
    rec: dict = {
        "bench": "bench/bench_decode.py",
        "date": time.strftime("%Y-%m-%d"),
        "host": host_info("CPU decode"),
        "slide": {"path": path.name, "side": a.side, "chunks": len(chunks)},
        "tiles": len(streams),
        "tile": [th, tw],
        "megapixels": round(px / 1e6, 1),
        "compressed_mib": round(sum(map(len, streams)) / 2**20, 1),
        "modes": {},
    }
    modes = rec["modes"]

    def put(name, secs, **kw):
        modes[name] = {"seconds": round(secs, 4), "gpx_per_s": round(px / secs / 1e9, 3), **kw}
        print(name, modes[name], flush=True)

    t = time.perf_counter()
    for b in streams:
        imagecodecs.jpeg8_decode(b)
    put("cpu_1", time.perf_counter() - t)
    for n in [int(v) for v in a.procs.split(",") if int(v) > 1]:
        with mp.get_context("spawn").Pool(n) as pool:
            pool.map(_cpu_worker, [(str(path), chunks[:1], 0, 1, 0.0)] * n)  # start and import
            start = time.time() + 3.0
            parts = [(str(path), chunks, i, n, start) for i in range(n)]
            res = pool.map(_cpu_worker, parts, chunksize=1)
        put(f"cpu_procs_{n}", max(r[1] for r in res) - start)

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        from torchvision.io import ImageReadMode, decode_jpeg

        from trtwsi.read.jpeg_batch import JpegBatchDecoder
        from trtwsi.runtime.gpu.device import device_info

        rec["gpu"] = {**device_info(0).as_dict(), "torch": torch.__version__}
        import torchvision

        rec["gpu"]["torchvision"] = torchvision.__version__
        dev = torch.device("cuda")
        lists = [
            [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in r.streams if b]
            for r in regions
        ]
        decode_jpeg(lists[0], mode=ImageReadMode.RGB, device=dev)  # nvJPEG start-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for li in lists:
            decode_jpeg(li, mode=ImageReadMode.RGB, device=dev)
            torch.cuda.synchronize()
        put("gpu_decode_jpeg", time.perf_counter() - t, tiles_per_call=len(lists[0]))

        dec = JpegBatchDecoder(dev)
        dec.decode(regions[0])
        torch.cuda.synchronize()
        t = time.perf_counter()
        for r in regions:
            dec.decode(r)
            torch.cuda.synchronize()
        put("gpu_region", time.perf_counter() - t)

        stream = torch.cuda.Stream()

        def one(r):
            with torch.cuda.stream(stream):
                dec.decode(r)
            stream.synchronize()

        t = time.perf_counter()
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(one, regions))
        put("gpu_region_2threads", time.perf_counter() - t)

        diffs = []
        for r, c in zip(regions, chunks, strict=True):
            g = dec.decode(r).to_numpy()
            ref = slide.read_region(*c)
            diffs.append(np.abs(g.astype(np.int16) - ref.astype(np.int16)).ravel())
        d = np.concatenate(diffs)
        rec["pixels_vs_libjpeg_turbo"] = {
            "max": int(d.max()),
            "mean": round(float(d.mean()), 4),
            "p99_9": float(np.percentile(d, 99.9)),
            "share_over_2": round(float((d > 2).mean()), 5),
        }
        print(rec["pixels_vs_libjpeg_turbo"], flush=True)
        name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    else:
        name = "cpu"
    out = Path(a.out or ROOT / "bench" / "results" / f"decode-{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
