"""CUDA pre/post-processing: launch wrappers over the CuPy-compiled kernels in ``trtwsi/ops/kernels/*.cu``.

Every op here computes exactly what its counterpart in :mod:`trtwsi.ops.reference` computes
(bit for bit, see ``tests/ops/test_cuda.py``), for a whole batch of tiles, on the GPU:

* :func:`preprocess` / :func:`preprocess_chunk` — crop tiles out of uint8 RGB chunks already on
  the device, letterbox them and write the model input (one launch);
* :func:`postprocess` — head output → per-tile detections in level-0 slide px (decode, class-aware
  NMS and the tile → slide mapping in two launches for an ``"nms"`` head, one for ``"end2end"``);
* :func:`decode_nms_head` — the decode step alone (compact candidates), for tests and tools.

Conventions (as CuPy's and torchvision's ops): the wrappers take and return **torch CUDA
tensors**, launch on ``torch.cuda.current_stream()`` of the tensors' device, allocate outputs and
scratch with torch on that stream (so the caching allocator orders reuse after the kernels), and
never synchronize or read a device value back. Kernels are compiled lazily with NVRTC through
``cupy.RawModule`` on first use and cached (in memory here, on disk by CuPy). This module imports
without CuPy; calling a wrapper without it raises :class:`~trtwsi.errors.MissingDependencyError`
naming the ``gpu`` extra.

Coordinate frames (see :mod:`trtwsi.ops.reference`): chunk px, tile px, input px (the square
``dst × dst`` model input) and level-0 px.

Over 500 lines: one thin launch wrapper per kernel family, all sharing the module loader and
the argument checks; each wrapper is short.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from trtwsi._util.resources import kernel_file_text, kernels_dir
from trtwsi.errors import TilingError, require
from trtwsi.ops import reference
from trtwsi.ops.reference import HEAD_KINDS, PAD_VALUE, Letterbox

__all__ = [
    "KERNEL_FAMILIES",
    "NVRTC_OPTIONS",
    "Candidates",
    "copy_async",
    "decode_nms_head",
    "kernel_source",
    "kernels_dir",
    "mapping_params",
    "postprocess",
    "preprocess",
    "preprocess_chunk",
    "tile_byte_offsets",
]

#: Kernel family → (source file, its ``extern "C"`` kernels).
KERNEL_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "preprocess": ("preprocess.cu", ("preprocess_f32", "preprocess_f16")),
    "postprocess": (
        "postprocess.cu",
        ("decode_f32", "decode_f16", "nms_scale", "end2end_f32", "end2end_f16"),
    ),
}

#: NVRTC options of every family. CuPy adds ``-arch``, ``-ftz=true``, ``-std=c++17`` and
#: ``--device-as-default-execution-space``; the kernels are written to be exact regardless of
#: ``-ftz`` and contraction (inline-PTX fp32 ops), ``--fmad=false`` is a second safeguard.
NVRTC_OPTIONS: tuple[str, ...] = ("--fmad=false",)

#: Threads per block of each launch (must match the ``#define``s of the .cu files).
_PREPROCESS_THREADS = 256
_DECODE_THREADS = 256
_NMS_THREADS = 512
_E2E_THREADS = 256
_MAX_GRID_Y = 65535

_INCLUDE_COMMON = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"common\.cuh"[ \t]*$', re.MULTILINE)


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def kernel_source(family: str) -> str:
    """The compilable source of one kernel family: its ``.cu`` file with the line
    ``#include "common.cuh"`` replaced by that header's text (so NVRTC needs no include path and
    CuPy's on-disk cache key covers the header too), read from the package
    (:func:`~trtwsi._util.resources.kernels_dir`). Pure Python, no CuPy needed.

    Raises:
        KeyError: unknown family (see :data:`KERNEL_FAMILIES`).
    """
    if family not in KERNEL_FAMILIES:
        raise KeyError(f"unknown kernel family {family!r}; expected one of {list(KERNEL_FAMILIES)}")
    text = kernel_file_text(KERNEL_FAMILIES[family][0])
    common = kernel_file_text("common.cuh")
    return _INCLUDE_COMMON.sub(lambda _: common, text, count=1)


def _cupy() -> Any:
    return require("cupy", "gpu", "trtwsi's CUDA kernels (trtwsi.ops.cuda)")


@functools.cache
def _module(family: str) -> Any:
    """The ``cupy.RawModule`` of one family (compiled per device on first use by CuPy)."""
    return _cupy().RawModule(code=kernel_source(family), options=NVRTC_OPTIONS)


@functools.cache
def _kernel(family: str, name: str, device_index: int) -> Any:
    """The ``cupy.cuda.Function`` of one kernel on one device (compiled on first use)."""
    with _cupy().cuda.Device(device_index):
        return _module(family).get_function(name).kernel


class _TorchStream:
    """A CUDA stream handle speaking the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


