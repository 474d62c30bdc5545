"""Tissue detection: OpenCV on the CPU vs CuPy on the GPU (``find_sections(backend=...)``).

    python bench/bench_tissue.py [--slide S.tif | --gigapixels 1] [--out J.json] [--repeat 7]
    python -m pytest bench/bench_tissue.py          # pytest-benchmark entry point

For a synthetic JPEG pyramidal TIFF (generated and cached when no ``--slide`` is given), it times
``slide.thumbnail(2048)`` (host decode, the same for both), ``find_sections`` end to end per
backend and ``detection_only_s`` (given the decoded thumbnail), best of ``--repeat`` after one
warm-up, and checks that both give the same sections. ``steps_median_ms``: per backend, each
step of ``find_sections(steps=...)`` (the device synchronized after each; the host's section
assembly as ``sections``), median of ``--repeat`` runs.
Writes ``bench/results/tissue-<machine>.json``: host CPU, GPU name when one is used, times.
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
sys.path.insert(0, str(ROOT / "bench"))

from _machine import host_info, machine_name, update_results  # noqa: E402


def _best(f, repeat: int) -> float:
    f()  # warm-up (CuPy compiles its kernels on first use)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def _slide_path(gigapixels: float) -> Path:
    from trtwsi.synthetic import make_slide

    side = int(round((gigapixels * 1e9) ** 0.5 / 256) * 256)
    cache = Path(os.environ.get("TRTWSI_BENCH_CACHE", Path.home() / ".cache" / "trtwsi" / "bench"))
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"bench-{side}.tif"
    if not path.exists():
        make_slide(path, side, side, seed=3, n_sections=3)
    return path


def measure(path: Path, repeat: int = 7) -> dict:
    from trtwsi.plan.tissue import find_sections
    from trtwsi.slide import open_slide

    slide = open_slide(path)
    backends = ["cv2"]
    gpu = None
    try:
        from trtwsi.runtime.gpu.tissue import gpu_tissue_available

        if gpu_tissue_available():
            import cupy

            cupy.cuda.runtime.getDeviceCount()
            backends.append("cupy")
            gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        pass
    out: dict = {
        "slide": str(path.name),
        "slide_px": [slide.width, slide.height],
        "thumbnail_s": round(_best(lambda: slide.thumbnail(2048), repeat), 4),
        "find_sections_s": {},
    }
    found = {}
    thumb = slide.thumbnail(2048)
    out["detection_only_s"] = {}  # given the decoded thumbnail: what runs on the GPU vs OpenCV
    for b in backends:
        out["find_sections_s"][b] = round(
            _best(lambda b=b: find_sections(slide, backend=b), repeat), 4
        )
        out["detection_only_s"][b] = round(
            _best(lambda b=b: find_sections(slide, backend=b, thumbnail=thumb), repeat), 4
        )
        found[b] = find_sections(slide, backend=b)
        profiles = []
        for _ in range(repeat):  # each step synced: a profile, slower in sum than a plain call
            steps: dict = {}
            find_sections(slide, backend=b, thumbnail=thumb, steps=steps)
            profiles.append(steps)
        out.setdefault("steps_median_ms", {})[b] = {
            k: round(float(np.median([p.get(k, 0.0) for p in profiles])) * 1e3, 2)
            for k in profiles[0]
        }
    if "cupy" in found:
        a, g = found["cv2"], found["cupy"]
        out["same_sections"] = len(a) == len(g) and all(
            x.bbox == y.bbox for x, y in zip(a, g, strict=True)
        )
        out["mask_iou_min"] = min(
            (
                float(np.logical_and(x.mask, y.mask).sum() / np.logical_or(x.mask, y.mask).sum())
                for x, y in zip(a, g, strict=False)
                if x.mask.shape == y.mask.shape
            ),
            default=None,
        )
        out["speedup"] = round(out["find_sections_s"]["cv2"] / out["find_sections_s"]["cupy"], 2)
    out["gpu"] = gpu
    out["sections"] = len(found["cv2"])
    slide.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, help="a slide file (default: a synthetic one)")
    ap.add_argument("--gigapixels", type=float, default=1.0, help="size of the synthetic slide")
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per backend (best kept)")
    ap.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/tissue-<machine>.json)"
    )
    a = ap.parse_args(argv)
    path = a.slide or _slide_path(a.gigapixels)
    res = measure(path, a.repeat)
    info = host_info("thumbnail decode and section assembly")
    if res["gpu"]:
        info["device"] = f"GPU: {res['gpu']} (+ host {info['cpu']}, {info['cores']} cores)"
    name = machine_name(info) + ("-" + res["gpu"].lower().replace(" ", "-") if res["gpu"] else "")
    out = a.out or ROOT / "bench" / "results" / f"tissue-{name}.json"
    update_results(out, {f"slide-{path.stem}": res}, info)
    print(json.dumps(res, indent=1))
    print(f"wrote {out}")


def test_find_sections(benchmark):
    from trtwsi.plan.tissue import find_sections
    from trtwsi.slide import open_slide

    slide = open_slide(_slide_path(float(os.environ.get("TRTWSI_BENCH_GIGAPIXELS", "0.25"))))
    benchmark(find_sections, slide)


if __name__ == "__main__":
    main()
