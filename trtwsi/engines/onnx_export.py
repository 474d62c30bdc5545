"""``.pt`` → ONNX with a dynamic batch dimension, offline.

``torch.onnx.export`` (the TorchScript exporter, as ultralytics uses) on the model's prepared
module (:attr:`trtwsi.engines.model.Model.module`: fused, eval, head kind selected), not ultralytics'
``Exporter``, which may pip-install packages. The graph:

* input ``images``: float32 ``(batch, 3, imgsz, imgsz)``, RGB in [0, 1];
* output ``output0``: float32, ``(batch, 4 + nc, N)`` (``"nms"`` head: xywh in input px, then
  sigmoid class scores) or ``(batch, max_det, 6)`` (``"end2end"``: x1 y1 x2 y2 score class);

the same tensor as ``Model.module(x)[0]``. The head's anchor grid is computed once before
tracing so it is a constant of the graph, and onnxslim (when installed) folds the remaining
shape arithmetic.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from trtwsi.errors import require

if TYPE_CHECKING:
    from trtwsi.engines.model import Model

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "detect_prefix", "export_onnx"]

DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "output0"


def detect_prefix(model: Model) -> str:
    """ONNX node-name prefix of the Detect head (``/net/model.23/``) in :func:`export_onnx`'s
    graph: the box-decode tail lives under it."""
    return f"/net/model.{len(model.module.model) - 1}/"


def export_onnx(
    model: Model, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, simplify: bool = True
) -> Path:
    """Write ``model`` as ONNX to ``path`` (float32, dynamic batch); return ``path``.

    Raises:
        MissingDependencyError: ``onnx`` is not installed (``pip install 'trtwsi[export]'``).
    """
    torch = require("torch", "torch", "Exporting a model to ONNX")
    onnx = require("onnx", "export", "Exporting a model to ONNX")
    path = Path(path)
    net = copy.deepcopy(model.module)
    s = model.imgsz
    x = torch.zeros(1, 3, s, s)
    with torch.inference_mode():
        net(x)  # caches the anchor grid for this input size: a constant in the traced graph

    class _Head0(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            _Head0(net),
            x,
            str(path),
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
        )
    proto = onnx.load(str(path))
    if simplify:
        try:
            import onnxslim
        except ImportError:
            onnxslim = None
        if onnxslim is not None:
            proto = onnxslim.slim(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path
