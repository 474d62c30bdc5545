"""CPU comparison on the same cores: trtwsi vs ultralytics ``YOLO.predict`` vs SAHI sliced prediction.

Not part of the default test run (``testpaths = ["tests"]``; ``tests/bench/test_bench_cpu.py``
runs the smoke mode). Usage::

    python bench/bench_cpu.py                      # full sweep, writes bench/results/cpu-<machine>.json
    python bench/bench_cpu.py --smoke              # tiny slide, 1 thread, batch 2: a few seconds per case
    python bench/bench_cpu.py --modes trtwsi-grid,ultralytics --threads 2 --batches 4,8

Modes (every one on the same synthetic JPEG pyramidal TIFF, same model ``trtwsi/models/demo-yolo11n.pt``,
conf 0.25 / NMS IoU 0.45 / max_det 300, 640-px tiles with 0.2 overlap = 512-px stride):

- ``trtwsi-slide``: ``Predictor(slide).run()``: tissue sections found, glass tiles skipped,
  per-section grids. The real use; its tile count is smaller than the others'.
- ``trtwsi-grid``: ``Predictor(slide).run(region=whole slide)`` with ``backend="torch"``: the
  full grid, no skipping: the same tiles as the two baselines, so per-tile cost compares
  directly. (``trtwsi-slide`` uses ``backend="auto"``: OpenVINO where it is installed.)
- ``trtwsi-grid-ort``: the same with ``Model(backend="onnxruntime")`` (the model's graph in ONNX
  Runtime instead of PyTorch; ``pip install 'trtwsi[onnxruntime]'``).
- ``trtwsi-grid-ov``: the same with ``Model(backend="openvino")`` (the graph compiled by
  OpenVINO for the CPU; ``pip install 'trtwsi[openvino]'``).
- ``ultralytics``: read level 0 (trtwsi's TIFF reader), cut the same tiles,
  ``YOLO.predict`` on chunks of ``batch`` tiles (a list is one forward pass, whatever its
  length), shift boxes to slide px, merge across seams
  with ``trtwsi.merge.merge_detections`` (trtwsi's default: NMS, IoS 0.5, tile-aware). The
  reference of the agreement column.
- ``sahi``: read level 0, ``sahi.predict.get_sliced_prediction`` (ultralytics model underneath,
  640 slices, overlap 0.2, ``perform_standard_pred=False``, postprocess NMS / IoS 0.5 /
  class-aware, the closest to trtwsi's merge; SAHI has no notion of tiles in its merge).

Swept: torch threads (``--threads``, default 1,2) × batch (``--batches``, default 1,2,4,8; trtwsi
modes only, the baselines use ``--baseline-batch``, default 1, ultralytics' and SAHI's default).
Every case runs in its own child process, pinned to the first ``threads`` cores of this process's
affinity (``--no-pin`` to leave it), with ``OMP_NUM_THREADS`` = threads and
``torch.set_num_threads(threads)`` re-applied after the warm-up (ultralytics' ``select_device``
resets it to ``min(8, os.cpu_count() - 1)``). The child loads the model, warms up on one tile
(not timed), then times one pass from the slide file to merged detections.

Recorded per case: ``wall_s``; ``cpu_s`` (user + system of the child during the timed pass, all
threads), ``cpu_s_per_tile``, ``tiles_per_s``; ``peak_rss_mib`` (``ru_maxrss`` of that child,
from ``os.wait4``: model, image and everything since start); ``startup_s`` (imports + model +
warm-up); ``detections``; ``agreement`` with the ultralytics reference: boxes paired greedily
(same class, IoU >= 0.9), ``of_reference`` = paired / reference boxes, ``of_own`` = paired / own
boxes, ``agreement`` = the smaller of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
from _machine import host_info, machine_name  # noqa: E402

MODEL = ROOT / "trtwsi" / "models" / "demo-yolo11n.pt"
CONF, IOU, MAX_DET, TILE, OVERLAP = 0.25, 0.45, 300, 640, 0.2
MODES = ("trtwsi-slide", "trtwsi-grid", "trtwsi-grid-ort", "trtwsi-grid-ov", "ultralytics", "sahi")
TRTWSI_MODES = ("trtwsi-slide", "trtwsi-grid", "trtwsi-grid-ort", "trtwsi-grid-ov")
#: backend of each trtwsi mode that names one
MODE_BACKEND = {
    "trtwsi-grid": "torch",
    "trtwsi-grid-ort": "onnxruntime",
    "trtwsi-grid-ov": "openvino",
}
MATCH_IOU = 0.9
FULL_SIZE = (6144, 4608)  # 12 x 9 = 108 tiles of the full grid
SMOKE_SIZE = (1280, 1024)  # 3 x 2 = 6 tiles


# --- child: one case ------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _grid_tiles(slide) -> list[tuple[int, int, int, int]]:
    from trtwsi.plan.grid import TileGrid

    return [tuple(t) for t in TileGrid(slide, None, TILE, OVERLAP, min_tissue=None).tiles.tolist()]


def _run_trtwsi(mode: str, slide_path: str, threads: int, batch: int) -> dict:
    import trtwsi

    backend = MODE_BACKEND.get(mode, "auto")
    p = trtwsi.Predictor(
        slide_path,
        [trtwsi.Model(MODEL, min_conf=CONF, iou=IOU, max_det=MAX_DET, backend=backend)],
        device="cpu",
        batch=batch,
        threads=threads,
        overlap=OVERLAP,
    )
    p.run(region=(0, 0, TILE, TILE))  # warm-up: engine build, first forward
    w, h = p.slide.dimensions
    region = (0, 0, w, h) if mode.startswith("trtwsi-grid") else None
    c0, t0 = _cpu_seconds(), time.perf_counter()
    res = p.run(region=region)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    d = res.detections
    import numpy as np

    boxes = np.stack([d.x1, d.y1, d.x2, d.y2], 1) if len(d) else np.zeros((0, 4))
    p.close()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tiles": int(res.n_tiles),
        "timings": res.timings,
        "_boxes": boxes,
        "_scores": np.asarray(d.score, np.float64),
        "_classes": np.asarray(d.class_id, np.int64),
    }


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_ultralytics(slide_path: str, threads: int, batch: int) -> dict:
    import numpy as np
    from ultralytics import YOLO

    from trtwsi.merge import merge_detections
    from trtwsi.slide import open_slide

    yolo = YOLO(str(MODEL))
    # A list source is one forward pass over all of it (LoadPilAndNumpy: bs = len(list);
    # ``batch=`` is ignored), so the tiles go in chunks of ``batch``.
    kw = dict(imgsz=TILE, conf=CONF, iou=IOU, max_det=MAX_DET, device="cpu", verbose=False)
    slide = open_slide(slide_path)
    tiles = _grid_tiles(slide)
    warm = slide.read_region(0, 0, TILE, TILE)[..., ::-1]
    yolo.predict([np.ascontiguousarray(warm)] * batch, **kw)  # warm-up (sets up the predictor)
    _set_threads(threads)  # select_device() reset it
    c0, t0 = _cpu_seconds(), time.perf_counter()
    img = slide.read_region(0, 0, slide.width, slide.height)
    t_read = time.perf_counter() - t0
    crops = [np.ascontiguousarray(img[y : y + th, x : x + tw, ::-1]) for x, y, tw, th in tiles]
    rows, tile_ids = [], []
    for start in range(0, len(crops), batch):
        for i, r in enumerate(yolo.predict(crops[start : start + batch], **kw), start):
            data = r.boxes.data.cpu().numpy().astype(np.float64)
            if len(data):
                x, y = tiles[i][:2]
                data[:, [0, 2]] += x
                data[:, [1, 3]] += y
                rows.append(data)
                tile_ids.append(np.full(len(data), i, np.int64))
    t_pred = time.perf_counter() - t0 - t_read
    d = np.concatenate(rows) if rows else np.zeros((0, 6))
    tid = np.concatenate(tile_ids) if tile_ids else np.zeros(0, np.int64)
    m = merge_detections(d[:, :4], d[:, 4], d[:, 5].astype(np.int64), tiles=tid)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tiles": len(tiles),
        "timings": {"read": t_read, "predict": t_pred, "merge": wall - t_read - t_pred},
        "tile_detections": len(d),
        "_boxes": m.boxes,
        "_scores": np.asarray(m.scores, np.float64),
        "_classes": np.asarray(m.classes, np.int64),
    }


def _run_sahi(slide_path: str, threads: int, batch: int) -> dict:
    import numpy as np
    from sahi import AutoDetectionModel
    from sahi.predict import get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    from trtwsi.slide import open_slide

    dm = AutoDetectionModel.from_pretrained(
        model_type="ultralytics",
        model_path=str(MODEL),
        confidence_threshold=CONF,
        device="cpu",
        image_size=TILE,
    )
    dm.model.overrides.update(iou=IOU, max_det=MAX_DET)  # SAHI passes only conf and imgsz
    slide = open_slide(slide_path)
    ours = sorted((x, y) for x, y, _, _ in _grid_tiles(slide))
    theirs = get_slice_bboxes(slide.height, slide.width, TILE, TILE, False, OVERLAP, OVERLAP)
    if sorted((b[0], b[1]) for b in theirs) != ours:
        raise RuntimeError("SAHI's slices differ from trtwsi's tile grid")
    dm.perform_batch_inference([slide.read_region(0, 0, TILE, TILE)] * batch)  # warm-up
    _set_threads(threads)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    img = slide.read_region(0, 0, slide.width, slide.height)
    t_read = time.perf_counter() - t0
    res = get_sliced_prediction(
        img,
        dm,
        slice_height=TILE,
        slice_width=TILE,
        overlap_height_ratio=OVERLAP,
        overlap_width_ratio=OVERLAP,
        perform_standard_pred=False,
        postprocess_type="NMS",
        postprocess_match_metric="IOS",
        postprocess_match_threshold=0.5,
        postprocess_class_agnostic=False,
        verbose=0,
        batch_size=batch,
        force_postprocess_type=True,
    )
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    preds = res.object_prediction_list
    boxes = np.array([p.bbox.to_xyxy() for p in preds], np.float64).reshape(-1, 4)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "tiles": len(theirs),
        "timings": {"read": t_read, **{k: float(v) for k, v in res.durations_in_seconds.items()}},
        "_boxes": boxes,
        "_scores": np.array([p.score.value for p in preds], np.float64),
        "_classes": np.array([p.category.id for p in preds], np.int64),
    }


def child(mode: str, slide_path: str, threads: int, batch: int, out: str) -> None:
    """One case, in this (fresh) process: writes ``out`` (JSON) and ``out``.npz (detections)."""
    import numpy as np

    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    if mode in TRTWSI_MODES:
        rec = _run_trtwsi(mode, slide_path, threads, batch)
    elif mode == "ultralytics":
        rec = _run_ultralytics(slide_path, threads, batch)
    elif mode == "sahi":
        rec = _run_sahi(slide_path, threads, batch)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    np.savez(
        out + ".npz",
        boxes=rec.pop("_boxes"),
        scores=rec.pop("_scores"),
        classes=rec.pop("_classes"),
    )
    rec["torch_threads"] = torch.get_num_threads()
    rec["startup_s"] = time.perf_counter() - t_start - rec["wall_s"]
    Path(out).write_text(json.dumps(rec))


# --- agreement ------------------------------------------------------------------------------------
def match(a_boxes, a_cls, b_boxes, b_cls, min_iou: float = MATCH_IOU) -> int:
    """Pairs of boxes, one from ``a`` and one from ``b``, same class and IoU >= ``min_iou``,
    chosen greedily by descending IoU, each box in at most one pair. Returns the pair count."""
    import numpy as np

    from trtwsi.merge import overlapping_pairs, pair_overlap

    na = len(a_boxes)
    if na == 0 or len(b_boxes) == 0:
        return 0
    boxes = np.concatenate([a_boxes, b_boxes]).astype(np.float64)
    cls = np.concatenate([a_cls, b_cls]).astype(np.int64)
    i, j = overlapping_pairs(boxes, metric="iou", threshold=min_iou - 1e-9, buckets=cls)
    cross = (i < na) & (j >= na)  # i < j always
    i, j = i[cross], j[cross]
    if not len(i):
        return 0
    iou = pair_overlap(boxes[i], boxes[j], "iou")
    used_a, used_b, n = set(), set(), 0
    for k in np.argsort(-iou, kind="stable"):
        if i[k] not in used_a and j[k] not in used_b:
            used_a.add(i[k])
            used_b.add(j[k])
            n += 1
    return n


def agreement(own: dict, ref: dict) -> dict:
    n = match(own["boxes"], own["classes"], ref["boxes"], ref["classes"])
    n_own, n_ref = len(own["boxes"]), len(ref["boxes"])
    of_ref = n / n_ref if n_ref else float(n_own == 0)
    of_own = n / n_own if n_own else float(n_ref == 0)
    return {
        "matched": n,
        "own": n_own,
        "reference": n_ref,
        "of_reference": round(of_ref, 4),
        "of_own": round(of_own, 4),
        "agreement": round(min(of_ref, of_own), 4),
    }


# --- parent ---------------------------------------------------------------------------------------
def bench_slide(size: tuple[int, int], path: str | None) -> Path:
    """The benchmark slide (generated once, cached)."""
    from trtwsi.synthetic import make_slide

    if path:
        p = Path(path)
    else:
        cache = Path(
            os.environ.get("TRTWSI_BENCH_CACHE", Path.home() / ".cache" / "trtwsi" / "bench")
        )
        p = cache / f"cpu-{size[0]}x{size[1]}.tif"
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make_slide(p, size[0], size[1], seed=11, n_sections=3)
        print(f"generated {p} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return p


def run_case(mode, slide, threads, batch, cores, tmp: Path, timeout: float) -> dict:
    """Run one case in a child process; returns its record (with ``peak_rss_mib``) and the
    detections (key ``_dets``)."""
    import numpy as np

    out = str(tmp / f"{mode}-t{threads}-b{batch}.json")
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
        YOLO_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    cmd = [sys.executable, __file__, "--child", mode, str(slide), str(threads), str(batch), out]
    pin = cores[:threads] if cores else None
    with open(out + ".log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, pin)) if pin else None,
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        total = time.perf_counter() - t0
    rec = {"mode": mode, "threads": threads, "batch": batch, "cores": list(pin) if pin else None}
    if proc.returncode or not Path(out).exists():
        rec["error"] = Path(out + ".log").read_text()[-3000:]
        return rec
    rec.update(json.loads(Path(out).read_text()))
    npz = np.load(out + ".npz")
    rec["_dets"] = {k: npz[k] for k in ("boxes", "scores", "classes")}
    rec["tiles_per_s"] = round(rec["tiles"] / rec["wall_s"], 3)
    rec["cpu_s_per_tile"] = round(rec["cpu_s"] / rec["tiles"], 4)
    rec["wall_s"] = round(rec["wall_s"], 3)
    rec["cpu_s"] = round(rec["cpu_s"], 3)
    rec["startup_s"] = round(rec["startup_s"], 3)
    rec["detections"] = len(rec["_dets"]["boxes"])
    rec["peak_rss_mib"] = round(ru.ru_maxrss / 1024, 1)  # KiB on Linux
    rec["process_s"] = round(total, 3)
    rec["process_cpu_s"] = round(ru.ru_utime + ru.ru_stime, 3)
    if isinstance(rec.get("timings"), dict):
        rec["timings"] = {k: round(float(v), 4) for k, v in rec["timings"].items()}
    return rec


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in (
        "trtwsi",
        "torch",
        "torchvision",
        "ultralytics",
        "sahi",
        "numpy",
        "opencv-python-headless",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    import trtwsi

    out["trtwsi_path"] = str(Path(trtwsi.__file__).parent)
    try:
        out["trtwsi_git"] = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        out["trtwsi_git"] = None
    return out


def sahi_missing() -> str | None:
    try:
        import sahi  # noqa: F401
        from sahi.predict import get_sliced_prediction  # noqa: F401
    except Exception as e:
        return f"sahi not importable ({type(e).__name__}: {e})"
    return None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    ap.add_argument("--threads", default=None, help="comma list of torch thread counts (1,2)")
    ap.add_argument("--batches", default=None, help="trtwsi batch sizes (1,2,4,8)")
    ap.add_argument("--baseline-batch", type=int, default=1, help="ultralytics/SAHI batch (1)")
    ap.add_argument("--size", default=None, help="slide WxH (6144x4608; smoke 1280x1024)")
    ap.add_argument("--slide", default=None, help="use this slide instead of a generated one")
    ap.add_argument("--smoke", action="store_true", help="small slide, 1 thread, batch 2")
    ap.add_argument(
        "--out",
        default=None,
        help="results JSON (default bench/results/cpu-<machine>.json; smoke: a temp dir)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin children to cores")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    a = ap.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    a.threads = [int(v) for v in (a.threads or ("1" if a.smoke else "1,2")).split(",")]
    a.batches = [int(v) for v in (a.batches or ("2" if a.smoke else "1,2,4,8")).split(",")]
    w, h = (a.size or "x".join(map(str, SMOKE_SIZE if a.smoke else FULL_SIZE))).lower().split("x")
    a.size = (int(w), int(h))
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    machine = host_info("everything")
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    cores = None if a.no_pin or not affinity else affinity
    too_many = [t for t in a.threads if affinity and t > len(affinity)]
    if too_many:
        print(f"warning: threads {too_many} > {len(affinity)} usable cores", file=sys.stderr)
    slide = bench_slide(a.size, a.slide)
    skipped = {}
    modes = list(a.modes)
    if "sahi" in modes and (why := sahi_missing()):
        skipped["sahi"] = why
        modes.remove("sahi")
        print(f"skipping sahi: {why}", file=sys.stderr)
    cases = []
    for t in a.threads:
        for m in modes:
            for b in a.batches if m in TRTWSI_MODES else [a.baseline_batch]:
                cases.append((m, t, b))
    # the agreement reference: the first ultralytics case, or an extra one
    if not any(m == "ultralytics" for m, _, _ in cases):
        cases.insert(0, ("ultralytics", a.threads[0], a.baseline_batch))
        ref_extra = True
    else:
        i = next(k for k, c in enumerate(cases) if c[0] == "ultralytics")
        cases.insert(0, cases.pop(i))
        ref_extra = False
    t_all = time.perf_counter()
    load_before = os.getloadavg()
    records, ref = [], None
    with tempfile.TemporaryDirectory(prefix="trtwsi-bench-cpu-") as tmp:
        for k, (m, t, b) in enumerate(cases):
            rec = run_case(m, slide, t, b, cores, Path(tmp), a.timeout)
            dets = rec.pop("_dets", None)
            if k == 0:
                ref = dets
            if dets is not None and ref is not None:
                rec["agreement"] = agreement(dets, ref)
            line = f"{m:13s} threads={t} batch={b}: " + (
                f"{rec['wall_s']:.2f} s, {rec['tiles']} tiles, {rec['tiles_per_s']:.2f} tiles/s, "
                f"{rec['cpu_s_per_tile']:.3f} cpu-s/tile, {rec['peak_rss_mib']:.0f} MiB, "
                f"agreement {rec['agreement']['agreement'] if 'agreement' in rec else '-'}"
                if "error" not in rec
                else "FAILED: " + rec["error"].strip().splitlines()[-1]
            )
            print(line, file=sys.stderr)
            if k == 0 and ref_extra:
                rec["reference_only"] = True
            records.append(rec)
    import trtwsi.synthetic as syn
    from trtwsi.slide import open_slide

    s = open_slide(str(slide))
    doc = {
        "bench": "bench/bench_cpu.py",
        "date": time.strftime("%Y-%m-%d"),
        "device": machine["device"],
        "machine": machine,
        "versions": versions(),
        "smoke": a.smoke,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "slide": {
            "path": str(slide),
            "px": [s.width, s.height],
            "generator": syn.GENERATOR_VERSION,
            "grid_tiles": len(_grid_tiles(s)),
        },
        "model": {"weights": MODEL.name, "conf": CONF, "iou": IOU, "max_det": MAX_DET},
        "tiling": {"tile": TILE, "overlap": OVERLAP, "stride": TILE - round(TILE * OVERLAP)},
        "pinned": cores is not None,
        "agreement_reference": f"ultralytics, first case (threads={cases[0][1]}, batch={cases[0][2]})",
        "match_iou": MATCH_IOU,
        "skipped": skipped,
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "total_s": round(time.perf_counter() - t_all, 1),
        "cases": records,
    }
    if a.out:
        out = Path(a.out)
    elif a.smoke:
        out = Path(tempfile.gettempdir()) / f"cpu-smoke-{machine_name(machine)}.json"
    else:
        out = HERE / "results" / f"cpu-{machine_name(machine)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
