"""Read throughput (megapixels/s) of level-0 regions: trtwsi vs OpenSlide vs tifffile's zarr path.

Not part of the default test run (``testpaths = ["tests"]``). Two ways to run it::

    python bench/bench_read.py --gigapixels 1 --out bench/results/read-<machine>.json
    python -m pytest bench/bench_read.py --benchmark-json=read-pytest.json

The slide: a synthetic Aperio-SVS-like pyramidal TIFF (:func:`trtwsi.synthetic.make_slide`,
``flavor="svs"``: 256-px JPEG tiles, Q=90, YCbCr 4:2:0, tissue sections on white glass), at least
``--gigapixels`` level-0 pixels (square). It is generated once and cached at ``--slide`` /
``$TRTWSI_BENCH_SLIDE`` (default ``$XDG_CACHE_HOME/trtwsi/bench/synthetic-<side>.svs``); SVS
so that all three readers see the same level 0 (OpenSlide ignores SubIFD pyramids).

What is timed: ``--count`` regions of ``--region``² level-0 pixels at random positions (same
seed, same regions for every reader), each read fully into an RGB(A) uint8 array, after one
warm-up region per worker (the file is in the page cache: this measures decode + copy, not the
disk). Per reader and thread count N:

- ``concurrent``: N worker threads each read whole regions, N regions in flight; each reader
  is single-threaded per call (trtwsi ``threads=1``; OpenSlide's ``read_region`` and a zarr
  ``__getitem__`` are anyway). This is the fair comparison: every reader gets the same N threads.
- ``tile-parallel`` (trtwsi only): regions one after another, each ``read_region`` decoding its
  file tiles in the slide's own pool of N threads (what the tile pipeline does per chunk).

OpenSlide returns RGBA (PIL → numpy, no further conversion); trtwsi writes RGB into a
preallocated ``out=`` buffer per worker (its API for pinned buffers); zarr returns a new RGB
array. Before timing, the first region is checked to be pixel-identical across the readers.
``hardware_baseline`` is ``imagecodecs.jpeg8_decode`` of one slide tile in N threads: the ceiling
this machine allows, to read the scaling of the others against.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _machine import host_info, machine_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ENV_SLIDE = "TRTWSI_BENCH_SLIDE"
ENV_GIGAPIXELS = "TRTWSI_BENCH_GIGAPIXELS"
TILE = 256

try:  # the pytest-benchmark entry points below need pytest; the script does not
    import pytest
except ImportError:  # pragma: no cover
    pytest = None


# ------------------------------------------------------------------------------------------
# slide
# ------------------------------------------------------------------------------------------
def slide_side(gigapixels: float) -> int:
    """Side (px, a multiple of the 256-px tile) of a square slide of >= ``gigapixels`` Gpx."""
    return math.ceil(math.sqrt(gigapixels * 1e9) / TILE) * TILE


def default_slide_path(gigapixels: float) -> Path:
    env = os.environ.get(ENV_SLIDE)
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "trtwsi" / "bench" / f"synthetic-{slide_side(gigapixels)}.svs"


def ensure_slide(path: Path, gigapixels: float, seed: int = 0) -> Path:
    """Generate the benchmark slide at ``path`` unless it exists (written under a temporary
    name and renamed, so an interrupted run never leaves a half-written slide)."""
    path = Path(path)
    if path.exists():
        return path
    from trtwsi.synthetic import make_slide

    side = slide_side(gigapixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    t0 = time.perf_counter()
    print(f"generating {side}x{side} synthetic slide -> {path} ...", flush=True)
    make_slide(tmp, side, side, seed=seed, flavor="svs", mpp=0.5, tile=TILE, quality=90)
    os.replace(tmp, path)
    gt = tmp.with_name(tmp.stem + ".gt.json")
    if gt.exists():
        os.replace(gt, path.with_name(path.stem + ".gt.json"))
    print(f"  done in {time.perf_counter() - t0:.0f} s ({path.stat().st_size / 2**20:.0f} MiB)")
    return path


def random_regions(width: int, height: int, size: int, count: int, seed: int = 0) -> list:
    """``count`` top-left corners (x, y) of ``size``² regions inside the slide."""
    rng = np.random.default_rng(seed)
    return [
        (int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1)))
        for _ in range(count)
    ]


# ------------------------------------------------------------------------------------------
# readers: each factory returns (read(x, y) -> array, close())
# ------------------------------------------------------------------------------------------
def make_trtwsi(path: Path, size: int, threads: int):
    from trtwsi.slide.tiff import TiffSlide

    slide = TiffSlide(path, threads=threads, on_error="raise")
    local = threading.local()

    def read(x, y):
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty((size, size, 3), np.uint8)
        return slide.read_region(x, y, size, size, out=buf)

    return read, slide.close


def make_openslide(path: Path, size: int, threads: int):
    import openslide

    osr = openslide.OpenSlide(str(path))

    def read(x, y):
        return np.asarray(osr.read_region((x, y), 0, (size, size)))  # RGBA

    return read, osr.close


def make_zarr(path: Path, size: int, threads: int):
    import tifffile
    import zarr

    tif = tifffile.TiffFile(path)
    store = tif.series[0].aszarr(level=0)
    z = zarr.open(store, mode="r")

    def read(x, y):
        return z[y : y + size, x : x + size]

    def close():
        store.close()
        tif.close()

    return read, close


_PROC: dict = {}


def _proc_init(path: str, size: int) -> None:
    from trtwsi.slide.tiff import TiffSlide

    _PROC["slide"] = TiffSlide(path, threads=1, on_error="raise")
    _PROC["buf"] = np.empty((size, size, 3), np.uint8)


def _proc_read(region) -> None:
    x, y = region
    buf = _PROC["buf"]
    _PROC["slide"].read_region(x, y, buf.shape[1], buf.shape[0], out=buf)


def run_processes(path: Path, regions, size: int, n: int, repeat: int) -> list[float]:
    """trtwsi in ``n`` worker processes (one TiffSlide each, threads=1); the pixels stay in the
    workers, so this is the ceiling of a multi-process reader, not a drop-in comparison."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        n, mp_context=ctx, initializer=_proc_init, initargs=(str(path), size)
    ) as ex:
        list(ex.map(_proc_read, regions[:n]))  # warm-up (and start every worker)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            list(ex.map(_proc_read, regions))
            times.append(time.perf_counter() - t0)
    return times


