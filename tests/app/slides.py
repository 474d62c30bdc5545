"""Real slides for the CLI/batch robustness tests: synthetic TIFFs, some with damaged tiles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import tifffile

from trtwsi._util.resources import bundled_models_dir
from trtwsi.synthetic import make_slide

REPO = Path(__file__).resolve().parents[2]
MODEL = bundled_models_dir() / "demo-yolo11n.pt"


def small_slide(path: Path, seed: int = 0, size=(900, 700), n_sections: int = 1) -> Path:
    """A one-section slide of ~2 model tiles (fast on the CPU)."""
    make_slide(path, *size, seed=seed, n_sections=n_sections, threads=1)
    return path


def damaged_slide(path: Path, seed: int = 0, size=(1200, 900)) -> Path:
    """A 2-level slide whose level-0 file tiles are all junk: the tissue is still found (on
    level 1) but every tile the model reads fails to decode (filled white, recorded)."""
    good = path.with_name(path.stem + ".good.tif")
    make_slide(good, *size, seed=seed, n_sections=1, levels=2, threads=1)
    shutil.copy(good, path)
    good.unlink()
    with tifffile.TiffFile(path) as t:
        p = t.pages[0]
        segments = list(zip(p.dataoffsets, p.databytecounts, strict=True))
    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        for off, n in segments:
            f.seek(int(off))
            f.write(rng.bytes(int(n)))
    return path
