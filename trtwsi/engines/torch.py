"""Run an ultralytics .pt detector with PyTorch (the fallback backend, and the CPU path)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from trtwsi.engines.base import check_batch

if TYPE_CHECKING:
    from trtwsi.model import Model

__all__ = ["TorchEngine"]


class TorchEngine:
    """The model's ``torch.nn.Module`` as an :class:`~trtwsi.engines.base.Engine`.

    Args:
        model: the :class:`~trtwsi.model.Model` (its prepared ``module`` is used: fused, eval,
            with the head kind already selected).
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` …). A ``torch.device`` is
            normalized so ``"cuda"`` means the current CUDA device.
        half: compute in float16 (meant for CUDA; works but is slow on the CPU).
        batch_size: fixed batch size, or None for any.

    On the CPU in float32 the model's shared module is used as is; on another device or dtype the
    engine keeps its own copy. ``infer`` runs under ``torch.inference_mode`` and always returns
    float32. CUDA graphs (capture one forward for the fixed ``batch_size``, then replay) are a
    later addition; they belong in :meth:`_forward`.
    """

    def __init__(
        self,
        model: Model,
        device: str | torch.device = "cpu",
        half: bool = False,
        batch_size: int | None = None,
    ):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.model = model
        self.device = device
        self.dtype = torch.float16 if half else torch.float32
        self.batch_size = batch_size
        self.imgsz = model.imgsz
        self.head = model.head
        module = model.module
        if device.type != "cpu" or half:
            module = copy.deepcopy(module).to(device=device, dtype=self.dtype)
        self.module = module

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """One eval forward; ultralytics heads return ``(y, extras)``, take ``y``."""
        y = self.module(x)
        return y[0] if isinstance(y, (tuple, list)) else y

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """See :meth:`trtwsi.engines.base.Engine.infer`."""
        check_batch(self, batch)
        with torch.inference_mode():
            y = self._forward(batch.to(self.dtype))
        if y.ndim != 3:  # pragma: no cover - guarded by Model's head checks
            raise RuntimeError(f"{self.model.name}: unexpected head output shape {tuple(y.shape)}")
        return y.float()

    def __repr__(self) -> str:
        return (
            f"TorchEngine(model={self.model.name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
            f"batch_size={self.batch_size}, head={self.head!r})"
        )
