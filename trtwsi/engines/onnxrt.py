"""Run a model with ONNX Runtime on the CPU (``Model(backend="onnxruntime")``).

On x86 CPUs ONNX Runtime's kernels run the demo yolo11n faster per tile than PyTorch's
channels_last forward (README, "How it works (CPU path)", and ``bench/results/cpu-*.json``).
The graph is made when the engine is built: the model's own module (already loaded safely by
:class:`~trtwsi.engines.model.Model`) is exported in memory by
:func:`~trtwsi.engines.onnx_export.export_onnx` (float32, dynamic batch; about a second for a
nano model). No ONNX file is read from the user's disk, so this adds nothing to what a hostile
file could do.

Before the engine is used, one batch of random images runs through both ONNX Runtime and the
PyTorch module (:func:`~trtwsi.engines.graph_check.check_against_torch`): a difference over
0.05 px or score raises :class:`~trtwsi.errors.BackendError` instead of giving different
detections silently.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from trtwsi.engines.base import check_batch
from trtwsi.engines.graph_check import check_against_torch
from trtwsi.engines.onnx_export import INPUT_NAME
from trtwsi.errors import require

__all__ = ["OnnxRuntimeEngine"]


class OnnxRuntimeEngine:
    """The model's float32 graph in an ONNX Runtime CPU session.

    Args:
        model: the :class:`~trtwsi.engines.model.Model`.
        batch_size: fixed batch size or None (any: the graph has a dynamic batch).
        threads: ONNX Runtime intra-op threads (None: ``torch.get_num_threads()``, so
            ``Runtime(threads=…)`` / ``--threads`` govern both backends alike).

    ``infer`` takes and returns CPU torch tensors, float32, as every engine does.
    """

    def __init__(self, model, batch_size: int | None = None, threads: int | None = None):
        torch = require("torch", "torch", "The ONNX Runtime backend")
        ort = require("onnxruntime", "onnxruntime", "The ONNX Runtime backend")
        require("onnx", "onnxruntime", "The ONNX Runtime backend")
        from trtwsi.engines.onnx_export import export_onnx

        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.model = model
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.batch_size = batch_size
        self.imgsz = model.imgsz
        self.head = model.head
        self.input = None
        with tempfile.TemporaryDirectory(prefix="trtwsi-onnx-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx", simplify=False)
            graph = path.read_bytes()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between ops: the reader threads share these cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self.max_abs_diff = check_against_torch(self, "ONNX Runtime")

    def infer(self, batch):
        """See :meth:`trtwsi.engines.base.Engine.infer`."""
        import torch

        check_batch(self, batch)
        x = batch.detach().to(torch.float32).contiguous().numpy()
        (y,) = self.session.run(None, {INPUT_NAME: x})
        return torch.from_numpy(y)

    def close(self) -> None:
        self.session = None

    def __repr__(self) -> str:
        return (
            f"OnnxRuntimeEngine(model={self.model.name!r}, batch_size={self.batch_size}, "
            f"head={self.head!r})"
        )