@functools.lru_cache(maxsize=64)
def _cupy_stream(ptr: int) -> Any:
    """A CuPy handle of the CUDA stream ``ptr`` (a plain handle: it never owns the stream)."""
    cupy = _cupy()
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14
        return from_external(_TorchStream(ptr))
    return cupy.cuda.ExternalStream(ptr)  # pragma: no cover - CuPy 13


def _launch(family: str, name: str, device: torch.device, grid, block, args) -> None:
    """Launch one kernel on ``torch.cuda.current_stream(device)``; no synchronize.

    The kernel and the stream handle are cached, and the current device is switched only when
    it differs: the host cost of a launch stays a few microseconds.
    """
    cupy = _cupy()
    index = device.index
    kernel = _kernel(family, name, index)
    stream = _cupy_stream(torch.cuda.current_stream(device).cuda_stream)
    if cupy.cuda.runtime.getDevice() == index:
        kernel(tuple(grid), tuple(block), tuple(args), stream=stream)
    else:
        with cupy.cuda.Device(index):
            kernel(tuple(grid), tuple(block), tuple(args), stream=stream)


def copy_async(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy ``src``'s bytes into ``dst`` on ``torch.cuda.current_stream()`` (one
    ``cudaMemcpyAsync``, direction from the pointers); no synchronize.

    Both contiguous with the same number of bytes; host tensors must be pinned (page-locked):
    the copy may run after this returns. Unlike ``Tensor.copy_`` it tells torch's pinned
    memory allocator nothing, so a CUDA graph may capture it: keep host buffers alive (and
    unwritten) until the copy is done.
    """
    for name, t in (("dst", dst), ("src", src)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if t.device.type != "cuda" and not t.is_pinned():
            raise ValueError(f"{name} is a host tensor that is not pinned: pin_memory() it")
    n = dst.numel() * dst.element_size()
    if src.numel() * src.element_size() != n:
        raise ValueError(
            f"dst holds {n} bytes, src {src.numel() * src.element_size()}: copy equal sizes"
        )
    dev = dst.device if dst.device.type == "cuda" else src.device
    if dev.type != "cuda":
        raise ValueError("one of dst and src must be a CUDA tensor")
    cupy = _cupy()
    stream = torch.cuda.current_stream(dev).cuda_stream
    args = (dst.data_ptr(), src.data_ptr(), n, 4, stream)  # 4: cudaMemcpyDefault
    if cupy.cuda.runtime.getDevice() == dev.index:
        cupy.cuda.runtime.memcpyAsync(*args)
    else:
        with cupy.cuda.Device(dev.index):
            cupy.cuda.runtime.memcpyAsync(*args)


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ------------------------------------------------------------------------------------------
# argument checks (host only)
# ------------------------------------------------------------------------------------------
def _check_cuda(t: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a torch CUDA tensor, got {where}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one GPU)")
    return t


def _check_out(
    t: torch.Tensor,
    name: str,
    rows: int,
    tail: tuple[int, ...],
    dtypes,
    device,
    channels_last: bool = False,
) -> torch.Tensor:
    _check_cuda(t, name, device)
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be of dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.ndim != 1 + len(tail) or t.shape[0] < rows or tuple(t.shape[1:]) != tail:
        want = ", ".join(["≥" + str(rows), *map(str, tail)])
        raise ValueError(f"{name} must have shape ({want}), got {tuple(t.shape)}")
    if not t.is_contiguous() and not (
        channels_last and t.is_contiguous(memory_format=torch.channels_last)
    ):
        raise ValueError(
            f"{name} must be contiguous" + (" (NCHW or channels_last)" if channels_last else "")
        )
    return t


def tile_byte_offsets(
    offsets: Any, chunk_shape: Sequence[int], tile_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Host-side arguments of :func:`preprocess` for tiles cut from one chunk.

    Args:
        offsets: ``(B, 2)`` ints ``(x, y)``: top-left corner of each tile in chunk px (numpy,
            list or CPU tensor; a CUDA tensor is copied to the host, which synchronizes).
        chunk_shape: ``(H, W, 3)`` of the uint8 RGB chunk.
        tile_size: ``(th, tw)`` in chunk px.

    Returns:
        ``(tile_offsets, row_strides)``, both ``(B,)`` int64: byte offset of each tile's top-left
        pixel in the chunk (``(y * W + x) * 3``) and bytes per chunk row (``W * 3``).

    Raises:
        TilingError: a tile runs outside the chunk (same rule and message as
            :func:`trtwsi.ops.reference.preprocess`) or the sizes are not positive.
    """
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.detach().cpu().numpy()
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    H, W = (int(v) for v in chunk_shape[:2])
    th, tw = (int(v) for v in tile_size)
    if th <= 0 or tw <= 0:
        raise TilingError(f"tile size must be positive, got {th}x{tw} (h x w)")
    bad = (off[:, 0] < 0) | (off[:, 1] < 0) | (off[:, 0] + tw > W) | (off[:, 1] + th > H)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        x, y = (int(v) for v in off[i])
        raise TilingError(
            f"tile {i} at (x={x}, y={y}) of size {tw}x{th} (w x h) runs outside the {W}x{H} chunk; "
            "every tile must lie inside the chunk it is cut from"
        )
    tile_offsets = (off[:, 1] * W + off[:, 0]) * 3
    return tile_offsets.astype(np.int64), np.full(len(off), W * 3, dtype=np.int64)


