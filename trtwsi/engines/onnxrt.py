"""Run a model with ONNX Runtime on the CPU (``Model(backend="onnxruntime")``).

On x86 CPUs ONNX Runtime's kernels ran the demo yolo11n faster per tile than PyTorch's
channels_last forward at 1–2 threads, but slower at 4–8 Xeon threads (README, "How it works
(CPU path)", and ``bench/results/cpu-*.json``). The graph is exported in memory and checked
against PyTorch at build (:mod:`trtwsi.engines.cpu_graph`).
"""

from __future__ import annotations

from trtwsi.engines.cpu_graph import CpuGraphEngine
from trtwsi.engines.onnx_export import INPUT_NAME

__all__ = ["OnnxRuntimeEngine"]


class OnnxRuntimeEngine(CpuGraphEngine):
    """The model's float32 graph in an ONNX Runtime CPU session (arguments:
    :class:`~trtwsi.engines.cpu_graph.CpuGraphEngine`)."""

    backend = "ONNX Runtime"
    module = "onnxruntime"
    extra = "onnxruntime"

    def _load(self, ort, path) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between ops: the reader threads share these cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            path.read_bytes(), opts, providers=["CPUExecutionProvider"]
        )

    def _run(self, x):
        (y,) = self.session.run(None, {INPUT_NAME: x})
        return y

    def close(self) -> None:
        self.session = None
