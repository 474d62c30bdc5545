"""The ``trtwsi`` command: info, predict, eval, demo, doctor, export, compare.

Exit codes: 0 success, 1 a TrtwsiError (message printed, no traceback), 2 bad arguments,
3 `eval` below --min-score, 4 a batch finished but some slides failed (see its manifest),
130 a batch was interrupted (Ctrl-C / SIGTERM; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from trtwsi.errors import TrtwsiError
from trtwsi.plan.tissue import find_sections


def _models_from_args(a) -> list:
    from trtwsi.engines.model import Model, load_models_config

    models, trust = [], getattr(a, "trust_weights", False)
    if getattr(a, "models", None):
        models += load_models_config(a.models, trust_weights=trust)
    for w in a.model or []:
        models.append(Model(w, min_conf=a.conf, iou=a.iou, backend=a.backend, trust_weights=trust))
    if not models:
        default = _default_models_config()
        if default is None:
            raise TrtwsiError("no model given: pass --model PATH.pt or --models models.toml")
        models = load_models_config(default, trust_weights=trust)
    return models


def _default_models_config() -> Path | None:
    from trtwsi.app.demo import bundled_models_dir

    p = bundled_models_dir() / "models.toml"
    return p if p.exists() else None


def _parse_region(s: str | None):
    if s is None:
        return None
    try:
        x, y, w, h = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--region must be x,y,w,h in level-0 pixels, got {s!r}"
        ) from None
    return (x, y, w, h)


def cmd_info(a) -> int:
    from trtwsi.plan.grid import TileGrid
    from trtwsi.slide import open_slide

    with open_slide(a.slide, mpp=a.slide_mpp) as slide:
        info = slide.info()
        sections = find_sections(slide)
        tile = a.tile
        grids = [TileGrid(slide, s, tile_size=tile, overlap=a.overlap, mpp=a.mpp) for s in sections]
        if a.json:
            out = {
                **info.__dict__,
                "sections": [
                    {
                        "index": s.index,
                        "bbox": list(s.bbox),
                        "area_px": int(s.area),
                        "tiles": len(g),
                    }
                    for s, g in zip(sections, grids, strict=True)
                ],
                "tile": tile,
                "overlap": a.overlap,
            }
            print(json.dumps(out, indent=2, default=str))
            return 0
        mpp = f"{info.mpp:.4f} µm/px" if info.mpp else "unknown (pass --slide-mpp)"
        print(f"slide    {info.path}")
        print(f"format   {info.format}")
        print(
            f"size     {info.width} x {info.height} px ({info.width * info.height / 1e9:.3f} Gpx)"
        )
        print(f"mpp      {mpp}")
        print(
            "levels   "
            + "  ".join(
                f"[{i}] {lv['width']}x{lv['height']} ÷{lv['downsample']:.3g}"
                for i, lv in enumerate(info.levels)
            )
        )
        print(
            f"sections {len(sections)} (tile {tile}, overlap {a.overlap}"
            + (f", model mpp {a.mpp}" if a.mpp else "")
            + ")"
        )
        for s, g in zip(sections, grids, strict=True):
            x, y, w, h = s.bbox
            print(
                f"  [{s.index}] x={x} y={y} w={w} h={h}  tissue {s.area / 1e6:.1f} Mpx  tiles {len(g)}"
            )
        print(f"tiles    {sum(len(g) for g in grids)} total")
    return 0


def _out_path_for(slide_path: str, out: str | None, fmt: str) -> Path:
    if out:
        return Path(out)
    return Path(slide_path).with_suffix("").with_name(Path(slide_path).stem + f".detections{fmt}")


def _predictor(a, models):
    """The Predictor for the options `predict` and `eval` share (see _add_predict_opts)."""
    from trtwsi.predictor import Predictor

    return Predictor(
        a.slide,
        models,
        overlap=a.overlap,
        mpp=a.mpp,
        batch=a.batch,
        workers=a.workers,
        device=a.device,
        progress=not a.no_progress,
        slide_mpp=a.slide_mpp,
    )


def _is_batch(a) -> bool:
    """Batch mode: several slides, a folder, --out an existing folder (or ending in /), or any of
    --devices / --ray / --force."""
    out_is_dir = bool(a.out) and (Path(a.out).is_dir() or a.out.endswith(("/", os.sep)))
    return (
        len(a.slide) > 1
        or Path(a.slide[0]).is_dir()
        or out_is_dir
        or a.devices is not None
        or a.ray is not None
        or a.force
    )


def _batch_devices(a) -> str | None:
    """--devices; else with --ray one actor per cluster GPU; else one worker on --device."""
    if a.devices is not None:
        return a.devices
    if a.ray is not None:
        return "all"
    return None if a.device == "auto" else a.device


def cmd_predict_batch(a, models) -> int:
    import signal

    from trtwsi.batch import BatchParams, run_batch

    if not a.out:
        raise TrtwsiError(
            "a batch (several slides, a folder, --devices or --ray) needs --out DIR: the folder "
            "for one result set per slide and the manifest"
        )
    params = BatchParams(
        overlap=a.overlap,
        mpp=a.mpp,
        slide_mpp=a.slide_mpp,
        section=a.section,
        region=_parse_region(a.region),
        formats=(".geojson", *(a.also or [])),
        batch=a.batch,
        workers=a.workers,
        threads=a.threads,
    )

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        summary = run_batch(
            a.slide,
            a.out,
            models,
            params,
            devices=_batch_devices(a),
            ray=a.ray is not None,
            ray_address=a.ray or None,
            force=a.force,
            overwrite=a.overwrite,
            max_retries=a.retries,
            log=lambda line: print(line, flush=True),
        )
    except KeyboardInterrupt:
        print(
            f"trtwsi predict: interrupted; finished slides are kept in {a.out}, rerun the same "
            "command to do the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    print(
        f"batch: {len(summary.done)} done, {len(summary.failed)} failed, "
        f"{len(summary.skipped)} skipped (already done), {summary.crashes} worker crash(es), "
        f"{summary.seconds:.1f} s; manifest {summary.manifest}"
    )
    for name in summary.failed:
        err = summary.records[name].get("error", {})
        print(f"  failed {name}: {err.get('type')}: {err.get('message')}")
    return 4 if summary.failed else 0


def cmd_predict(a) -> int:
    models = _models_from_args(a)
    if _is_batch(a):
        return cmd_predict_batch(a, models)
    a.slide = a.slide[0]
    region = _parse_region(a.region)
    t0 = time.perf_counter()
    pred = _predictor(a, models)
    res = pred.run(section=a.section, region=region)
    out = _out_path_for(a.slide, a.out, ".geojson")
    written = [res.save(out, overwrite=a.overwrite, slide=pred.slide)]
    for extra in a.also or []:
        written.append(
            res.save(
                out.with_suffix(extra if extra.startswith(".") else "." + extra),
                overwrite=a.overwrite,
                slide=pred.slide,
            )
        )
    print(res.summary())
    for p in written:
        print(f"wrote {p}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_eval(a) -> int:
    from trtwsi.results.evaluate import format_scores, precision_recall
    from trtwsi.synthetic import GroundTruth

    gt_path = Path(a.gt) if a.gt else Path(a.slide).with_suffix(".gt.json")
    gt = GroundTruth.load(gt_path)
    models = _models_from_args(a)
    res = _predictor(a, models).run(section=a.section)
    det = res.detections
    worst = 1.0
    for mi, m in enumerate(models):
        sel = det.model == mi
        names = gt.class_names
        scores = precision_recall(
            det.boxes[sel], det.score[sel], det.class_id[sel], gt.boxes, names, iou=a.iou_match
        )
        print(f"model {m.name}: {int(sel.sum())} detections vs {len(gt.boxes)} ground truth")
        print(format_scores(scores, iou=a.iou_match))
        worst = min([worst] + [min(s.precision, s.recall) for s in scores])
    print(f"time {res.timings.get('total', float('nan')):.1f} s")
    return 0 if worst >= a.min_score else 3


def cmd_demo(a) -> int:
    from trtwsi.app.demo import run_demo

    return run_demo(
        Path(a.out_dir), overwrite=a.overwrite, progress=not a.no_progress, device=a.device
    )


def cmd_doctor(a) -> int:
    from trtwsi.app.doctor import collect, format_report

    print(format_report(collect(a.models_dir, check_kernels=a.check_kernels)))
    return 0


def cmd_export(a) -> int:
    """`trtwsi export ARGS…` = `python -m trtwsi.export.build ARGS…`."""
    from trtwsi.export.build import main as build_main

    return build_main(a.args)


def cmd_compare(a) -> int:
    """Engine vs .pt box agreement on sample tiles (exit 3 on FAIL)."""
    from trtwsi.app.compare import compare_engines
    from trtwsi.engines.model import Model
    from trtwsi.engines.sidecar import read_sidecar
    from trtwsi.engines.tensorrt import TensorRTEngine

    meta = read_sidecar(a.engine)
    weights = a.model or str(Path(a.engine).parent / meta.weights)
    model = Model(weights, imgsz=meta.imgsz, head=meta.head, max_det=meta.max_det)
    engine = TensorRTEngine(a.engine, a.device, batch_size=None, expect=model.engine_needs())
    result = compare_engines(model, engine, n=a.tiles)
    print(result.summary())
    return 0 if result.passed else 3


def _add_predict_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", help=".pt weights (repeatable)")
    p.add_argument(
        "--models", help="models config TOML naming several models (see trtwsi/models/models.toml)"
    )
    p.add_argument(
        "--conf", type=float, default=0.25, help="min confidence for --model (default 0.25)"
    )
    p.add_argument(
        "--iou", type=float, default=0.45, help="per-tile NMS IoU for --model (default 0.45)"
    )
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "tensorrt"])
    p.add_argument(
        "--trust-weights",
        action="store_true",
        help="unpickle the .pt files fully; a pickle can run code: only for files you trust",
    )
    p.add_argument(
        "--section",
        type=int,
        default=None,
        help="only this tissue section (0 = first in reading order)",
    )
    p.add_argument(
        "--overlap",
        type=float,
        default=0.2,
        help="tile overlap: ratio in [0,1) or pixels (default 0.2)",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="model input resolution in µm/px (default: slide level 0)",
    )
    p.add_argument("--slide-mpp", type=float, default=None, help="override the slide's µm/px")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="tiles per batch (default: 32 on the GPU pipeline, 8 on the CPU)",
    )
    p.add_argument("--workers", type=int, default=None, help="reader threads (default: CPU count)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from trtwsi import __version__

    ap = argparse.ArgumentParser(prog="trtwsi", description="YOLO detection on whole-slide images.")
    ap.add_argument("--version", action="version", version=f"trtwsi {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser(
        "info", help="levels, MPP, format, tissue sections and tile counts of a slide"
    )
    p.add_argument("slide")
    p.add_argument("--tile", type=int, default=640, help="model input size (default 640)")
    p.add_argument("--overlap", type=float, default=0.2)
    p.add_argument("--mpp", type=float, default=None, help="model input µm/px")
    p.add_argument("--slide-mpp", type=float, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "predict", help="detect objects on a slide and write GeoJSON/CSV/JSON/overlay"
    )
    p.add_argument(
        "slide", nargs="+", help="slide file; several files or a folder run as a batch (--out DIR)"
    )
    _add_predict_opts(p)
    p.add_argument("--region", help="x,y,w,h in level-0 px instead of sections")
    p.add_argument(
        "--out",
        help="output path; format by extension (.geojson .csv .json .png). Batch: a folder "
        "(NAME.geojson per slide + manifest.jsonl)",
    )
    p.add_argument(
        "--also", action="append", help="extra formats next to --out, e.g. --also csv --also png"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    b = p.add_argument_group("batch (several slides or a folder, --out DIR)")
    b.add_argument(
        "--devices",
        default=None,
        help="one worker process per device: all (every GPU), 0,1 (GPU indices), cpu, cpu,cpu "
        "(two CPU workers); default: one worker on --device",
    )
    b.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the slides as Ray actors (pip install 'trtwsi[ray]'): no ADDRESS starts a "
        "local Ray; auto, HOST:PORT or ray://HOST:10001 joins a cluster (shared --out folder)",
    )
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: cores/workers)",
    )
    b.add_argument(
        "--retries",
        type=int,
        default=2,
        help="times a slide is retried after its worker died on it (default 2)",
    )
    b.add_argument(
        "--force", action="store_true", help="rerun slides already done with the same inputs"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="precision/recall per class against a ground-truth sidecar")
    p.add_argument("slide")
    p.add_argument("--gt", help="ground truth JSON (default: <slide>.gt.json)")
    _add_predict_opts(p)
    p.add_argument("--iou-match", type=float, default=0.5)
    p.add_argument(
        "--min-score", type=float, default=0.0, help="exit 3 if any P or R is below this"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo", help="make a synthetic slide, run the bundled demo model, write results"
    )
    p.add_argument("--out-dir", default="trtwsi-demo")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "doctor", help="GPU, driver, CUDA, torch, CuPy, TensorRT; which engines run here; fixes"
    )
    p.add_argument("--models-dir", default=None, help="engines folder (default: bundled models/)")
    p.add_argument(
        "--check-kernels", action="store_true", help="also compile the CUDA kernels (NVRTC/CuPy)"
    )
    p.set_defaults(func=cmd_doctor)

    # Every argument goes to python -m trtwsi.export.build (its --help too): no "-" options here.
    p = sub.add_parser(
        "export",
        help="build TensorRT engines from .pt (= python -m trtwsi.export.build; --help)",
        add_help=False,
        prefix_chars="+",
    )
    p.add_argument("args", nargs="*", help="python -m trtwsi.export.build arguments")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="TensorRT engine vs its .pt: box agreement on sample tiles")
    p.add_argument("engine", help="the .engine file (its .engine.json sidecar next to it)")
    p.add_argument("--model", help=".pt weights (default: the sidecar's, next to the engine)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiles", type=int, default=8, help="sample tiles (default 8)")
    p.set_defaults(func=cmd_compare)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except TrtwsiError as e:
        print(f"trtwsi {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