def mapping_params(
    letterbox: Letterbox | Sequence[float],
    tile_size: tuple[int, int],
    l0_per_px: float | tuple[float, float] = 1.0,
) -> tuple[float, ...]:
    """The float64 constants of the input px → level-0 px mapping, as the kernels take them.

    Returns ``(pad_x, pad_y, hi_x, hi_y, gx, gy, sx, sy)``: the letterboxed content spans input
    px ``[pad_x, hi_x] × [pad_y, hi_y]`` (``hi = pad + new``), ``gx = new_w / tw`` and
    ``gy = new_h / th`` are the exact resize gains, ``(sx, sy)`` level-0 px per tile px. Per
    corner the kernel computes ``X = x0 + ((clamp(x, pad_x, hi_x) - pad_x) / gx) * sx`` in
    float64, which is :func:`trtwsi.ops.reference.scale_to_slide` with ``tile_size`` given.
    """
    _, pad_x, pad_y, new_w, new_h = letterbox
    th, tw = (int(v) for v in tile_size)
    if th <= 0 or tw <= 0:
        raise TilingError(f"tile size must be positive, got {th}x{tw} (h x w)")
    if isinstance(l0_per_px, (int, float, np.floating, np.integer)):
        sx = sy = float(l0_per_px)
    else:
        sx, sy = (float(v) for v in l0_per_px)
    return (
        float(pad_x),
        float(pad_y),
        float(pad_x + new_w),
        float(pad_y + new_h),
        new_w / tw,
        new_h / th,
        sx,
        sy,
    )


