"""The build-time gate of the CPU graph backends (ONNX Runtime, OpenVINO): their output vs
PyTorch's on the same batch.

A graph backend runs the model's float32 graph exported in memory from the safely loaded
module (:func:`~trtwsi.engines.onnx_export.export_onnx`). Its kernels fuse and reorder float32
arithmetic, so outputs differ from PyTorch's by a few 1e-3 (px and scores); a difference over
:data:`MAX_ABS_DIFF` means a broken conversion and raises
:class:`~trtwsi.errors.BackendError` before any tile is run, instead of different detections.
"""

from __future__ import annotations

from trtwsi.errors import BackendError

__all__ = ["MAX_ABS_DIFF", "check_against_torch", "output_difference"]

#: Largest raw-output difference to the PyTorch forward accepted at build (px / score units).
MAX_ABS_DIFF = 0.05


def output_difference(got, want, head: str) -> float:
    """How far two raw head outputs of the same batch are apart (float32 torch tensors).

    ``"nms"`` heads ``(B, 4 + nc, N)``: the largest elementwise difference. ``"end2end"`` heads
    ``(B, K, 6)`` are the top K by score, so near-equal scores may come in another order: every
    row of ``want`` scoring ≥ 0.1 is paired with the closest row of ``got`` of the same class
    scoring ≥ 0.05, and the largest coordinate or score difference of those pairs counts
    (infinite when a row has no partner).
    """
    if head != "end2end":
        return float((got - want).abs().max()) if want.numel() else 0.0
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        w = w[w[:, 4] >= 0.1]
        g = g[g[:, 4] >= 0.05]
        if not len(w):
            continue
        d = (w[:, None, :5] - g[None, :, :5]).abs().amax(dim=2)  # (Nw, Ng)
        d[w[:, None, 5] != g[None, :, 5]] = float("inf")
        worst = max(worst, float(d.amin(dim=1).max()) if len(g) else float("inf"))
    return worst


def check_against_torch(engine, backend: str, limit: float | None = None) -> float:
    """Max difference of ``engine.infer`` vs the PyTorch module (``engine.model.module``) on
    ``engine.batch_size`` (or 2) random ``(3, imgsz, imgsz)`` float32 images in [0, 1].

    Raises:
        BackendError: over ``limit`` (default :data:`MAX_ABS_DIFF`), naming ``backend`` and the
            fix (``backend='torch'``).
    """
    import torch

    limit = MAX_ABS_DIFF if limit is None else limit
    g = torch.Generator().manual_seed(0)
    s = engine.imgsz
    x = torch.rand((engine.batch_size or 2, 3, s, s), generator=g)
    with torch.inference_mode():
        want = engine.model.module(x)
    want = want[0] if isinstance(want, (tuple, list)) else want
    diff = output_difference(engine.infer(x), want.float(), engine.head)
    if not diff <= limit:
        raise BackendError(
            f"model {engine.model.name!r}: {backend}'s output differs from PyTorch's by "
            f"{diff:.3g} (more than {limit}); use backend='torch'"
        )
    return diff
