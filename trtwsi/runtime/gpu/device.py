"""CUDA plumbing for the tile pipeline: device facts, our own streams, events, pinned buffers.

Everything GPU-specific that is not a kernel lives here, so the rest of the package imports
without CUDA. Nothing in this module synchronizes the whole device: waits are on one event
(``Event.synchronize``) or expressed as stream → event dependencies (``Stream.wait_event``).

Streams are created by CuPy (``cupy.cuda.Stream(non_blocking=True)``: they never wait on the
legacy default stream) and handed to torch as ``torch.cuda.ExternalStream``, so CuPy kernels and
torch ops (the torch backend's forward, CUDA-graph replay, copies) queue on the same stream.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from trtwsi.errors import DeviceError, MissingDependencyError

__all__ = [
    "DeviceInfo",
    "GpuStreams",
    "device_info",
    "gpu_available",
    "gpu_unavailable_reason",
]


def gpu_unavailable_reason() -> str | None:
    """Why the CuPy GPU pipeline cannot run here (a sentence), or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install 'trtwsi[torch]')"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install 'trtwsi[gpu]', e.g. cupy-cuda13x for CUDA 13)"
    return None


def gpu_available() -> bool:
    """True when a CUDA GPU, torch with CUDA and CuPy are all present."""
    return gpu_unavailable_reason() is None


def _require_gpu(purpose: str) -> None:
    why = gpu_unavailable_reason()
    if why is not None:
        if "not installed" in why:
            raise MissingDependencyError(f"{purpose} needs a CUDA GPU with CuPy: {why}")
        raise DeviceError(f"{purpose} needs a CUDA GPU: {why}; use device='cpu'")


@dataclass(frozen=True)
class DeviceInfo:
    """Facts about one CUDA device.

    ``compute_capability``: ``(major, minor)``; ``driver_version`` / ``runtime_version``: CUDA
    versions as ``"13.0"`` strings (driver: the newest CUDA the driver supports; runtime: the
    CUDA runtime torch was built with unless cuda-python reports the loaded one).
    """

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_gib: float
    multiprocessors: int
    driver_version: str | None
    runtime_version: str | None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        return d


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.cache
def device_info(index: int = 0) -> DeviceInfo:
    """Describe CUDA device ``index`` (torch for the properties, cuda-python for the driver and
    runtime versions when it is installed)."""
    import torch

    _require_gpu("device_info")
    p = torch.cuda.get_device_properties(index)
    driver = runtime = None
    try:
        from cuda.bindings import runtime as cudart

        err, v = cudart.cudaDriverGetVersion()
        if int(err) == 0:
            driver = _cuda_version(int(v))
        err, v = cudart.cudaRuntimeGetVersion()
        if int(err) == 0:
            runtime = _cuda_version(int(v))
    except ImportError:  # cuda-python is optional: fall back to what torch knows
        runtime = torch.version.cuda
    return DeviceInfo(
        index=index,
        name=p.name,
        compute_capability=(p.major, p.minor),
        total_memory_gib=round(p.total_memory / 2**30, 2),
        multiprocessors=p.multi_processor_count,
        driver_version=driver,
        runtime_version=runtime,
    )


class GpuStreams:
    """A copy, a compute and a decode stream of our own on one device.

    Get them with :meth:`for_device`: one set per device per process, never destroyed (like
    torch's own stream pool), so no tensor, event or cached allocation can outlive its stream.

    ``copy`` carries host → device uploads of slide chunks; ``compute`` carries preprocess,
    inference, decode/NMS and the small device → host result copies; ``decode`` carries the
    GPU JPEG decode of slide chunks (:mod:`~trtwsi.runtime.gpu.jpeg_lane`). All are
    ``torch.cuda.ExternalStream`` over CuPy non-blocking streams (``copy_cupy``,
    ``compute_cupy``, ``decode_cupy`` are the CuPy objects; keep this object alive while the
    streams are in use).
    """

    def __init__(self, device: int | str = 0):
        import cupy
        import torch

        _require_gpu("the GPU pipeline")
        dev = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        if dev.type != "cuda":
            raise DeviceError(f"GpuStreams needs a CUDA device, got {device!r}")
        self.device = torch.device("cuda", dev.index if dev.index is not None else 0)
        with cupy.cuda.Device(self.device.index):
            self.copy_cupy = cupy.cuda.Stream(non_blocking=True)
            self.compute_cupy = cupy.cuda.Stream(non_blocking=True)
            self.decode_cupy = cupy.cuda.Stream(non_blocking=True)
        self.copy = torch.cuda.ExternalStream(self.copy_cupy.ptr, device=self.device)
        self.compute = torch.cuda.ExternalStream(self.compute_cupy.ptr, device=self.device)
        self.decode = torch.cuda.ExternalStream(self.decode_cupy.ptr, device=self.device)

    @classmethod
    def for_device(cls, device: int | str = 0) -> GpuStreams:
        """The process-wide stream pair of ``device``."""
        import torch

        dev = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index not in _STREAMS:
            _STREAMS[index] = cls(index)
        return _STREAMS[index]

    def event(self, timing: bool = False):
        """A new ``torch.cuda.Event`` (``timing=True`` to measure elapsed time with it)."""
        import torch

        return torch.cuda.Event(enable_timing=timing)


_STREAMS: dict[int, GpuStreams] = {}
