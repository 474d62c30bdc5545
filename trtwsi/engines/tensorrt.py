"""TensorRT and TensorRT-RTX behind one thin adapter, and :class:`TensorRTEngine`.

Both flavours share the Python API used here (``Runtime``, ``ICudaEngine``,
``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``). Differences
handled here: the module name (``tensorrt``; ``tensorrt_rtx``, or ``tensorrt_rtx_bindings`` as the
PyPI wheels install it), and which GPUs run the plans (TensorRT-RTX: compute capability 7.5–8.9
and 12.x, no Hopper/Blackwell datacentre parts).

**What was verified where.** Loading the modules, versions, the engine validity check and
everything up to deserialization ran with TensorRT-RTX 1.7 on a CPU-only machine. Execution
(:meth:`TensorRTEngine.infer`) is written against the documented API and could not be run on
this project's hardware (H100/H200 only; TensorRT-RTX does not run on Hopper and full TensorRT is
not installable there): its tests are marked ``tensorrt`` and skip with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtwsi.engines.sidecar import FLAVOURS, EngineMeta, RuntimeInfo, check_fit, read_sidecar
from trtwsi.errors import BackendError, EngineMismatchError, MissingDependencyError

if TYPE_CHECKING:
    import torch

__all__ = [
    "RTX_COMPUTE_CAPABILITIES",
    "TensorRTEngine",
    "TrtModule",
    "available_modules",
    "load_module",
    "runtime_info",
]

#: GPUs TensorRT-RTX builds for and runs on (its ``ComputeCapability`` enum, 1.7).
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
#: Import names tried per flavour, in order.
_IMPORT_NAMES = {
    "tensorrt": ("tensorrt",),
    "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}
INSTALL_HINT = {
    "tensorrt": (
        "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13  "
        "(full TensorRT, from NVIDIA's package index; tensorrt-cu12 for CUDA 12)"
    ),
    "tensorrt_rtx": "pip install 'trtwsi[tensorrt-rtx]'  (TensorRT-RTX for CUDA 13, from PyPI)",
}


@dataclasses.dataclass(frozen=True)
class TrtModule:
    """One importable TensorRT flavour: ``flavour`` (``"tensorrt"`` / ``"tensorrt_rtx"``), the
    imported module ``trt`` and its ``version`` string."""

    flavour: str
    trt: Any
    version: str

    @property
    def label(self) -> str:
        return f"{FLAVOURS[self.flavour]} {self.version}"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def logger(self, severity: str = "WARNING"):
        """A shared ``trt.Logger`` (TensorRT wants one logger per process)."""
        with _LOCK:
            key = (self.flavour, severity)
            if key not in _LOGGERS:
                _LOGGERS[key] = self.trt.Logger(getattr(self.trt.Logger, severity))
            return _LOGGERS[key]


_LOCK = threading.Lock()
_LOGGERS: dict = {}
_MODULES: dict[str, TrtModule | ImportError] = {}


def _import(flavour: str) -> TrtModule | ImportError:
    if flavour not in _MODULES:
        error: ImportError | None = None
        for name in _IMPORT_NAMES[flavour]:
            try:
                mod = importlib.import_module(name)
                _MODULES[flavour] = TrtModule(flavour, mod, str(mod.__version__))
                break
            except ImportError as e:
                error = error or e
            except Exception as e:  # broken install: the stub tensorrt packages raise on import
                error = ImportError(f"importing {name!r} failed: {type(e).__name__}: {e}")
        else:
            _MODULES[flavour] = error or ImportError(f"no module for {flavour}")
    return _MODULES[flavour]


def available_modules() -> dict[str, TrtModule | ImportError]:
    """Every flavour → its :class:`TrtModule`, or the ImportError saying why not."""
    return {flavour: _import(flavour) for flavour in FLAVOURS}


def load_module(flavour: str | None = None) -> TrtModule:
    """The TensorRT flavour to use: ``flavour`` (``"tensorrt"`` / ``"tensorrt_rtx"``), or with
    None the full TensorRT when importable, else TensorRT-RTX.

    Raises:
        MissingDependencyError: not importable; the message gives the pip command.
    """
    if flavour is not None and flavour not in FLAVOURS:
        raise ValueError(f"flavour={flavour!r} is not one of {list(FLAVOURS)}")
    for f in [flavour] if flavour else list(FLAVOURS):
        mod = _import(f)
        if isinstance(mod, TrtModule):
            return mod
    wanted = [flavour] if flavour else list(FLAVOURS)
    reasons = "; ".join(f"{FLAVOURS[f]}: {_import(f)}" for f in wanted)
    hints = " or ".join(INSTALL_HINT[f] for f in wanted)
    raise MissingDependencyError(
        f"no TensorRT Python module is importable ({reasons}). Install: {hints}"
    )


def cuda_device_info(device: torch.device | str | None = None) -> tuple[str | None, str | None]:
    """``(compute capability "8.6", GPU name)`` of a CUDA device via torch, or ``(None, None)``."""
    try:
        import torch
    except ImportError:
        return None, None
    try:
        if not torch.cuda.is_available():
            return None, None
        dev = torch.device(device if device is not None else "cuda")
        if dev.type != "cuda":
            return None, None
        major, minor = torch.cuda.get_device_capability(dev)
        return f"{major}.{minor}", torch.cuda.get_device_name(dev)
    except Exception:  # a broken driver: report as no GPU, doctor says more
        return None, None


def runtime_info(
    device: torch.device | str | None = None, flavour: str | None = None
) -> RuntimeInfo:
    """What can run engines on ``device``: the flavour to use (``flavour``, else the first
    importable), its version and the device's compute capability."""
    cc, name = cuda_device_info(device)
    try:
        mod = load_module(flavour)
    except MissingDependencyError:
        return RuntimeInfo(None, None, cc, name)
    return RuntimeInfo(mod.flavour, mod.version, cc, name)