# ------------------------------------------------------------------------------------------
# preprocess
# ------------------------------------------------------------------------------------------
def preprocess(
    src: torch.Tensor,
    tile_offsets: torch.Tensor,
    row_strides: torch.Tensor,
    tile_size: tuple[int, int],
    dst: int,
    out: torch.Tensor,
    pad_value: int = PAD_VALUE,
) -> torch.Tensor:
    """Cut B tiles out of uint8 RGB chunk(s) on the GPU and letterbox them into ``out``.

    Per tile exactly :func:`trtwsi.ops.reference.preprocess` (crop, bilinear resize to the
    letterboxed size with the reference's float64 arithmetic, grey padding, ``/ 255`` in fp32,
    HWC → CHW, cast to ``out``'s dtype), in one launch for the batch.

    Args:
        src: 1-D uint8 CUDA tensor holding one or more RGB HWC chunks back to back.
        tile_offsets: ``(B,)`` int64 CUDA tensor: byte offset in ``src`` of each tile's top-left
            pixel (:func:`tile_byte_offsets`).
        row_strides: ``(B,)`` int64 CUDA tensor: bytes per row of the chunk each tile is cut
            from (``W * 3``).
        tile_size: ``(th, tw)`` tile size in chunk px (the same for all tiles).
        dst: side of the square model input (input px).
        out: ``(>= B, 3, dst, dst)`` float16 or float32 CUDA tensor, contiguous (NCHW) or
            ``torch.channels_last`` (NHWC memory, what a channels_last model reads without a
            copy); ``out[:B]`` is written entirely (content and padding).
        pad_value: grey level of the padding (0..255), 114 as ultralytics.

    Returns:
        ``out[:B]``, RGB values in [0, 1]; the tile content sits at input px
        ``[pad_y, pad_y + new_h) × [pad_x, pad_x + new_w)`` of
        :func:`~trtwsi.ops.reference.letterbox_params` ``(th, tw, dst)``.

    The offsets are not bounds-checked on the device (that would need a sync): build them with
    :func:`tile_byte_offsets` or use :func:`preprocess_chunk`.
    """
    _check_cuda(src, "src")
    dev = src.device
    if src.dtype != torch.uint8 or src.ndim != 1 or not src.is_contiguous():
        raise ValueError(
            f"src must be a contiguous 1-D uint8 tensor, got {tuple(src.shape)} {src.dtype}"
        )
    for name, t in (("tile_offsets", tile_offsets), ("row_strides", row_strides)):
        _check_cuda(t, name, dev)
        if t.dtype != torch.int64 or t.ndim != 1 or not t.is_contiguous():
            raise ValueError(
                f"{name} must be a contiguous (B,) int64 tensor, got {tuple(t.shape)} {t.dtype}"
            )
    B = tile_offsets.shape[0]
    if row_strides.shape[0] != B:
        raise ValueError(f"row_strides has {row_strides.shape[0]} entries, tile_offsets {B}")
    th, tw = (int(v) for v in tile_size)
    dst = int(dst)
    if dst > 46340:  # dst * dst must fit the kernel's 32-bit pixel index
        raise ValueError(f"dst must be <= 46340 px, got {dst}")
    lb = reference.letterbox_params(th, tw, dst)
    _check_out(out, "out", B, (3, dst, dst), (torch.float16, torch.float32), dev, True)
    # NCHW, or NHWC memory (a channels_last tensor: a channels_last model reads it as is)
    nhwc = not out.is_contiguous()
    if B == 0:
        return out[:0]
    if B > _MAX_GRID_Y:
        raise ValueError(f"at most {_MAX_GRID_Y} tiles per launch, got {B}")
    name = "preprocess_f16" if out.dtype == torch.float16 else "preprocess_f32"
    args = (
        _ptr(src),
        _ptr(tile_offsets),
        _ptr(row_strides),
        np.int32(th),
        np.int32(tw),
        np.int32(dst),
        np.int32(lb.pad_x),
        np.int32(lb.pad_y),
        np.int32(lb.new_w),
        np.int32(lb.new_h),
        np.float64(th / lb.new_h),  # n_in / n_out, as reference._source_coords
        np.float64(tw / lb.new_w),
        np.float32(pad_value),
        np.int32(3 if nhwc else 1),  # pix_stride
        np.int32(1 if nhwc else dst * dst),  # chan_stride
        _ptr(out),
    )
    grid = (-(-dst * dst // _PREPROCESS_THREADS), B)
    _launch("preprocess", name, dev, grid, (_PREPROCESS_THREADS,), args)
    return out[:B]


def preprocess_chunk(
    chunk: torch.Tensor,
    offsets: Any,
    tile_size: tuple[int, int],
    dst: int,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """:func:`preprocess` of B tiles of one chunk, with the host-side checks.

    Args:
        chunk: ``(H, W, 3)`` uint8 RGB contiguous CUDA tensor (chunk px).
        offsets: ``(B, 2)`` ints ``(x, y)``, top-left of each tile in chunk px, on the host
            (numpy, list, CPU tensor; a CUDA tensor is copied back, which synchronizes).
        tile_size: ``(th, tw)`` in chunk px. dst: model input side.
        out: optional ``(>= B, 3, dst, dst)`` float16/float32 output buffer; None allocates one
            of ``dtype``.

    Returns:
        ``(B, 3, dst, dst)`` tensor on the chunk's device, as
        :func:`trtwsi.ops.reference.preprocess` ``(chunk, offsets, tile_size, dst, dtype)``.

    Raises:
        TilingError: a tile runs outside the chunk, or the chunk is not ``(H, W, 3)`` uint8.
    """
    _check_cuda(chunk, "chunk")
    if chunk.ndim != 3 or chunk.shape[2] != 3 or chunk.dtype != torch.uint8:
        raise TilingError(
            f"preprocess needs an (H, W, 3) uint8 RGB chunk, got shape {tuple(chunk.shape)} "
            f"dtype {chunk.dtype}"
        )
    if not chunk.is_contiguous():
        raise TilingError("preprocess needs a contiguous (H, W, 3) chunk")
    tile_offsets, row_strides = tile_byte_offsets(offsets, chunk.shape, tile_size)
    dev = chunk.device
    B = len(tile_offsets)
    if out is None:
        out = torch.empty((B, 3, int(dst), int(dst)), dtype=dtype, device=dev)
    return preprocess(
        chunk.view(-1),
        torch.from_numpy(tile_offsets).to(dev),
        torch.from_numpy(row_strides).to(dev),
        tile_size,
        dst,
        out,
    )


# ------------------------------------------------------------------------------------------
# postprocess
# ------------------------------------------------------------------------------------------
class Candidates(NamedTuple):
    """Decoded candidates of an ``"nms"`` head, per tile, in device memory (scratch layout).

    ``count``: ``(B,)`` int32, candidates of each tile (score > conf). ``keys``: ``(B, n_pad)``
    int64 holding uint64 sort keys, the first ``count[b]`` valid in arbitrary order: high 32
    bits the score reversed (ascending key = descending score), low 32 bits the anchor index.
    ``boxes``: ``(B, N, 4)`` float32 xyxy input px, ``scores``: ``(B, N)`` float32, ``classes``:
    ``(B, N)`` int32; valid only at the anchors of the keys (other entries are garbage).
    """

    count: torch.Tensor
    keys: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor


def _check_raw(raw: torch.Tensor) -> torch.Tensor:
    _check_cuda(raw, "raw")
    if raw.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"raw head output must be float32 or float16, got {raw.dtype}")
    return raw.contiguous()


def _n_valid(n_valid: int | None, B: int) -> int:
    n = B if n_valid is None else int(n_valid)
    if not 0 <= n <= B:
        raise ValueError(f"n_valid must be in [0, {B}], got {n_valid}")
    if n > _MAX_GRID_Y:
        raise ValueError(f"at most {_MAX_GRID_Y} tiles per launch, got {n}")
    return n


def decode_nms_head(raw: torch.Tensor, conf: float, n_valid: int | None = None) -> Candidates:
    """Decode a ``(B, 4 + nc, N)`` head output into per-tile candidates (one launch + a memset).

    Per tile the same candidates as :func:`trtwsi.ops.reference.decode_nms_head`: score = max
    class score in fp32 (first max on ties, NaN drops the anchor), kept when ``score > conf``
    (compared in fp32, as torch compares a float32 tensor with a Python float), corners
    ``xy ∓ wh / 2`` in fp32. The order is not fixed (see :class:`Candidates`).

    Args:
        raw: ``(B, 4 + nc, N)`` float32 or float16 CUDA tensor (input px, scores after sigmoid).
        conf: score threshold (strict ``>``).
        n_valid: tiles ``b >= n_valid`` are skipped (count 0); None: all.
    """
    raw = _check_raw(raw)
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise ValueError(f"an 'nms' head output is (B, 4 + nc, N), got shape {tuple(raw.shape)}")
    B, C, N = raw.shape
    if N >= 2**31:
        raise ValueError(f"too many anchors: {N}")
    nv = _n_valid(n_valid, B)
    dev = raw.device
    n_pad = _next_pow2(max(N, 1))
    cands = Candidates(
        count=torch.zeros(B, dtype=torch.int32, device=dev),
        keys=torch.empty((B, n_pad), dtype=torch.int64, device=dev),
        boxes=torch.empty((B, N, 4), dtype=torch.float32, device=dev),
        scores=torch.empty((B, N), dtype=torch.float32, device=dev),
        classes=torch.empty((B, N), dtype=torch.int32, device=dev),
    )
    if nv and N:
        name = "decode_f16" if raw.dtype == torch.float16 else "decode_f32"
        args = (
            _ptr(raw),
            np.int32(C - 4),
            np.int32(N),
            np.float32(conf),  # torch: float32 tensor > Python float compares in float32
            _ptr(cands.count),
            _ptr(cands.keys),
            np.int32(n_pad),
            _ptr(cands.boxes),
            _ptr(cands.scores),
            _ptr(cands.classes),
        )
        grid = (-(-N // _DECODE_THREADS), nv)
        _launch("postprocess", name, dev, grid, (_DECODE_THREADS,), args)
    return cands


def postprocess(
    raw: torch.Tensor,
    head: str,
    conf: float,
    iou: float,
    max_det: int,
    tile_origins: torch.Tensor,
    letterbox: Letterbox | Sequence[float],
    tile_size: tuple[int, int],
    l0_per_px: float | tuple[float, float] = 1.0,
    n_valid: int | None = None,
    out: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head output of a batch of tiles → detections in level-0 slide px, on the GPU.

    Per tile ``b < n_valid`` the result is identical (same rows, same order, float64 bits) to::

        reference.scale_to_slide(
            reference.postprocess(raw, head, conf, iou, max_det)[b],
            letterbox, tile_origins[b], l0_per_px, tile_size=tile_size)

    i.e. decode (``"nms"``: max class score > conf, xywh → xyxy), greedy class-aware NMS (rank by
    descending score, ties by lower anchor index; suppressed by a kept box of its class with
    fp32 IoU > ``iou``), the first ``max_det`` kept; ``"end2end"``: rows with score > conf, the
    first ``max_det`` in order. Then, in float64, clip to the letterboxed content, undo the
    letterbox, scale by ``l0_per_px`` and add the tile origin. Two launches and a memset for
    ``"nms"``, one launch for ``"end2end"``; no host synchronization.

    Args:
        raw: head output, float32 or float16 CUDA tensor: ``(B, 4 + nc, N)`` for ``"nms"``,
            ``(B, K, 6)`` for ``"end2end"`` (input px).
        head: ``"nms"`` or ``"end2end"``.
        conf, iou: strict ``>`` thresholds (``iou`` unused by ``"end2end"``).
        max_det: most detections per tile (>= 0).
        tile_origins: ``(B, 2)`` level-0 px ``(x0, y0)`` of each tile's top-left (float64 CUDA
            tensor; other dtypes/devices are converted).
        letterbox: :class:`~trtwsi.ops.reference.Letterbox` of the tile size, shared by all tiles.
        tile_size: ``(th, tw)`` tile size in tile px.
        l0_per_px: level-0 px per tile px, one float or ``(sx, sy)``.
        n_valid: tiles ``b >= n_valid`` are batch padding: count 0, no work. None: all B.
        out: optional ``(>= B, max_det, 6)`` float64 contiguous CUDA buffer.
        counts: optional ``(>= B,)`` int32 contiguous CUDA buffer.

    Returns:
        ``(dets, counts)``: ``dets`` ``(B, max_det, 6)`` float64, per tile the first
        ``counts[b]`` rows ``(x1, y1, x2, y2, score, class_id)`` in level-0 px by descending
        score (rows past ``counts[b]`` are undefined); ``counts`` ``(B,)`` int32.
    """
    if head not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {head!r}; expected one of {HEAD_KINDS}")
    raw = _check_raw(raw)
    dev = raw.device
    if raw.ndim != 3:
        raise ValueError(f"raw head output must be 3-D, got shape {tuple(raw.shape)}")
    B = raw.shape[0]
    nv = _n_valid(n_valid, B)
    max_det = int(max_det)
    if max_det < 0:
        raise ValueError(f"max_det must be >= 0, got {max_det}")
    origins = torch.as_tensor(tile_origins, dtype=torch.float64, device=dev).contiguous()
    if tuple(origins.shape) != (B, 2):
        raise ValueError(f"tile_origins must have shape ({B}, 2), got {tuple(origins.shape)}")
    if out is None:
        out = torch.empty((B, max_det, 6), dtype=torch.float64, device=dev)
    _check_out(out, "out", B, (max_det, 6), (torch.float64,), dev)
    if counts is None:
        counts = torch.empty(B, dtype=torch.int32, device=dev)
    _check_out(counts, "counts", B, (), (torch.int32,), dev)
    mapping = tuple(np.float64(v) for v in mapping_params(letterbox, tile_size, l0_per_px))
    tail = (_ptr(origins), *mapping, _ptr(out), _ptr(counts), np.int32(nv))
    if B == 0:
        return out[:0], counts[:0]
    if head == "end2end":
        if raw.shape[2] != 6:
            raise ValueError(f"an 'end2end' head output is (B, K, 6), got {tuple(raw.shape)}")
        name = "end2end_f16" if raw.dtype == torch.float16 else "end2end_f32"
        args = (_ptr(raw), np.int32(raw.shape[1]), np.float32(conf), np.int32(max_det), *tail)
        _launch("postprocess", name, dev, (B,), (_E2E_THREADS,), args)
        return out[:B], counts[:B]
    cands = decode_nms_head(raw, conf, nv)
    N = raw.shape[2]
    kept = torch.empty((B, max(max_det, 1)), dtype=torch.int32, device=dev)
    args = (
        _ptr(cands.count),
        _ptr(cands.keys),
        np.int32(cands.keys.shape[1]),
        _ptr(cands.boxes),
        _ptr(cands.scores),
        _ptr(cands.classes),
        np.int32(N),
        np.float64(iou),
        np.int32(max_det),
        _ptr(kept),
        *tail,
    )
    _launch("postprocess", "nms_scale", dev, (B,), (_NMS_THREADS,), args)
    return out[:B], counts[:B]