READERS = {
    # name: (factory, mode, reader threads given N workers)
    "trtwsi": (make_trtwsi, "concurrent"),
    "trtwsi-tile-parallel": (make_trtwsi, "tile-parallel"),
    "openslide": (make_openslide, "concurrent"),
    "tifffile-zarr": (make_zarr, "concurrent"),
}


def open_reader(name: str, path: Path, size: int, n: int):
    """(read, close, workers) for reader ``name`` at thread count ``n``."""
    factory, mode = READERS[name]
    if mode == "tile-parallel":
        read, close = factory(path, size, n)
        return read, close, 1
    read, close = factory(path, size, 1)
    return read, close, n


def run_regions(read, regions, workers: int) -> float:
    """Seconds to read all ``regions`` with ``workers`` threads (one region per call)."""
    t0 = time.perf_counter()
    if workers == 1:
        for x, y in regions:
            read(x, y)
    else:
        with ThreadPoolExecutor(workers) as ex:
            for _ in ex.map(lambda r: read(*r), regions):
                pass
    return time.perf_counter() - t0


def measure(name, path, regions, size, n, repeat=2) -> dict:
    if name == "trtwsi-processes":
        times = run_processes(path, regions, size, n, repeat)
    else:
        read, close, workers = open_reader(name, path, size, n)
        try:
            run_regions(read, regions[:workers], workers)  # warm-up: pool, caches, decoders
            times = [run_regions(read, regions, workers) for _ in range(repeat)]
        finally:
            close()
    mpx = len(regions) * size * size / 1e6
    best = min(times)
    return {
        "reader": name,
        "mode": READERS[name][1] if name in READERS else "processes",
        "threads": n,
        "regions": len(regions),
        "region": [size, size],
        "megapixels": mpx,
        "seconds": times,
        "mpx_per_s": mpx / best,
        "mpx_per_s_all": [mpx / t for t in times],
    }


