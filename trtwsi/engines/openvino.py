"""Run a model with OpenVINO on the CPU (``Model(backend="openvino")``).

OpenVINO's CPU plugin ran the demo yolo11n 1.26–1.38× faster per tile than PyTorch's
channels_last forward and 1.06–1.15× faster than ONNX Runtime on a 2-core AMD EPYC, float32,
same outputs within 0.005 (README, "How it works (CPU path)", ``bench/results/cpu-*.json``).

The graph is exported in memory and checked against PyTorch at build
(:mod:`trtwsi.engines.cpu_graph`); OpenVINO's ONNX front end reads it and compiles it for the
CPU. Nothing is converted with OpenVINO's model-conversion tools (those carry its telemetry; the
runtime used here does not). Precision is pinned to float32 (on CPUs with bf16 units OpenVINO
would otherwise lower it).
"""

from __future__ import annotations

from trtwsi.engines.cpu_graph import CpuGraphEngine

__all__ = ["OpenVinoEngine"]


class OpenVinoEngine(CpuGraphEngine):
    """The model's float32 graph compiled by OpenVINO for the CPU (arguments:
    :class:`~trtwsi.engines.cpu_graph.CpuGraphEngine`, and ``shape_batch``). Threads are not
    pinned to cores: the reader threads share them.

    The graph is compiled for a static batch, ``batch_size`` or else ``shape_batch`` (the batch
    the caller mostly runs): on 2 EPYC cores that took about 40 MB less memory than a dynamic
    batch, at the same speed. With ``batch_size`` None, other batches still run: a smaller one
    is padded (with zeros; those outputs are dropped), a larger one split. Without either, the
    batch stays dynamic.
    """

    backend = "OpenVINO"
    module = "openvino"
    extra = "openvino"

    def __init__(self, model, batch_size=None, threads=None, shape_batch: int | None = None):
        if shape_batch is not None and (not isinstance(shape_batch, int) or shape_batch <= 0):
            raise ValueError(f"shape_batch must be a positive int or None, got {shape_batch!r}")
        #: the compiled static batch, or None (dynamic)
        self.shape_batch = batch_size if batch_size is not None else shape_batch
        super().__init__(model, batch_size, threads)

    def _load(self, ov, path) -> None:
        core = ov.Core()
        net = core.read_model(str(path))
        if self.shape_batch is not None:
            net.reshape([self.shape_batch, 3, self.imgsz, self.imgsz])
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

    def _run(self, x):
        b = self.shape_batch
        if b is None or len(x) == b:
            return self._request.infer({0: x})[self._output]  # a copy (share_outputs=False)
        import numpy as np

        outs = []
        for i in range(0, len(x), b):
            part = x[i : i + b]
            n = len(part)
            if n < b:
                part = np.concatenate([part, np.zeros((b - n, *part.shape[1:]), part.dtype)])
            outs.append(self._request.infer({0: part})[self._output][:n])
        return np.concatenate(outs)

    def close(self) -> None:
        self._request = None
        self.compiled = None
