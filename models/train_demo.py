"""Train the bundled demo detectors on synthetic slides, reproducibly and offline.

    python models/train_demo.py --arch yolo11n --out trtwsi/models/demo-yolo11n.pt   # NMS head
    python models/train_demo.py --arch yolo26n --out trtwsi/models/demo-yolo26n.pt   # end-to-end head

Data: 640×640 tiles cut from synthetic scenes (trtwsi.synthetic.Scene) with training seeds
1000, 1001, … (the demo slide uses seed 0, tests use seeds < 1000, so evaluation is held out).
Tiles are JPEG-encoded at quality 90 like the slides they will see. A label is kept when at least
``--min-visible`` of the object's box lies inside the tile (clipped to the tile), so the model
learns not to fire on slivers cut by tile borders, which keeps seam merging simple.

Training starts from the architecture yaml (no pretrained weights: nothing is downloaded) with
ultralytics' own trainer. Ultralytics' AMP self-check and font check would try to download files;
both are patched out here (AMP is kept on), and YOLO_OFFLINE=1 is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")

import cv2
import numpy as np

TRAIN_SEED0 = 1000
SCENE_W, SCENE_H = 6000, 4500
TILE = 640


def _scene_tiles(args) -> list[tuple[str, int]]:
    """Render the tiles of one scene into ``out_dir/{images,labels}/split``; returns (name, n_obj)."""
    seed, n_tiles, out_dir, split, min_visible = args
    from trtwsi.synthetic import Scene

    scene = Scene(SCENE_W, SCENE_H, seed=seed)
    rng = np.random.default_rng(seed)
    written = []
    sections = scene.section_bboxes
    for i in range(n_tiles):
        if rng.random() < 0.9 and sections:  # mostly tissue, some glass and tissue edges
            sx, sy, sw, sh = sections[rng.integers(len(sections))]
            x = int(rng.integers(sx - TILE // 2, max(sx - TILE // 2 + 1, sx + sw - TILE // 2)))
            y = int(rng.integers(sy - TILE // 2, max(sy - TILE // 2 + 1, sy + sh - TILE // 2)))
        else:
            x = int(rng.integers(0, SCENE_W - TILE))
            y = int(rng.integers(0, SCENE_H - TILE))
        x = min(max(x, 0), SCENE_W - TILE)
        y = min(max(y, 0), SCENE_H - TILE)
        img = scene.render(x, y, TILE, TILE)
        boxes = scene.boxes_in(x, y, TILE, TILE, min_visible=min_visible)
        name = f"s{seed}_{i:04d}"
        cv2.imwrite(
            str(out_dir / "images" / split / f"{name}.jpg"),
            img[:, :, ::-1],
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )
        lines = []
        for x1, y1, x2, y2, c in boxes:
            x1, x2 = np.clip([x1 - x, x2 - x], 0, TILE)
            y1, y2 = np.clip([y1 - y, y2 - y], 0, TILE)
            if x2 - x1 < 2 or y2 - y1 < 2:
                continue
            lines.append(
                f"{int(c)} {(x1 + x2) / 2 / TILE:.6f} {(y1 + y2) / 2 / TILE:.6f} "
                f"{(x2 - x1) / TILE:.6f} {(y2 - y1) / TILE:.6f}"
            )
        (out_dir / "labels" / split / f"{name}.txt").write_text("\n".join(lines))
        written.append((name, len(lines)))
    return written


def build_dataset(
    out_dir: Path,
    n_scenes: int,
    tiles_per_scene: int,
    val_scenes: int,
    min_visible: float,
    workers: int,
) -> Path:
    """Write a YOLO-format dataset; returns the data.yaml path."""
    from trtwsi.synthetic import Scene

    for split in ("train", "val"):
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
    jobs = [
        (
            TRAIN_SEED0 + i,
            tiles_per_scene,
            out_dir,
            "train" if i >= val_scenes else "val",
            min_visible,
        )
        for i in range(n_scenes)
    ]
    with ProcessPoolExecutor(max(1, workers)) as ex:
        counts = [n for res in ex.map(_scene_tiles, jobs) for _, n in res]
    names = Scene(64, 64, seed=0).class_names
    data = out_dir / "data.yaml"
    data.write_text(
        f"path: {out_dir.resolve()}\ntrain: images/train\nval: images/val\n"
        f"names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    )
    print(f"dataset: {len(counts)} tiles, {sum(counts)} objects -> {data}")
    return data


def _read_results_csv(self) -> dict:
    """results.csv as {column: [values]} with the csv module (ultralytics uses polars here)."""
    import csv

    with open(self.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k.strip(): [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--arch",
        default="yolo11n",
        help="ultralytics architecture yaml stem (yolo11n, yolo26n, ...)",
    )
    p.add_argument("--out", type=Path, required=True, help="where to copy the trained best.pt")
    p.add_argument("--work", type=Path, default=Path("runs/demo-train"))
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--val-scenes", type=int, default=4)
    p.add_argument("--tiles-per-scene", type=int, default=60)
    p.add_argument("--min-visible", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument(
        "--time", type=float, default=None, help="training time limit in hours (overrides epochs)"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="0")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    import ultralytics.data.utils as data_utils
    import ultralytics.engine.trainer as trainer_mod
    from ultralytics import YOLO

    trainer_mod.check_amp = lambda model: True  # would download yolo26n.pt
    data_utils.check_font = lambda *args, **kw: None  # would download Arial.ttf
    trainer_mod.BaseTrainer.read_results_csv = _read_results_csv  # avoids needing polars

    t0 = time.time()
    ds = a.work / "dataset"
    data = ds / "data.yaml"
    if not data.exists():
        data = build_dataset(
            ds, a.scenes, a.tiles_per_scene, a.val_scenes, a.min_visible, a.workers
        )
    t_data = time.time() - t0
    model = YOLO(f"{a.arch}.yaml")
    kw = dict(
        data=str(data),
        imgsz=TILE,
        epochs=a.epochs,
        batch=a.batch,
        workers=a.workers,
        device=a.device,
        seed=a.seed,
        deterministic=True,
        pretrained=False,
        plots=False,
        project=str(a.work.resolve()),
        name=a.arch,
        exist_ok=True,
        cache="ram",
        degrees=0.0,
        flipud=0.5,
        fliplr=0.5,
        hsv_h=0.01,
        close_mosaic=5,
        patience=100,
    )
    if a.time:
        kw["time"] = a.time
    model.train(**kw)
    best = a.work / a.arch / "weights" / "best.pt"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(best, a.out)
    metrics = YOLO(str(a.out)).val(
        data=str(data), imgsz=TILE, batch=a.batch, device=a.device, plots=False, verbose=False
    )
    card = {
        "arch": a.arch,
        "weights": a.out.name,
        "train_seeds": [TRAIN_SEED0 + a.val_scenes, TRAIN_SEED0 + a.scenes - 1],
        "val_seeds": [TRAIN_SEED0, TRAIN_SEED0 + a.val_scenes - 1],
        "scene_size": [SCENE_W, SCENE_H],
        "tile": TILE,
        "tiles_per_scene": a.tiles_per_scene,
        "min_visible": a.min_visible,
        "epochs": a.epochs,
        "time_limit_h": a.time,
        "batch": a.batch,
        "seed": a.seed,
        "val_map50": float(metrics.box.map50),
        "val_map50_95": float(metrics.box.map),
        "dataset_seconds": round(t_data, 1),
        "total_seconds": round(time.time() - t0, 1),
        "ultralytics": __import__("ultralytics").__version__,
        "torch": __import__("torch").__version__,
        "device": __import__("torch").cuda.get_device_name(0) if a.device != "cpu" else "cpu",
    }
    a.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
