"""Does an engine (or an exported ONNX) find what the ``.pt`` finds? Box agreement on tiles.

Both sides' raw head outputs go through the same reference decode (and class-aware NMS for
``"nms"`` heads) at the model's ``min_conf`` / ``iou``; their detections are then matched per
tile, greedily by descending reference score, to the unmatched detection of the same class with
the highest IoU, a match needing IoU ≥ ``iou_match`` (0.9). Reported: matched fraction (matches
/ the larger of the two counts, so misses and extras both count), the largest and mean score
difference and the largest corner difference (px, input frame) over matches. Used by
``trtwsi.export.build`` (FP16 ONNX vs ``.pt`` before building; ``--validate``) and ``trtwsi compare``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from trtwsi.results.evaluate import match_detections

if TYPE_CHECKING:
    import torch

    from trtwsi.engines.base import Engine
    from trtwsi.engines.model import Model

__all__ = [
    "Agreement",
    "agreement",
    "compare_engines",
    "raw_to_detections",
    "sample_tiles",
]

#: Default pass thresholds: FP16 moves scores by ~1e-3 and boxes by well under a pixel on the
#: demo models; objects whose score sits at min_conf may flip, hence 0.95 and not 1.
IOU_MATCH = 0.9
MIN_MATCHED = 0.95
MAX_SCORE_DIFF = 0.05
MAX_BOX_DIFF_PX = 2.0


@dataclasses.dataclass
class Agreement:
    """Result of :func:`agreement`; ``passed`` and ``reasons`` (why not) against the thresholds."""

    n_ref: int
    n_test: int
    matched: int
    matched_fraction: float
    max_score_diff: float
    mean_score_diff: float
    max_box_diff_px: float
    iou_match: float
    min_matched: float
    max_allowed_score_diff: float
    max_allowed_box_diff_px: float
    passed: bool
    reasons: list[str]

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.reasons)
        return (
            f"{self.matched}/{max(self.n_ref, self.n_test)} boxes matched at IoU ≥ {self.iou_match} "
            f"({self.matched_fraction:.3f}, need ≥ {self.min_matched}); reference {self.n_ref}, "
            f"test {self.n_test}; score diff max {self.max_score_diff:.4f} mean "
            f"{self.mean_score_diff:.4f} (allowed {self.max_allowed_score_diff}); box corner diff "
            f"max {self.max_box_diff_px:.2f} px (allowed {self.max_allowed_box_diff_px}) — {verdict}"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def raw_to_detections(raw: torch.Tensor, model: Model) -> list[torch.Tensor]:
    """Raw head output (``(B, 4 + nc, N)`` or ``(B, K, 6)``, any device) → per-tile float32 CPU
    ``(M, 6)`` detections ``x1 y1 x2 y2 score class`` (input px), as the predictor decodes."""
    from trtwsi.ops.reference import decode_end2end, decode_nms_head, nms

    raw = raw.detach().float().cpu()
    if model.head == "end2end":
        return decode_end2end(raw, model.min_conf, model.max_det)
    return [nms(d, model.iou, model.max_det) for d in decode_nms_head(raw, model.min_conf)]


def agreement(
    ref: Sequence[torch.Tensor | np.ndarray],
    test: Sequence[torch.Tensor | np.ndarray],
    *,
    iou_match: float = IOU_MATCH,
    min_matched: float = MIN_MATCHED,
    max_score_diff: float = MAX_SCORE_DIFF,
    max_box_diff_px: float = MAX_BOX_DIFF_PX,
) -> Agreement:
    """Match ``test`` detections to ``ref`` ones tile by tile (both lists of ``(M, 6)``)."""
    if len(ref) != len(test):
        raise ValueError(f"{len(ref)} reference tiles but {len(test)} test tiles")
    n_ref = n_test = matched = 0
    score_d: list[float] = []
    box_d: list[float] = []
    for r, t in zip(ref, test, strict=True):
        r, t = np.asarray(r, dtype=np.float64), np.asarray(t, dtype=np.float64)
        n_ref, n_test = n_ref + len(r), n_test + len(t)
        if not len(r) or not len(t):
            continue
        match, _ = match_detections(r[:, :4], r[:, 4], r[:, 5], t[:, [0, 1, 2, 3, 5]], iou_match)
        for i in np.flatnonzero(match >= 0):
            j = match[i]
            matched += 1
            score_d.append(abs(r[i, 4] - t[j, 4]))
            box_d.append(float(np.abs(r[i, :4] - t[j, :4]).max()))
    denom = max(n_ref, n_test)
    frac = matched / denom if denom else 1.0
    reasons = []
    if frac < min_matched:
        reasons.append(f"matched fraction {frac:.3f} < {min_matched}")
    smax = max(score_d, default=0.0)
    if smax > max_score_diff:
        reasons.append(f"score difference {smax:.4f} > {max_score_diff}")
    bmax = max(box_d, default=0.0)
    if bmax > max_box_diff_px:
        reasons.append(f"box corner difference {bmax:.2f} px > {max_box_diff_px}")
    return Agreement(
        n_ref=n_ref,
        n_test=n_test,
        matched=matched,
        matched_fraction=float(frac),
        max_score_diff=float(smax),
        mean_score_diff=float(np.mean(score_d)) if score_d else 0.0,
        max_box_diff_px=bmax,
        iou_match=iou_match,
        min_matched=min_matched,
        max_allowed_score_diff=max_score_diff,
        max_allowed_box_diff_px=max_box_diff_px,
        passed=not reasons,
        reasons=reasons,
    )


def sample_tiles(imgsz: int, n: int = 8, seed: int = 1234) -> np.ndarray:
    """``n`` model inputs ``(n, 3, imgsz, imgsz)`` float32 in [0, 1]: tiles cut at level 0 from a
    synthetic scene (:mod:`trtwsi.synthetic`, seed ``seed``, not a training seed), so the demo
    models find objects in them. Deterministic."""
    from trtwsi.synthetic import make_array

    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    img, _ = make_array(cols * imgsz, rows * imgsz, seed=seed)
    tiles = [
        img[r * imgsz : (r + 1) * imgsz, c * imgsz : (c + 1) * imgsz]
        for r in range(rows)
        for c in range(cols)
    ][:n]
    x = np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray(x)


def compare_engines(
    model: Model, engine: Engine, tiles: np.ndarray | None = None, *, n: int = 8, **thresholds
) -> Agreement:
    """``engine`` (e.g. a TensorRTEngine) vs the ``.pt`` in float32 on the CPU, on ``tiles``
    (default :func:`sample_tiles`), batch by batch at the engine's batch size."""
    import torch

    tiles = sample_tiles(model.imgsz, n) if tiles is None else tiles
    with torch.inference_mode():
        ref = model.module(torch.from_numpy(tiles))[0]
    bs = engine.batch_size or len(tiles)
    outs = []
    for i in range(0, len(tiles), bs):
        chunk = torch.from_numpy(tiles[i : i + bs])
        k = len(chunk)
        if engine.batch_size and k < bs:  # pad the last batch
            chunk = torch.cat([chunk, chunk[-1:].expand(bs - k, -1, -1, -1)])
        y = engine.infer(chunk.to(engine.device, engine.dtype).contiguous())
        if engine.device.type == "cuda":
            torch.cuda.current_stream(engine.device).synchronize()
        outs.append(y[:k].float().cpu().clone())
    got = torch.cat(outs)
    return agreement(raw_to_detections(ref, model), raw_to_detections(got, model), **thresholds)