def check_identical(path: Path, region, size: int) -> bool:
    """The readers decode the first region to the same RGB pixels (else the race is unfair)."""
    got = []
    for name in ("trtwsi", "openslide", "tifffile-zarr"):
        read, close, _ = open_reader(name, path, size, 1)
        try:
            got.append(np.array(read(*region))[..., :3])
        finally:
            close()
    return all(np.array_equal(got[0], g) for g in got[1:])


def hardware_baseline(path: Path, threads: list[int], seconds: float = 3.0) -> list[dict]:
    """imagecodecs.jpeg8_decode of one (tissue) tile of the slide, in N threads: MPx/s (best of
    3 passes). One GIL hand-off per tile: what N threads can decode at most."""
    import imagecodecs
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].pages[0]
        counts = np.asarray(page.databytecounts)
        index = int(np.argsort(counts)[len(counts) * 3 // 4])  # a tissue tile, not glass
        offset = page.dataoffsets[index]
        tables = page.jpegtables
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(int(counts[index]))
    px = imagecodecs.jpeg8_decode(data, tables=tables).shape
    out = []
    for n in threads:
        best = 0.0
        with ThreadPoolExecutor(n) as ex:
            for _ in range(3):  # best of 3 passes of `seconds / 3`
                stop = time.perf_counter() + seconds / 3
                done = [0] * n

                def work(i, stop=stop, done=done):
                    while time.perf_counter() < stop:
                        imagecodecs.jpeg8_decode(data, tables=tables)
                        done[i] += 1

                t0 = time.perf_counter()
                list(ex.map(work, range(n)))
                best = max(best, sum(done) * px[0] * px[1] / 1e6 / (time.perf_counter() - t0))
        out.append({"threads": n, "mpx_per_s": best})
    return out


# ------------------------------------------------------------------------------------------
# machine + JSON
# ------------------------------------------------------------------------------------------
def machine_info() -> dict:
    info = host_info("slide reading")
    info["versions"] = library_versions()
    return info


def library_versions() -> dict:
    import imagecodecs
    import tifffile

    import trtwsi

    v = {
        "trtwsi": trtwsi.__version__,
        "numpy": np.__version__,
        "tifffile": tifffile.__version__,
        "imagecodecs": imagecodecs.__version__,
    }
    try:
        import zarr

        v["zarr"] = zarr.__version__
    except ImportError:
        pass
    try:
        import openslide

        v["openslide-python"] = openslide.__version__
        v["openslide"] = openslide.__library_version__
    except (ImportError, OSError):
        pass
    return v


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews thread scaling."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def slide_info(path: Path, regions, size) -> dict:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].pages[0]
        w, h = page.imagewidth, page.imagelength
        tw, th = page.tilewidth, page.tilelength
        counts = np.asarray(page.databytecounts)
        across = math.ceil(w / tw)
        touched = {
            (r, c)
            for x, y in regions
            for r in range(y // th, (y + size - 1) // th + 1)
            for c in range(x // tw, (x + size - 1) // tw + 1)
        }
        nbytes = sum(int(counts[r * across + c]) for r, c in touched)
        return {
            "path": str(path),
            "generator": "trtwsi.synthetic.make_slide(flavor='svs', mpp=0.5, tile=256, quality=90)",
            "width": w,
            "height": h,
            "gigapixels": w * h / 1e9,
            "file_mib": path.stat().st_size / 2**20,
            "tile": [tw, th],
            "compression": "JPEG Q=90, YCbCr 4:2:0",
            "levels": len(tif.series[0].levels),
            "region_bits_per_pixel": 8 * nbytes / (len(touched) * tw * th),
        }


# ------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ------------------------------------------------------------------------------------------
if pytest is not None:
    _GP = float(os.environ.get(ENV_GIGAPIXELS, "1"))
    _N = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    @pytest.fixture(scope="module")
    def bench_slide():
        return ensure_slide(default_slide_path(_GP), _GP)

    @pytest.mark.parametrize("threads", sorted({1, _N}))
    @pytest.mark.parametrize("reader", list(READERS))
    def test_read_throughput(benchmark, bench_slide, reader, threads):
        """One round = 8 random 4096² level-0 regions; extra_info carries MPx/s."""
        size = 4096
        side = slide_side(_GP)
        regions = random_regions(side, side, size, 8, seed=0)
        read, close, workers = open_reader(reader, bench_slide, size, threads)
        try:
            run_regions(read, regions[:workers], workers)
            benchmark.pedantic(run_regions, args=(read, regions, workers), rounds=2, iterations=1)
        finally:
            close()
        mpx = len(regions) * size * size / 1e6
        benchmark.extra_info.update(
            {
                "mpx_per_s": mpx / benchmark.stats["min"],
                "mode": READERS[reader][1],
                "threads": threads,
            }
        )


# ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gigapixels", type=float, default=1.0, help="slide size (default 1 Gpx)")
    ap.add_argument("--slide", type=Path, default=None, help=f"slide path (or ${ENV_SLIDE})")
    ap.add_argument("--region", type=int, default=4096, help="region side, level-0 px")
    ap.add_argument("--count", type=int, default=16, help="regions per measurement")
    ap.add_argument("--threads", type=str, default=None, help="comma list (default: 1,<cores>)")
    ap.add_argument(
        "--readers",
        type=str,
        default=",".join([*READERS, "trtwsi-processes"]),
        help="comma list of: " + ", ".join([*READERS, "trtwsi-processes"]),
    )
    ap.add_argument("--repeat", type=int, default=2, help="timed passes (best reported)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON (default bench/results/read-<machine>.json)"
    )
    args = ap.parse_args(argv)

    info = machine_info()
    print(f"machine: {info['device']}")
    threads = (
        [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, info["cores"]})
    )
    path = ensure_slide(args.slide or default_slide_path(args.gigapixels), args.gigapixels)
    import tifffile

    with tifffile.TiffFile(path) as tif:
        p0 = tif.series[0].levels[0].pages[0]
        width, height = p0.imagewidth, p0.imagelength
    regions = random_regions(width, height, args.region, args.count, seed=0)
    load_before = load_average()
    identical = check_identical(path, regions[0], args.region)
    print(f"first region identical across readers: {identical}")
    baseline = hardware_baseline(path, threads)
    for b in baseline:
        print(
            f"hardware baseline (imagecodecs decode of one tile): {b['threads']} threads "
            f"{b['mpx_per_s']:.0f} MPx/s"
        )
    results = []
    for n in threads:
        for name in args.readers.split(","):
            r = measure(name, path, regions, args.region, n, repeat=args.repeat)
            results.append(r)
            print(
                f"{name:22} threads={n:<3} {r['mpx_per_s']:8.1f} MPx/s  "
                f"({', '.join(f'{t:.2f}' for t in r['seconds'])} s for {r['megapixels']:.0f} MPx)"
            )
    data = {
        "benchmark": "level-0 region read throughput",
        "machine": info,
        "slide": slide_info(path, regions, args.region),
        "method": {
            "regions": f"{args.count} random {args.region}x{args.region} level-0 regions (seed 0), "
            "the same for every reader, each read fully; best of "
            f"{args.repeat} timed passes after a warm-up region per worker; file in page cache",
            "concurrent": "N worker threads, N regions in flight, each reader single-threaded per "
            "call (trtwsi threads=1, OpenSlide read_region, zarr __getitem__): the fair comparison",
            "tile-parallel": "trtwsi only: one region at a time, its file tiles decoded by the "
            "slide's pool of N threads",
            "processes": "trtwsi-processes: N worker processes, one TiffSlide(threads=1) each; "
            "pixels stay in the workers (the ceiling of a multi-process reader, no GIL)",
            "outputs": "trtwsi: RGB into a reused out= buffer; OpenSlide: RGBA numpy array from "
            "PIL; tifffile-zarr: new RGB array",
            "pixels_identical_first_region": identical,
        },
        "load_average": {"before": load_before, "after": load_average()},
        "hardware_baseline": baseline,
        "results": results,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = args.out or RESULTS_DIR / f"read-{machine_name(info)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
