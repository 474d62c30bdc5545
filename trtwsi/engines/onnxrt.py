"""Run a model with ONNX Runtime on the CPU (``Model(backend="onnxruntime")``).

On x86 CPUs ONNX Runtime's kernels run the demo yolo11n faster per tile than PyTorch's
channels_last forward (README, "How it works (CPU path)", and ``bench/results/cpu-*.json``).
The graph is made when the engine is built: the model's own module (already loaded safely by
:class:`~trtwsi.engines.model.Model`) is exported in memory by
:func:`~trtwsi.engines.onnx_export.export_onnx` (float32, dynamic batch; about a second for a
nano model). No ONNX file is read from the user's disk, so this adds nothing to what a hostile
file could do.

Before the engine is used, one batch of random images runs through both ONNX Runtime and the
PyTorch module; a difference of the raw outputs (:func:`output_difference`) over
:data:`MAX_ABS_DIFF` (px and scores; ONNX Runtime fuses and reorders float32 arithmetic, so a
few 1e-3 are normal) raises :class:`~trtwsi.errors.BackendError` instead of giving different
detections silently.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from trtwsi.engines.base import check_batch
from trtwsi.engines.onnx_export import INPUT_NAME
from trtwsi.errors import BackendError, require

__all__ = ["MAX_ABS_DIFF", "OnnxRuntimeEngine", "output_difference"]

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
        self.max_abs_diff = self._check(torch)

    def _check(self, torch) -> float:
        """Max |ONNX Runtime − PyTorch| of the raw outputs on 2 random images; BackendError
        above :data:`MAX_ABS_DIFF`."""
        g = torch.Generator().manual_seed(0)
        x = torch.rand((self.batch_size or 2, 3, self.imgsz, self.imgsz), generator=g)
        with torch.inference_mode():
            want = self.model.module(x)
        want = want[0] if isinstance(want, (tuple, list)) else want
        diff = output_difference(self.infer(x), want.float(), self.head)
        if not diff <= MAX_ABS_DIFF:
            raise BackendError(
                f"model {self.model.name!r}: ONNX Runtime's output differs from PyTorch's by "
                f"{diff:.3g} (more than {MAX_ABS_DIFF}); use backend='torch'"
            )
        return diff

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
