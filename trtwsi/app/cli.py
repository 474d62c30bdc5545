"""The ``trtwsi`` command: info, predict, eval, demo, doctor, export, compare.

Exit codes: 0 success, 1 a TrtwsiError (message printed, no traceback), 2 bad arguments,
3 `eval` below --min-score, 4 a batch finished but some slides failed (see its manifest),
130 interrupted (Ctrl-C; a batch also on SIGTERM: rerun the same command to resume; one slide:
nothing is written).

Modules: this one is the argument parser and dispatch; `predict` is in
:mod:`trtwsi.app.predict_cmd` (one slide) and :mod:`trtwsi.app.batch_cmd` (a batch), the checks
they run before loading anything in :mod:`trtwsi.app.validate`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trtwsi.app.batch_cmd import cmd_predict_batch, is_batch
from trtwsi.app.predict_cmd import cmd_predict_one, make_predictor, models_from_args
from trtwsi.errors import TrtwsiError


def _parse_region(s: str | None):
    if s is None:
        return None
    try:
        x, y, w, h = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--region must be x,y,w,h in level-0 pixels, got {s!r}"
        ) from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"--region {s!r}: width and height must be positive")
    return (x, y, w, h)


def _tile_error_limit(s: str):
    from trtwsi.results.tile_errors import parse_tile_error_limit

    try:
        return parse_tile_error_limit(s)
    except TrtwsiError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_models_from_args = models_from_args  # (older name, kept for callers)


def cmd_info(a) -> int:
    from trtwsi.plan.grid import TileGrid
    from trtwsi.plan.tissue import find_sections
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


def cmd_predict(a) -> int:
    if is_batch(a):
        return cmd_predict_batch(a)
    return cmd_predict_one(a)


def cmd_eval(a) -> int:
    from trtwsi.results.evaluate import format_scores, precision_recall
    from trtwsi.synthetic import GroundTruth

    gt_path = Path(a.gt) if a.gt else Path(a.slide).with_suffix(".gt.json")
    gt = GroundTruth.load(gt_path)
    models = models_from_args(a)
    with make_predictor(a, models) as pred:
        res = pred.run(section=a.section)
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
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "tensorrt", "onnxruntime", "openvino"],
        help="inference backend for --model: auto (a TensorRT engine next to the .pt when it "
        "runs here; on the CPU openvino when installed; else torch), torch, tensorrt, "
        "onnxruntime or openvino (CPU: faster per tile than torch on x86; pip install "
        "'trtwsi[onnxruntime]' / 'trtwsi[openvino]') (default auto)",
    )
    p.add_argument(
        "--trust-weights",
        action="store_true",
        help="unpickle the .pt files fully; a pickle can run code: only for files you trust",
    )
    p.add_argument(
        "--section",
        type=int,
        default=None,
        help="only this tissue section (0 = first in reading order; `trtwsi info` lists them)",
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
        help="tiles per batch (default: 64 on the GPU pipeline, or the largest a fitting TensorRT engine takes; 2 on the CPU; 8 for torch on CUDA without CuPy)",
    )
    p.add_argument("--workers", type=int, default=None, help="reader threads (default: CPU count)")
    p.add_argument(
        "--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N"
    )
    p.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "gpu", "cpu"],
        help="where JPEG tiles are decoded on the GPU pipeline: auto (nvJPEG beside the CPU "
        "readers while CPU decode is behind, when it works here), gpu (that, or an error), cpu "
        "(default auto; TRTWSI_DECODE sets auto's choice)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the PyTorch model with torch.compile on a CUDA GPU: about 1.9x the "
        "model's tiles/s, for a compile when the run starts (2-8 s with a warm cache, 13-21 s "
        "the first time); TRTWSI_COMPILE_PACKAGE=1 keeps it on disk instead (experimental: "
        "loading one crashed most runs on an H100 with torch 2.11; README, 'The model compiled')",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from trtwsi import __version__

    ap = argparse.ArgumentParser(prog="trtwsi", description="YOLO detection on whole-slide images.")
    ap.add_argument("--version", action="version", version=f"trtwsi {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, help="what to do")

    p = sub.add_parser(
        "info", help="levels, MPP, format, tissue sections and tile counts of a slide"
    )
    p.add_argument("slide", help="slide file")
    p.add_argument("--tile", type=int, default=640, help="model input size (default 640)")
    p.add_argument(
        "--overlap", type=float, default=0.2, help="tile overlap: ratio or pixels (default 0.2)"
    )
    p.add_argument("--mpp", type=float, default=None, help="model input µm/px")
    p.add_argument("--slide-mpp", type=float, default=None, help="override the slide's µm/px")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "predict", help="detect objects on a slide and write GeoJSON/CSV/JSON/overlay"
    )
    p.add_argument(
        "slide", nargs="+", help="slide file; several files or a folder run as a batch (--out DIR)"
    )
    _add_predict_opts(p)
    p.add_argument("--region", type=_parse_region, help="x,y,w,h in level-0 px instead of sections")
    p.add_argument(
        "--out",
        help="output path; format by extension (.geojson .csv .json .png). Batch: a folder "
        "(NAME.geojson per slide + manifest.jsonl)",
    )
    p.add_argument(
        "--also", action="append", help="extra formats next to --out, e.g. --also csv --also png"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--max-tile-errors",
        type=_tile_error_limit,
        default=0.05,
        metavar="LIMIT",
        help="a slide with more undecodable tiles than this fails (no outputs, exit non-zero): "
        "a fraction of its tiles (0.05), a count (3) or none (default 0.05)",
    )
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
        "--slide-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop a slide running longer than this: its worker is restarted, the slide is "
        "recorded failed and the others go on (local workers only; default: no limit)",
    )
    b.add_argument(
        "--force", action="store_true", help="rerun slides already done with the same inputs"
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="precision/recall per class against a ground-truth sidecar")
    p.add_argument("slide", help="slide file")
    p.add_argument("--gt", help="ground truth JSON (default: <slide>.gt.json)")
    _add_predict_opts(p)
    p.add_argument(
        "--iou-match",
        type=float,
        default=0.5,
        help="IoU for a detection to match a ground-truth box (default 0.5)",
    )
    p.add_argument(
        "--min-score", type=float, default=0.0, help="exit 3 if any P or R is below this"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "demo", help="make a synthetic slide, run the bundled demo model, write results"
    )
    p.add_argument(
        "--out-dir", default="trtwsi-demo", help="folder for the slide and results (default "
        "trtwsi-demo)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    p.add_argument("--device", default="cuda", help="CUDA device (default cuda)")
    p.add_argument("--tiles", type=int, default=8, help="sample tiles (default 8)")
    p.set_defaults(func=cmd_compare)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return a.func(a)
    except TrtwsiError as e:
        print(f"trtwsi {a.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
        return 2
    except KeyboardInterrupt:
        print(f"trtwsi {a.cmd}: interrupted; no outputs were written", file=sys.stderr)
        return 130
    except OSError as e:  # a file system refusal: one line, not a traceback
        print(f"trtwsi {a.cmd}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    raise SystemExit(main())
