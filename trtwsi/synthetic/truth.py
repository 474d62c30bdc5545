"""Ground truth of a synthetic slide: boxes and class names, saved as ``<stem>.gt.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------
# ground truth
# ----------------------------------------------------------------------------------------------
#: Bumped whenever the same seed would render different pixels or objects.
GENERATOR_VERSION = 1


@dataclass
class GroundTruth:
    """What a synthetic slide contains.

    ``boxes``: (N, 5) float32 ``(x1, y1, x2, y2, class_id)`` in level-0 px (continuous
    coordinates, see the module docstring). ``sections``: tissue section bounding boxes
    ``(x, y, w, h)`` in level-0 px, in the reading order of :func:`trtwsi.plan.tissue.find_sections`.
    """

    boxes: np.ndarray
    class_names: list[str]
    sections: list[tuple[int, int, int, int]]
    width: int
    height: int
    mpp: float | None
    seed: int
    version: int = GENERATOR_VERSION
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 5)
        self.sections = [tuple(int(v) for v in s) for s in self.sections]

    def counts(self) -> dict[str, int]:
        """Number of ground-truth objects per class name."""
        cls = self.boxes[:, 4].astype(np.int64)
        return {name: int((cls == i).sum()) for i, name in enumerate(self.class_names)}

    def to_dict(self) -> dict:
        return {
            "generator": "trtwsi.synthetic",
            "version": self.version,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "seed": self.seed,
            "class_names": list(self.class_names),
            "sections": [list(s) for s in self.sections],
            "boxes": self.boxes.tolist(),  # float32 -> exact doubles: round-trips exactly
            "params": self.params,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON to ``path``; returns it."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> GroundTruth:
        d = json.loads(Path(path).read_text())
        return cls(
            boxes=np.asarray(d["boxes"], dtype=np.float32).reshape(-1, 5),
            class_names=list(d["class_names"]),
            sections=[tuple(s) for s in d["sections"]],
            width=int(d["width"]),
            height=int(d["height"]),
            mpp=d.get("mpp"),
            seed=int(d["seed"]),
            version=int(d.get("version", 0)),
            params=dict(d.get("params", {})),
        )


def sidecar_path(slide_path: str | os.PathLike) -> Path:
    """``dir/name.tif`` → ``dir/name.gt.json`` (the ground-truth file :func:`make_slide` writes)."""
    p = Path(slide_path)
    return p.with_name(p.stem + ".gt.json")
