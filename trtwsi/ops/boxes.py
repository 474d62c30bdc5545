"""The one box-overlap helper: IoU and IoS (intersection over the smaller area) in numpy.

Boxes are ``(..., 4)`` float64 ``(x1, y1, x2, y2)`` in any one frame (tile px or level-0 px).
Used by the seam merge, the evaluation matcher and the synthetic detector. (The torch
``box_iou_pairs`` in :mod:`trtwsi.ops.reference` is the kernel oracle: it reproduces
torchvision's arithmetic in the boxes' own dtype, which this float64 helper does not.)
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from trtwsi.errors import MergeError

__all__ = ["METRICS", "Metric", "overlap_matrix", "pair_overlap"]

Metric = Literal["iou", "ios"]
METRICS = ("iou", "ios")
_METRICS = METRICS


def pair_overlap(a: np.ndarray, b: np.ndarray, metric: Metric = "iou") -> np.ndarray:
    """Elementwise overlap of two box arrays that broadcast against each other.

    ``a``, ``b``: ``(..., 4)`` float64 ``(x1, y1, x2, y2)``. Returns float64 of the broadcast
    shape: IoU (``metric="iou"``) or intersection over the smaller area (``"ios"``); 0 where the
    boxes do not intersect with positive area (so a zero-area box has overlap 0 with anything).
    The fast merge and the reference compute it with the same operations, so they agree to the
    last bit (which matters for pairs exactly at the threshold).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return _overlap(*(a[..., k] for k in range(4)), *(b[..., k] for k in range(4)), metric)


def _overlap(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, metric):
    """:func:`pair_overlap` on coordinate columns (float64, broadcastable)."""
    iw = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
    ih = np.minimum(ay2, by2) - np.maximum(ay1, by1)
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    if metric == "iou":
        denom = area_a + area_b - inter
    elif metric == "ios":
        denom = np.minimum(area_a, area_b)
    else:
        raise MergeError(f"metric must be one of {_METRICS}, got {metric!r}")
    out = np.zeros(np.broadcast(inter, denom).shape, dtype=np.float64)
    np.divide(inter, denom, out=out, where=inter > 0)
    return out


def overlap_matrix(a: np.ndarray, b: np.ndarray, metric: Metric = "iou") -> np.ndarray:
    """All pairs: ``a`` ``(N, 4)`` × ``b`` ``(M, 4)`` → ``(N, M)`` float64 overlaps."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return pair_overlap(a[:, None, :], b[None, :, :], metric)
