"""`trtwsi demo`: a synthetic slide (seed 0, never used in training), the bundled demo model, results.

Writes into ``out_dir``: ``demo-slide.tif`` (+ ``demo-slide.gt.json`` ground truth),
``demo-slide.geojson`` (open in QuPath over the slide), ``demo-slide.png`` (overlay),
``demo-slide.csv``, and prints the per-class precision/recall against the ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path

from trtwsi._util.resources import bundled_models_dir
from trtwsi.errors import ModelError

__all__ = ["DEMO_SEED", "DEMO_SIZE", "bundled_models_dir", "run_demo"]

DEMO_SEED = 0
DEMO_SIZE = (6000, 4500)


def run_demo(
    out_dir: Path, *, overwrite: bool = False, progress: bool = True, device: str = "auto"
) -> int:
    from trtwsi.engines.model import load_models_config
    from trtwsi.predictor import Predictor
    from trtwsi.results.evaluate import format_scores, precision_recall
    from trtwsi.synthetic import GroundTruth, make_slide

    cfg = bundled_models_dir() / "models.toml"
    if not cfg.exists():
        raise ModelError(
            f"the demo models config {cfg} is missing: reinstall trtwsi (the wheel ships "
            "trtwsi/models/), or point TRTWSI_MODELS at a folder with models.toml and its .pt files"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    slide_path = out_dir / "demo-slide.tif"
    t0 = time.perf_counter()
    if not slide_path.exists() or overwrite:
        gt = make_slide(slide_path, *DEMO_SIZE, seed=DEMO_SEED)
        print(
            f"made {slide_path} ({DEMO_SIZE[0]}x{DEMO_SIZE[1]} px, seed {DEMO_SEED}) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    else:
        gt = GroundTruth.load(slide_path.with_suffix(".gt.json"))
    models = [m for m in load_models_config(cfg) if m.name == "demo"] or load_models_config(cfg)[:1]
    pred = Predictor(slide_path, models, device=device, progress=progress)
    res = pred.run()
    written = [
        res.save(slide_path.with_suffix(ext), overwrite=True, slide=pred.slide)
        for ext in (".geojson", ".csv", ".png")
    ]
    print(res.summary())
    det = res.detections
    scores = precision_recall(det.boxes, det.score, det.class_id, gt.boxes, gt.class_names)
    print("accuracy against the ground truth (IoU 0.5):")
    print(format_scores(scores))
    for p in written:
        print(f"wrote {p}")
    print(f"demo done in {time.perf_counter() - t0:.1f} s")
    return 0
