"""Run a model with OpenVINO on the CPU (``Model(backend="openvino")``).

OpenVINO's CPU plugin ran the demo yolo11n 1.26–1.38× faster per tile than PyTorch's
channels_last forward and 1.06–1.15× faster than ONNX Runtime on a 2-core AMD EPYC, float32,
same outputs within 0.005 (README, "How it works (CPU path)", ``bench/results/cpu-*.json``).

As with ONNX Runtime (:mod:`trtwsi.engines.onnxrt`), the graph is the model's own module
(already loaded safely by :class:`~trtwsi.engines.model.Model`) exported in memory by
:func:`~trtwsi.engines.onnx_export.export_onnx` (float32, dynamic batch) into a private
temporary folder, read by OpenVINO's ONNX front end and compiled for the CPU. No model file of
the user's is read, and nothing is converted with OpenVINO's model-conversion tools (those
carry its telemetry; the runtime used here does not). Precision is pinned to float32 (on CPUs
with bf16 units OpenVINO would otherwise lower it), and one random batch is compared with
PyTorch at build (:func:`~trtwsi.engines.graph_check.check_against_torch`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from trtwsi.engines.base import check_batch
from trtwsi.engines.graph_check import check_against_torch
from trtwsi.errors import require

__all__ = ["OpenVinoEngine"]


class OpenVinoEngine:
    """The model's float32 graph compiled by OpenVINO for the CPU.

    Args:
        model: the :class:`~trtwsi.engines.model.Model`.
        batch_size: fixed batch size or None (any: the graph keeps a dynamic batch, which ran
            as fast as a static one here).
        threads: OpenVINO inference threads (None: ``torch.get_num_threads()``, so
            ``Runtime(threads=…)`` / ``--threads`` govern every backend alike). Threads are
            not pinned to cores: the reader threads share them.

    ``infer`` takes and returns CPU torch tensors, float32, as every engine does.
    """

    def __init__(self, model, batch_size: int | None = None, threads: int | None = None):
        torch = require("torch", "torch", "The OpenVINO backend")
        ov = require("openvino", "openvino", "The OpenVINO backend")
        require("onnx", "openvino", "The OpenVINO backend")
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
        self.threads = int(threads or torch.get_num_threads())
        core = ov.Core()
        with tempfile.TemporaryDirectory(prefix="trtwsi-openvino-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx", simplify=False)
            net = core.read_model(str(path))
        self.compiled = core.compile_model(
            net,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",
                "ENABLE_CPU_PINNING": False,
            },
        )
        self._request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)
        self.max_abs_diff = check_against_torch(self, "OpenVINO")

    def infer(self, batch):
        """See :meth:`trtwsi.engines.base.Engine.infer`."""
        import torch

        check_batch(self, batch)
        x = batch.detach().to(torch.float32).contiguous().numpy()
        y = self._request.infer({0: x})[self._output]  # a copy (share_outputs=False)
        return torch.from_numpy(y)

    def close(self) -> None:
        self._request = None
        self.compiled = None

    def __repr__(self) -> str:
        return (
            f"OpenVinoEngine(model={self.model.name!r}, batch_size={self.batch_size}, "
            f"threads={self.threads}, head={self.head!r})"
        )
