"""The Engine protocol: one forward pass of a detector on a batch of model inputs.

An engine is the only backend-specific piece of the pipeline. Around it everything is shared:
the preprocess op produces its input, the decode/NMS ops consume its output
(:mod:`trtwsi.ops`). Implementations: :class:`trtwsi.engines.torch.TorchEngine` (the .pt with
PyTorch); TensorRT engines come later and implement the same protocol.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["Engine", "check_batch"]


@runtime_checkable
class Engine(Protocol):
    """A detector ready to run on one device.

    Attributes:
        batch_size: the fixed batch size the engine was built/captured for, or None when any
            batch size works. Callers pad the last batch up to a fixed size.
        imgsz: side of the square model input in px.
        dtype: dtype the engine computes in (``torch.float32`` or ``torch.float16``); inputs of
            another float dtype are cast.
        device: the ``torch.device`` inputs must live on and outputs are returned on.
        head: ``"nms"`` or ``"end2end"``, the layout of :meth:`infer`'s output.
    """

    batch_size: int | None
    imgsz: int
    dtype: torch.dtype
    device: torch.device
    head: str

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """Run the detector.

        Args:
            batch: ``(B, 3, imgsz, imgsz)`` float RGB in [0, 1] (the letterboxed tiles from
                :func:`trtwsi.ops.reference.preprocess`), on ``self.device``; ``B ==
                batch_size`` when that is fixed.

        Returns:
            float32 raw head output on ``self.device``: ``(B, 4 + nc, N)`` for ``head="nms"``
            (xywh in input px, then sigmoid class scores per anchor), ``(B, K, 6)`` for
            ``head="end2end"`` (``x1, y1, x2, y2, score, class_id`` in input px).
        """
        ...

    def close(self) -> None:
        """Release what the engine holds on its device (CUDA graph, buffers, execution context);
        the engine cannot run afterwards. Idempotent."""
        ...


def check_batch(engine: Engine, batch: torch.Tensor) -> None:
    """Raise ValueError unless ``batch`` is a valid :meth:`Engine.infer` input for ``engine``."""
    import torch

    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"engine input must be a torch.Tensor, got {type(batch).__name__}")
    s = engine.imgsz
    if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, s, s):
        raise ValueError(
            f"engine input must have shape (B, 3, {s}, {s}), got {tuple(batch.shape)}; letterbox the "
            f"tiles to the model's imgsz={s} first (trtwsi.ops.reference.preprocess)"
        )
    if engine.batch_size is not None and batch.shape[0] != engine.batch_size:
        raise ValueError(
            f"this engine runs batches of exactly {engine.batch_size}, got {batch.shape[0]}; pad "
            "the last batch"
        )
    if not batch.is_floating_point():
        raise ValueError(f"engine input must be float in [0, 1], got dtype {batch.dtype}")
    if batch.device != engine.device:
        raise ValueError(
            f"engine input is on {batch.device} but the engine runs on {engine.device}; move it "
            "there first (no hidden transfers)"
        )
