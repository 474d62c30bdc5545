"""What the CPU graph backends (ONNX Runtime, OpenVINO) share: how the graph is made, checked
and fed.

The graph is the model's own module (already loaded safely by
:class:`~trtwsi.engines.model.Model`) exported in memory by
:func:`~trtwsi.engines.onnx_export.export_onnx` (float32, dynamic batch; about a second for a
nano model) into a private temporary folder that is gone before the engine is used. No model
file of the user's is read, so a backend adds nothing to what a hostile file could do. After
the backend has loaded the graph, one random batch is compared with PyTorch
(:func:`~trtwsi.engines.graph_check.check_against_torch`): a broken conversion raises
:class:`~trtwsi.errors.BackendError` instead of giving different detections silently.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from trtwsi.engines.base import check_batch
from trtwsi.engines.graph_check import check_against_torch
from trtwsi.errors import require

__all__ = ["CpuGraphEngine"]


class CpuGraphEngine:
    """Base of a CPU graph backend. Subclasses set ``backend`` (its name in messages),
    ``module`` and ``extra`` (the Python module it needs and the pip extra that brings it), and
    implement :meth:`_load` and :meth:`_run`.

    Args:
        model: the :class:`~trtwsi.engines.model.Model`.
        batch_size: fixed batch size or None (any: the graph keeps a dynamic batch).
        threads: the backend's inference threads (None: ``torch.get_num_threads()``, so
            ``Runtime(threads=…)`` / ``--threads`` govern every backend alike).

    ``infer`` takes and returns CPU torch tensors, float32, as every engine does.
    """

    backend = ""
    module = ""
    extra = ""

    def __init__(self, model, batch_size: int | None = None, threads: int | None = None):
        torch = require("torch", "torch", f"The {self.backend} backend")
        lib = require(self.module, self.extra, f"The {self.backend} backend")
        require("onnx", self.extra, f"The {self.backend} backend")
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
        with tempfile.TemporaryDirectory(prefix="trtwsi-graph-") as tmp:
            path = export_onnx(model, Path(tmp) / "model.onnx", simplify=False)
            self._load(lib, path)
        self.max_abs_diff = check_against_torch(self, self.backend)
        _return_free_memory()  # the export's and the check's temporaries, before any tile runs

    def _load(self, lib, path: Path) -> None:
        """Load the exported ONNX file at ``path`` (deleted afterwards) with ``lib`` (the
        imported ``module``)."""
        raise NotImplementedError

    def _run(self, x):
        """The raw head output (float32 ndarray) of a float32 ``(B, 3, imgsz, imgsz)`` ndarray."""
        raise NotImplementedError

    def infer(self, batch):
        """See :meth:`trtwsi.engines.base.Engine.infer`."""
        import torch

        check_batch(self, batch)
        return torch.from_numpy(self._run(batch.detach().to(torch.float32).contiguous().numpy()))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={self.model.name!r}, batch_size={self.batch_size}, "
            f"threads={self.threads}, head={self.head!r})"
        )


def _return_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; nothing elsewhere), so the
    build's temporaries (~100 MB: the ONNX export and the PyTorch check) do not stay in the
    process' resident set while the slide runs."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