# ------------------------------------------------------------------------------------------
# the runtime
# ------------------------------------------------------------------------------------------
def _check(ok: Any, what: str, fix: str = "") -> None:
    """TensorRT reports many failures as a False return (details in its log): raise on them."""
    if ok is False or ok is None:
        raise BackendError(f"TensorRT: {what} failed{'; ' + fix if fix else ''}")


class TensorRTEngine:
    """A TensorRT / TensorRT-RTX plan built by ``python -m trtwsi.export.build``, as an
    :class:`~trtwsi.engines.base.Engine`.

    Args:
        path: the ``.engine`` plan; its ``.engine.json`` sidecar must sit next to it.
        device: the CUDA device (``"cuda"``, ``"cuda:1"``).
        batch_size: fixed batch size (shapes and tensor addresses are set once), or None for
            any batch in the engine's profile (shapes re-set when the batch changes).
        cuda_graph: capture the enqueue of the fixed batch in a CUDA graph on first use and
            replay it (needs ``batch_size``).
        expect: keyword arguments of :func:`~trtwsi.engines.sidecar.check_fit` (weights hash,
            imgsz, head …) that the sidecar must satisfy.

    Attributes (the Engine protocol, plus):
        input: the persistent ``(batch_size or batch_max, 3, imgsz, imgsz)`` input tensor
            (``dtype``, on ``device``); a caller may write the batch into it and pass it (or its
            first ``B`` rows) to :meth:`infer`, which then copies nothing.
        output: the persistent float32 output tensor (``(Bmax, 4 + nc, N)`` or
            ``(Bmax, K, 6)``); :meth:`infer` returns a view of its first ``B`` rows, overwritten
            by the next call.
        meta: the :class:`~trtwsi.engines.sidecar.EngineMeta`.

    :meth:`infer` enqueues on ``torch.cuda.current_stream(device)`` and never synchronizes.
    One execution context per engine: use one engine object per stream.

    Raises:
        EngineMismatchError: the sidecar says the engine does not fit this GPU / TensorRT version
            / needs, TensorRT's own validity check rejects the plan, or deserialization fails.
        MissingDependencyError: no TensorRT flavour importable.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device = "cuda",
        batch_size: int | None = None,
        *,
        cuda_graph: bool = False,
        expect: dict | None = None,
    ):
        import torch

        self.path = Path(path)
        device = torch.device(device)
        if device.type != "cuda":
            raise BackendError(
                f"TensorRT engines run on a CUDA GPU, got device {str(device)!r}; use device='cuda' "
                "or the torch backend"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.meta: EngineMeta = read_sidecar(self.path)
        self.mod = load_module(self.meta.flavour)
        rt = runtime_info(device, self.meta.flavour)
        why = check_fit(self.meta, rt, batch=batch_size, **(expect or {}))
        if why:
            raise EngineMismatchError(f"engine {self.path.name}: {why}")
        self.imgsz, self.head = self.meta.imgsz, self.meta.head
        self.batch_size = batch_size
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and batch_size is None:
            raise ValueError("cuda_graph=True needs a fixed batch_size")

        trt = self.mod.trt
        plan = self.path.read_bytes()
        with torch.cuda.device(device):
            self._runtime = trt.Runtime(self.mod.logger())
            _check(self._runtime, "creating the Runtime")
            self._check_validity(plan)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise EngineMismatchError(
                    f"engine {self.path.name}: {self.mod.label} could not deserialize it (see the "
                    "TensorRT log above: version or GPU mismatch, or a corrupt file); rebuild it "
                    "with python -m trtwsi.export.build"
                )
            self._setup_io(torch)
            self._context = self._make_context(trt, torch)
        self._bound_batch: int | None = None
        self._graph = None
        if batch_size is not None:
            self._bind(batch_size)

    # --- setup --------------------------------------------------------------------------
    def _check_validity(self, plan: bytes) -> None:
        """TensorRT-RTX (and recent TensorRT) can vet a plan before deserializing it."""
        get_validity = getattr(self._runtime, "get_engine_validity", None)
        if get_validity is None:
            return
        validity, diagnostics = get_validity(plan)
        if validity == self.mod.trt.EngineValidity.INVALID:
            raise EngineMismatchError(
                f"engine {self.path.name}: {self.mod.label} reports it invalid here "
                f"(diagnostics {diagnostics}); rebuild it with python -m trtwsi.export.build"
            )

    def _setup_io(self, torch) -> None:
        trt, eng = self.mod.trt, self._engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise EngineMismatchError(
                f"engine {self.path.name}: expected 1 input and 1 output tensor, got inputs "
                f"{inputs} and outputs {outputs}; build it with python -m trtwsi.export.build"
            )
        self.input_name, self.output_name = inputs[0], outputs[0]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
        in_dt, out_dt = (eng.get_tensor_dtype(n) for n in (self.input_name, self.output_name))
        if in_dt not in dtypes or out_dt != trt.float32:
            raise EngineMismatchError(
                f"engine {self.path.name}: input dtype {in_dt} / output dtype {out_dt} (needs a "
                "float input and a float32 output); build it with python -m trtwsi.export.build"
            )
        self.dtype = dtypes[in_dt]
        lo, _, hi = (tuple(d) for d in eng.get_tensor_profile_shape(self.input_name, 0))
        self.batch_range = (int(lo[0]), int(hi[0]))
        self._bmax = self.batch_size or self.batch_range[1]
        s = self.imgsz
        self.input = torch.empty((self._bmax, 3, s, s), dtype=self.dtype, device=self.device)
        out_shape = (self._bmax, *self.meta.output_shape[1:])
        self.output = torch.empty(out_shape, dtype=torch.float32, device=self.device)

    def _make_context(self, trt, torch):
        """One execution context, its activation memory allocated by torch (our allocator)."""
        eng = self._engine
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None and hasattr(strategy, "USER_MANAGED"):
            ctx = eng.create_execution_context(strategy.USER_MANAGED)
            _check(ctx, f"creating an execution context for {self.path.name}")
            size = getattr(eng, "device_memory_size_v2", None) or eng.device_memory_size
            self._workspace = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
            ctx.set_device_memory(self._workspace.data_ptr(), int(size))
        else:  # pragma: no cover - older TensorRT: TensorRT allocates the activations itself
            ctx = eng.create_execution_context()
            _check(ctx, f"creating an execution context for {self.path.name}")
        return ctx

    def _bind(self, batch: int) -> None:
        """Set the input shape and both tensor addresses for ``batch`` (once per batch size)."""
        lo, hi = self.batch_range
        if not lo <= batch <= min(hi, self._bmax):
            raise EngineMismatchError(
                f"engine {self.path.name}: batch {batch} is outside its profile [{lo}, {hi}]"
                + (f" / the fixed batch_size {self.batch_size}" if self.batch_size else "")
                + "; rebuild with python -m trtwsi.export.build --batch-size N or pad the batch"
            )
        s, ctx = self.imgsz, self._context
        _check(
            ctx.set_input_shape(self.input_name, (batch, 3, s, s)),
            f"set_input_shape({self.input_name!r}, {(batch, 3, s, s)})",
            "the shape is outside the engine's optimization profile",
        )
        _check(
            ctx.set_tensor_address(self.input_name, self.input.data_ptr()),
            f"set_tensor_address({self.input_name!r})",
        )
        _check(
            ctx.set_tensor_address(self.output_name, self.output.data_ptr()),
            f"set_tensor_address({self.output_name!r})",
        )
        got = tuple(ctx.get_tensor_shape(self.output_name))
        want = (batch, *self.output.shape[1:])
        if got != want:
            raise EngineMismatchError(
                f"engine {self.path.name}: output {self.output_name!r} has shape {got} for batch "
                f"{batch}, the sidecar says {want}; rebuild it with python -m trtwsi.export.build"
            )
        self._bound_batch = batch

    # --- running ------------------------------------------------------------------------
    def infer(self, batch: torch.Tensor) -> torch.Tensor:
        """See :meth:`trtwsi.engines.base.Engine.infer`. Enqueues on the current stream of
        ``device`` and returns a view of the persistent :attr:`output` (no synchronize)."""
        import torch

        from trtwsi.engines.base import check_batch

        check_batch(self, batch)  # with batch_size None any B passes here; _bind checks the profile
        b = int(batch.shape[0])
        if batch.data_ptr() != self.input.data_ptr():
            self.input[:b].copy_(batch, non_blocking=True)
        elif not batch.is_contiguous() or batch.dtype != self.dtype:
            raise ValueError(
                f"engine.input views must be contiguous {self.dtype}, got {batch.dtype}"
            )
        if b != self._bound_batch:
            self._bind(b)
        stream = torch.cuda.current_stream(self.device)
        if self.cuda_graph:
            self._replay(stream, torch)
        else:
            _check(
                self._context.execute_async_v3(stream.cuda_stream),
                f"execute_async_v3 of {self.path.name} (batch {b})",
            )
        return self.output[:b]

    def _replay(self, stream, torch) -> None:
        """Capture one enqueue in a CUDA graph (after a warm-up enqueue, as TensorRT requires
        for lazily initialized kernels) and replay it on ``stream``."""
        if self._graph is None:
            ctx = self._context
            _check(ctx.execute_async_v3(stream.cuda_stream), f"warm-up enqueue of {self.path.name}")
            graph = torch.cuda.CUDAGraph()
            capture = torch.cuda.Stream(self.device)
            capture.wait_stream(stream)
            with torch.cuda.graph(graph, stream=capture, capture_error_mode="thread_local"):
                ok = ctx.execute_async_v3(capture.cuda_stream)
            _check(ok, f"execute_async_v3 under CUDA graph capture of {self.path.name}")
            stream.wait_stream(capture)
            self._graph = graph
        with torch.cuda.stream(stream):
            self._graph.replay()

    def close(self) -> None:
        """Free the CUDA graph, the execution context, the engine and the runtime, in that
        order (a context must go before its engine)."""
        self._graph = None
        for name in ("_context", "_engine", "_runtime"):
            if getattr(self, name, None) is not None:
                setattr(self, name, None)

    def __repr__(self) -> str:
        return (
            f"TensorRTEngine({self.path.name!r}, {self.mod.label}, device={str(self.device)!r}, "
            f"dtype={self.dtype}, batch_size={self.batch_size}, head={self.head!r})"
        )
