"""Run an ultralytics .pt detector with PyTorch (the fallback backend, and the CPU path)."""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trtwsi._util.env import env_setting
from trtwsi.engines.base import check_batch
from trtwsi.engines.compiled import compiled_dir, first_output, obtain, private_dir, user_cache
from trtwsi.errors import BackendError, UsageError

if TYPE_CHECKING:
    from trtwsi.engines.model import Model

__all__ = ["TorchEngine", "compile_cache_dir"]


def compile_cache_dir() -> Path:
    """The folder where ``torch.compile`` (TorchInductor) keeps the kernels it compiles for
    trtwsi, set as ``$TORCHINDUCTOR_CACHE_DIR`` for this process; returned.

    ``$TORCHINDUCTOR_CACHE_DIR`` when the user set it, else ``$XDG_CACHE_HOME/trtwsi/inductor``
    (``~/.cache/trtwsi/inductor``), made private (0700). Inductor imports the Python and
    shared-library files it finds there, so the folder is code this process runs: trtwsi's
    default is refused (:class:`~trtwsi.errors.BackendError`) when another user owns it or
    others may write to it, where torch's own default (a folder in ``/tmp``) would be used
    as found. A warm cache is what makes a later process's compile take seconds, not tens of
    seconds (measured on an H100, demo yolo11n: 13–21 s cold, 2–3.5 s warm).
    """
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    path = private_dir(user_cache("inductor"), "torch.compile cache", "TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


class TorchEngine:
    """The model's ``torch.nn.Module`` as an :class:`~trtwsi.engines.base.Engine`.

    Args:
        model: the :class:`~trtwsi.engines.model.Model` (its prepared ``module`` is used: fused, eval,
            with the head kind already selected).
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"`` …). A ``torch.device`` is
            normalized so ``"cuda"`` means the current CUDA device.
        half: compute in float16 (meant for CUDA; works but is slow on the CPU).
        batch_size: fixed batch size, or None for any.

        channels_last: run the convolutions in NHWC memory layout (weights converted once, the
            input converted inside the forward, or inside the CUDA graph). Same arithmetic,
            faster kernels: on a 2-core x86 CPU the demo yolo11n ran 1.9× (batch 1) to 3.8×
            (batch 8) more tiles/s (shared, noisy machine), and ultralytics does the same on x86
            CPUs; the issue measured 1.17–1.23× on an H200. Default on.
        cuda_graph: on CUDA with a fixed ``batch_size``, capture one forward as a CUDA graph on
            the first :meth:`infer` and replay it afterwards (falls back to eager forwards, with
            a warning naming the error, if the capture fails).
        compile: on CUDA, compile the forward with TorchInductor (fused Triton kernels, static
            shapes, the whole graph) on its first call, which the CUDA graph then replays.
            1.9× the eager forward's tiles/s for the demo yolo11n on an H100 (11,000–11,500 vs
            5,870–6,040 at batch 64–128). By default ``torch.compile`` compiles it in this
            process, in every process (13–21 s cold, 2–8 s with a warm
            :func:`compile_cache_dir`). With ``TRTWSI_COMPILE_PACKAGE=1`` and a fixed
            ``batch_size`` (**experimental: on an H100 with torch 2.11 loading one segfaulted
            in 6 of 9 loads**, README; it warns) it is an AOTInductor package kept on disk
            (:mod:`trtwsi.engines.compiled`): built once per model, batch, GPU and torch version
            by a child process, loaded by later runs (``compiled_by``: "package built" /
            "package loaded"); a package that cannot be built or loaded warns and
            ``torch.compile`` runs. A compile that fails warns, naming the error, and the eager
            forward runs. Default off. Refused (UsageError) on the CPU.

    The engine keeps its own copy of the model's module (moved to its device, dtype and memory
    layout); the Model's shared module is never changed. ``infer`` runs under ``torch.inference_mode`` and always returns
    float32.

    With a CUDA graph the engine owns a static input ``self.input`` ``(batch_size, 3, imgsz,
    imgsz)`` of ``self.dtype``, in NHWC memory (``torch.channels_last``) when ``channels_last``
    is on: a caller that writes its batch there (the GPU pipeline's
    preprocess kernel does) saves a copy; any other tensor is copied into it. The graph is
    replayed on the caller's current stream (``torch.cuda.current_stream()``), nothing is
    synchronized, and the returned float32 output is a static buffer overwritten by the next
    ``infer`` (consume it on the same stream first).
    """

    def __init__(
        self,
        model: Model,
        device: str | torch.device = "cpu",
        half: bool = False,
        batch_size: int | None = None,
        cuda_graph: bool = True,
        channels_last: bool = True,
        compile: bool = False,
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
        self.channels_last = bool(channels_last)
        if compile and device.type != "cuda":
            raise UsageError(
                f"compile=True compiles the forward for a CUDA GPU (TorchInductor's Triton "
                f"kernels); this engine is on {device}: drop compile, or pick a CUDA device"
            )
        self.compile = bool(compile)
        # a package has one static shape: only with a fixed batch
        self._package_wanted = (
            self.compile and batch_size is not None and env_setting("TRTWSI_COMPILE_PACKAGE") == "1"
        )
        if self.compile:
            compile_cache_dir()
        if self._package_wanted:
            compiled_dir()  # not private: refused now, not after minutes of warm-up
        #: seconds the compile took (in the first forward), None before it or without compile
        self.compile_seconds: float | None = None
        self._compiled = None
        #: how the compiled forward came: "package loaded" (from the cache), "package built",
        #: "torch.compile" (in this process); "" before the first forward or without compile
        self.compiled_by = ""
        #: the AOTInductor package file in use (None without one)
        self.package: Path | None = None
        module = model.module
        if device.type != "cpu" or half or self.channels_last:
            module = copy.deepcopy(module).to(device=device, dtype=self.dtype)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        self.input = None
        self._graph = None
        self._output = None
        self.use_graph = bool(cuda_graph and device.type == "cuda" and batch_size is not None)
        if self.use_graph:
            # channels_last: NHWC memory, which the preprocess kernel writes directly, so the
            # forward's first conversion is a no-op
            self.input = torch.zeros(
                (batch_size, 3, self.imgsz, self.imgsz), dtype=self.dtype, device=device
            ).contiguous(memory_format=self._layout)
        if self._package_wanted:
            # here, where the engine is built, before the runtime's threads start: a package
            # that cannot be built or loaded shows at once. (On an H100 with torch 2.11 the
            # load segfaulted inside AOTIModelPackageLoader in any thread: README.)
            self._compiled = self._package()

    @property
    def _layout(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """One eval forward (compiled on its first call with ``compile``)."""
        if not self.compile:
            return self._eager(x)
        if self._compiled is None:
            t0 = time.perf_counter()
            # one eager forward first: ultralytics' head builds its anchor grid on its first
            # call (an op Dynamo cannot trace: "pending unbacked symbols"), and reuses it while
            # the input shape stays (the compiled code takes it as a constant)
            y = self._eager(x)
            compiled = self._compile(x)
            if compiled is None:
                return y
            self._compiled = compiled
            self.compile_seconds = time.perf_counter() - t0
        if self.package is not None and x.shape != (self.batch_size, 3, self.imgsz, self.imgsz):
            return self._eager(x)  # a package has one static shape: others run eager
        return self._compiled(x.contiguous(memory_format=self._layout))

    def _package(self):
        """The AOTInductor package's forward (loaded from the private cache, or built there
        first; :mod:`trtwsi.engines.compiled`), run once on zeros of the static shape; None,
        with a warning naming the error, when it cannot be built, loaded or run (the first
        forward then compiles with ``torch.compile``)."""
        warnings.warn(
            f"{self.model.name}: TRTWSI_COMPILE_PACKAGE=1 is experimental: on an H100 with torch "
            "2.11 loading a compiled package segfaulted in 6 of 9 loads, which ends this process "
            "(README, 'The compiled model kept on disk'); unset it to compile with torch.compile",
            RuntimeWarning,
            stacklevel=4,
        )
        t0 = time.perf_counter()
        x = torch.zeros(
            (self.batch_size, 3, self.imgsz, self.imgsz), dtype=self.dtype, device=self.device
        ).contiguous(memory_format=self._layout)
        try:
            fn, how, path = obtain(
                self.model, self.device, self.dtype, self.batch_size, self.channels_last
            )
            with torch.inference_mode():
                fn(x)  # fails here, not in the graph capture, if the package cannot run
        except BackendError:
            raise
        except Exception as e:  # the build failed or crashed (PackageBuildError), or the load
            warnings.warn(
                f"{self.model.name}: the compiled package could not be built or loaded "
                f"({type(e).__name__}: {str(e)[:300]}); compiling with torch.compile in "
                "this process instead",
                stacklevel=4,
            )
            return None
        self.compiled_by, self.package = f"package {how}", path
        self.compile_seconds = time.perf_counter() - t0
        return fn

    def _compile(self, x: torch.Tensor):
        """The forward compiled by ``torch.compile`` in this process for inputs like ``x``, or
        None (compile off from now, with a warning naming the error)."""
        x = x.contiguous(memory_format=self._layout)
        try:
            fn = torch.compile(self._eager, fullgraph=True, dynamic=False)
            fn(x)
        except Exception as e:  # no Triton, no C compiler, an op Inductor cannot lower
            warnings.warn(
                f"{self.model.name}: torch.compile failed ({type(e).__name__}: "
                f"{str(e)[:300]}); running the eager forward instead",
                stacklevel=4,
            )
            self.compile = False
            return None
        self.compiled_by = "torch.compile"
        return fn

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        """One eval forward; ultralytics heads return ``(y, extras)``, take ``y``."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return first_output(self.module(x))

    def _capture(self) -> None:
        """Warm up on a side stream, then capture ``self.input`` → float32 output as a graph.

        One-time setup: ``torch.cuda.graph`` synchronizes the device on entry (not in the steady
        state). Warm-up forwards let lazy work (ultralytics' anchor grids, cuDNN algorithm
        choice) happen outside the capture.
        """
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(3):
                self._forward(self.input)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (planners running CuPy, reader threads)
        # may allocate and synchronize meanwhile; only this thread's calls are checked
        with torch.inference_mode(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._output = self._forward(self.input).float()
        self._graph = graph

    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """See :meth:`trtwsi.engines.base.Engine.infer`."""
        check_batch(self, batch)
        if self.use_graph:
            if self._graph is None:
                try:
                    self._capture()
                except Exception as e:  # capture can fail on ops that sync with the host
                    import warnings

                    warnings.warn(
                        f"{self.model.name}: CUDA graph capture failed ({type(e).__name__}: {e}); "
                        "running eager forwards instead",
                        stacklevel=2,
                    )
                    self.use_graph = False
                    self._graph = self._output = None
            if self._graph is not None:
                if batch.data_ptr() != self.input.data_ptr():
                    self.input.copy_(batch)
                self._graph.replay()
                return self._output
        with torch.inference_mode():
            y = self._forward(batch.to(self.dtype))
        if y.ndim != 3:  # pragma: no cover - guarded by Model's head checks
            raise RuntimeError(f"{self.model.name}: unexpected head output shape {tuple(y.shape)}")
        return y.float()

    def close(self) -> None:
        """Drop the CUDA graph, its static buffers and the device copy of the module."""
        self._graph = None
        self._output = None
        self.input = None
        self.module = None
        self._compiled = None

    def __repr__(self) -> str:
        return (
            f"TorchEngine(model={self.model.name!r}, device={str(self.device)!r}, dtype={self.dtype}, "
            f"batch_size={self.batch_size}, head={self.head!r}, cuda_graph={self.use_graph}, "
            f"compile={self.compile})"
        )
