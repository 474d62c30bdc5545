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
    :class:`~trtwsi.engines.cpu_graph.CpuGraphEngine`). A dynamic batch ran as fast as a static
    one here. Threads are not pinned to cores: the reader threads share them."""

    backend = "OpenVINO"
    module = "openvino"
    extra = "openvino"

    def _load(self, ov, path) -> None:
        core = ov.Core()
        self.compiled = core.compile_model(
            core.read_model(str(path)),
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
        return self._request.infer({0: x})[self._output]  # a copy (share_outputs=False)

    def close(self) -> None:
        self._request = None
        self.compiled = None
