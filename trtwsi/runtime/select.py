"""What a :class:`~trtwsi.runtime.Runtime` runs on: the device, whether the GPU pipeline runs,
the default batch, and the GPU tissue probe (used by the Runtime and the Predictor façade)."""

from __future__ import annotations

from trtwsi.errors import DeviceError, UsageError

__all__ = ["default_batch", "device_index", "gpu_tissue_probe", "pick_device", "pick_pipeline"]


def default_batch(device: str, gpu_pipeline: bool) -> int:
    """Tiles per forward when none is given: 32 on the GPU pipeline, 8 for torch on CUDA without
    it, 2 on the CPU. On the CPU a larger batch costs more CPU per tile (larger temporaries, worse
    cache use): ``bench/bench_cpu.py`` on 2 AMD EPYC cores gave 5.5 / 5.1 / 5.1 tiles/s at batch
    1 / 2 / 8 with 1 thread and 7.9 / 8.7 / 7.3 with 2 (``bench/results/cpu-amd-epyc-2c.json``)."""
    if gpu_pipeline:
        return 32
    return 8 if device.startswith("cuda") else 2


def gpu_tissue_probe(index: int):
    """A warmed :class:`~trtwsi.runtime.gpu.tissue.GpuTissue` on CUDA device ``index``, or the
    reason there is none (a string)."""
    from trtwsi.runtime.gpu.tissue import GpuTissue, gpu_tissue_available

    if not gpu_tissue_available():
        return "needs cupyx.scipy.ndimage (pip install 'trtwsi[gpu]')"
    t = GpuTissue(index)
    return t if t.warm() else f"it failed on cuda:{index}: {t.failed}"


def device_index(device: str) -> int:
    return int(device.partition(":")[2] or 0)


def pick_device(device: str) -> str:
    """``"auto"`` → ``"cuda"`` if torch sees a GPU, else ``"cpu"``; checks a CUDA request."""
    import torch

    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or device.startswith("cuda:")
    ):
        raise UsageError(
            f"device={device!r} is not a device: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device={device!r} asked for, but torch sees no CUDA GPU; use device='cpu'"
            )
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(
                f"device={device!r}: torch sees {torch.cuda.device_count()} GPU(s) "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    return device


def pick_pipeline(device: str, want: bool | None) -> bool:
    """Whether the GPU pipeline runs (see :class:`Runtime`)."""
    if not device.startswith("cuda"):
        if want:
            raise DeviceError(f"gpu_pipeline=True needs a CUDA device, but device={device!r}")
        return False
    from trtwsi.runtime.gpu.device import gpu_unavailable_reason

    why = gpu_unavailable_reason()
    if want and why is not None:
        raise DeviceError(f"gpu_pipeline=True but the GPU pipeline cannot run: {why}")
    return why is None if want is None else bool(want)
