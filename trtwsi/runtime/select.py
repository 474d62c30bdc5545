"""What a :class:`~trtwsi.runtime.Runtime` runs on: the device, whether the GPU pipeline runs,
the default batch, and the GPU tissue probe (used by the Runtime and the Predictor façade)."""

from __future__ import annotations

from trtwsi.errors import BackendError, DeviceError, UsageError

__all__ = [
    "GPU_BATCH",
    "default_batch",
    "device_index",
    "gpu_tissue_probe",
    "pick_device",
    "pick_pipeline",
]


#: Tiles per forward on the GPU pipeline when none is given. On the H100 (16 host cores) batch
#: 64 ran the 1 Gpx synthetic slide in 0.519 s vs 0.561 s at 32 and the 4 Gpx one in 1.51-1.53 s
#: vs 1.55 s (1.28-1.38 s vs 1.39-1.42 s in a warm runtime), with half the host launch time;
#: 128 was slower (1.69 s) (``bench/results/slides-nvidia-h100-batch-switch.json``); in memory 32
#: and 64 were equal (``bench/results/pipeline-nvidia-h100-batch-sweep.json``).
GPU_BATCH = 64


def default_batch(device: str, gpu_pipeline: bool, models=()) -> int:
    """Tiles per forward when none is given: :data:`GPU_BATCH` on the GPU pipeline, 8 for torch
    on CUDA without it, 2 on the CPU. On the CPU a larger batch costs more CPU per tile (larger
    temporaries, worse cache use): ``bench/bench_cpu.py`` on 2 AMD EPYC cores gave 5.5 / 5.1 /
    5.1 tiles/s at batch 1 / 2 / 8 with 1 thread and 7.9 / 8.7 / 7.3 with 2
    (``bench/results/cpu-amd-epyc-2c.json``).

    On the GPU pipeline, a model of ``models`` (:class:`~trtwsi.engines.model.Model`) whose
    TensorRT engines fit ``device`` only at smaller batches (an engine built for batches up to
    32, ``export.build``'s default) lowers the batch to the largest power of two they accept,
    so the default never leaves a fitting engine unused."""
    if not gpu_pipeline:
        return 8 if device.startswith("cuda") else 2
    batch = GPU_BATCH
    for m in models:
        if _runs_engine(m, device, batch) or not _runs_engine(m, device, None):
            continue
        while batch > 1 and not _runs_engine(m, device, batch):
            batch //= 2
    return batch


def _runs_engine(model, device: str, batch: int | None) -> bool:
    """Whether ``model`` would run a TensorRT engine on ``device`` at ``batch`` (None: any)."""
    try:
        return model.resolve_backend(device, batch)[0] == "tensorrt"
    except BackendError:
        return False


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
