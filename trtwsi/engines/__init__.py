"""Inference backends behind one :class:`~trtwsi.engines.base.Engine` protocol.

``base``: the protocol. ``torch``: :class:`~trtwsi.engines.torch.TorchEngine`, the .pt run with
PyTorch. TensorRT engines come later. Submodules are imported where used (``torch`` is heavy).
"""

from trtwsi.engines.base import Engine, check_batch

__all__ = ["Engine", "check_batch"]
