"""Precision and recall of detections against ground-truth boxes, per class.

Matching follows the usual detection protocol: per class, detections are visited in descending
score order and each is matched to the unmatched ground-truth box of highest IoU if that IoU is
>= ``iou`` (a true positive); otherwise it is a false positive. Unmatched ground truth are false
negatives. Boxes are ``(x1, y1, x2, y2)`` in one shared frame (level-0 slide px).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class ClassScore:
    name: str
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    def as_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision, "recall": self.recall}


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a (N, 4) × b (M, 4) → (N, M) float64."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _match_class(
    det: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou: float
) -> tuple[int, int, int]:
    if len(det) == 0 or len(gt) == 0:
        return 0, len(det), len(gt)
    order = np.argsort(-scores, kind="stable")
    det = det[order]
    tp = 0
    used = np.zeros(len(gt), dtype=bool)
    # Process in blocks so memory stays bounded with many boxes; candidates are near each other.
    x_order = np.argsort(gt[:, 0])
    gx1 = gt[x_order, 0]
    max_w = float(np.max(gt[:, 2] - gt[:, 0]))
    for d in det:
        lo = np.searchsorted(gx1, d[0] - max_w, side="left")
        hi = np.searchsorted(gx1, d[2], side="right")
        cand = x_order[lo:hi]
        if len(cand) == 0:
            continue
        cand = cand[~used[cand]]
        if len(cand) == 0:
            continue
        ious = _iou_matrix(d[None, :4], gt[cand, :4])[0]
        j = int(np.argmax(ious))
        if ious[j] >= iou:
            used[cand[j]] = True
            tp += 1
    return tp, len(det) - tp, len(gt) - tp


def precision_recall(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_classes: np.ndarray,
    gt_boxes: np.ndarray,
    class_names: list[str],
    iou: float = 0.5,
) -> list[ClassScore]:
    """Per-class TP/FP/FN at IoU ``iou``.

    det_boxes (N, 4) float, det_scores (N,), det_classes (N,) int; gt_boxes (M, 5)
    ``(x1, y1, x2, y2, class_id)``. Returns one ClassScore per entry of ``class_names``.
    """
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    det_classes = np.asarray(det_classes).reshape(-1).astype(np.int64)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 5)
    out = []
    for c, name in enumerate(class_names):
        dm = det_classes == c
        gm = gt_boxes[:, 4].astype(np.int64) == c
        tp, fp, fn = _match_class(det_boxes[dm], det_scores[dm], gt_boxes[gm, :4], iou)
        out.append(ClassScore(name, tp, fp, fn))
    return out


def format_scores(scores: list[ClassScore], iou: float = 0.5) -> str:
    """A small table: class, GT, detections, TP, FP, FN, precision, recall."""
    lines = [
        f"{'class':<12} {'gt':>6} {'det':>6} {'tp':>6} {'fp':>6} {'fn':>6} "
        f"{'P@' + str(iou):>7} {'R@' + str(iou):>7}"
    ]
    for s in scores:
        lines.append(
            f"{s.name:<12} {s.tp + s.fn:>6} {s.tp + s.fp:>6} {s.tp:>6} {s.fp:>6} {s.fn:>6} "
            f"{s.precision:>7.3f} {s.recall:>7.3f}"
        )
    return "\n".join(lines)
