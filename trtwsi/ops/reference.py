"""Reference pre/post-processing ops: plain torch on the CPU, the oracle for the CUDA kernels.

Every op here is written the way its kernel works — on a whole batch of tiles at once, with the
arithmetic spelled out — but favours exactness and readability over speed. The CUDA kernels in
``trtwsi/ops/cuda.py`` are checked against these functions, and these functions are checked
against ultralytics (``tests/test_parity_ultralytics.py``) and torchvision
(``tests/ops/test_reference.py``).

Coordinate frames used in the docstrings:

* **chunk px** — pixels of one region read from the slide at the inference level (the array
  handed to :func:`preprocess`); a tile is a ``(th, tw)`` window of it.
* **tile px** — pixels of one tile, origin at its top-left corner, same scale as chunk px.
* **input px** — pixels of the square ``dst × dst`` model input after the letterbox
  (resize keeping the aspect ratio, then pad with grey 114 centred).
* **level-0 px** — full-resolution slide pixels, what results are reported in.

Boxes are ``(x1, y1, x2, y2)`` with pixel *edges* as coordinates (a pixel ``i`` spans
``[i, i + 1)``), as in ultralytics. Detections are ``(M, 6)`` rows
``(x1, y1, x2, y2, score, class_id)``; ``class_id`` is stored as a float.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from trtwsi.errors import TilingError

__all__ = [
    "HEAD_KINDS",
    "PAD_VALUE",
    "Letterbox",
    "box_iou_pairs",
    "decode_end2end",
    "decode_nms_head",
    "letterbox_params",
    "nms",
    "postprocess",
    "preprocess",
    "scale_to_slide",
]

#: Grey level of the letterbox padding (ultralytics ``LetterBox(padding_value=114)``).
PAD_VALUE = 114

#: The two head kinds: ``"nms"`` — YOLOv8/11-style ``(B, 4 + nc, N)`` output that needs NMS;
#: ``"end2end"`` — YOLOv10/YOLO26 one-to-one ``(B, K, 6)`` output that needs none.
HEAD_KINDS = ("nms", "end2end")


class Letterbox(NamedTuple):
    """Geometry of the letterbox from a ``(src_h, src_w)`` tile to a ``dst × dst`` input.

    ``scale``: ultralytics' ratio ``r = min(dst / src_h, dst / src_w)`` (a float).
    ``pad_x``, ``pad_y``: left and top padding in input px (ints). ``new_w``, ``new_h``: size of
    the resized tile inside the input (ints). The resized content occupies input px
    ``[pad_x, pad_x + new_w) × [pad_y, pad_y + new_h)``. Because ``new_w``/``new_h`` are rounded,
    the exact per-axis scale of the resize is ``new_w / src_w`` and ``new_h / src_h`` (which is
    what :func:`scale_to_slide` and ultralytics' ``scale_boxes`` invert), not ``scale``.
    """

    scale: float
    pad_x: int
    pad_y: int
    new_w: int
    new_h: int


def letterbox_params(src_h: int, src_w: int, dst: int) -> Letterbox:
    """Letterbox geometry exactly as ultralytics ``LetterBox(new_shape=(dst, dst), auto=False,
    scaleup=True, center=True)`` computes it (``ultralytics/data/augment.py``).

    ``r = min(dst / src_h, dst / src_w)``; ``new_w = max(round(src_w * r), 1)`` and likewise
    ``new_h``; the padding ``d = (dst - new) / 2`` is split as ``round(d - 0.1)`` before (left/top)
    and ``round(d + 0.1)`` after (right/bottom), so an odd padding puts the extra pixel on the
    right/bottom. ``round`` is Python's (half to even), as in ultralytics; it runs on the host.

    Args:
        src_h, src_w: tile size in tile px (ints > 0).
        dst: side of the square model input in input px (int > 0).

    Returns:
        :class:`Letterbox` ``(scale, pad_x, pad_y, new_w, new_h)``.
    """
    src_h, src_w, dst = int(src_h), int(src_w), int(dst)
    if src_h <= 0 or src_w <= 0 or dst <= 0:
        raise TilingError(
            f"letterbox needs positive sizes, got tile {src_h}x{src_w} (h x w), dst {dst}"
        )
    r = min(dst / src_h, dst / src_w)
    new_w, new_h = max(round(src_w * r), 1), max(round(src_h * r), 1)
    dw, dh = (dst - new_w) / 2, (dst - new_h) / 2
    return Letterbox(
        scale=r, pad_x=round(dw - 0.1), pad_y=round(dh - 0.1), new_w=new_w, new_h=new_h
    )


def _source_coords(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear sampling positions along one axis (cv2.INTER_LINEAR / align_corners=False rules).

    Output pixel ``j`` samples the source at ``s = (j + 0.5) * n_in / n_out - 0.5`` (half-pixel
    centres), clamped to ``s >= 0``; ``i0 = floor(s)``, ``i1 = min(i0 + 1, n_in - 1)`` and the weight
    of ``i1`` is ``s - i0`` (zero once ``i0`` is the last pixel). Float64 ``(n_out,)`` weight and
    int64 ``(n_out,)`` indices.
    """
    j = torch.arange(n_out, dtype=torch.float64)
    s = ((j + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = s.floor().to(torch.int64).clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = torch.where(i1 > i0, s - i0.to(torch.float64), torch.zeros_like(s))
    return i0, i1, w1


def preprocess(
    chunk: torch.Tensor | np.ndarray,
    offsets: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
    tile_size: tuple[int, int],
    dst: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cut B tiles out of one chunk and letterbox each into a ``dst × dst`` model input.

    What the preprocess kernel does, pixel by pixel: crop, bilinear resize to the letterboxed
    size, grey padding, scale to [0, 1], HWC → CHW. Identical to ultralytics' ``LetterBox`` +
    ``BasePredictor.preprocess`` on the same tile, except for the resize arithmetic: cv2 resizes
    uint8 with 11-bit fixed-point weights and rounds its output to uint8, while this op
    interpolates in float64 and never rounds. Measured on random images the two differ by at
    most 0.80/255 (under one uint8 level) per pixel; without a resize (tile size == letterboxed
    size, e.g. tile == dst) the result is bit-identical (an exact copy divided by 255 in fp32).

    Args:
        chunk: ``(H, W, 3)`` uint8 RGB, chunk px (torch tensor on the CPU or numpy array).
        offsets: ``(B, 2)`` ints, ``(x, y)`` top-left corner of each tile in chunk px. Every tile
            must lie inside the chunk: ``0 <= x <= W - tw`` and ``0 <= y <= H - th``.
        tile_size: ``(th, tw)`` tile height and width in chunk px, the same for all tiles.
        dst: side of the square model input (the model's ``imgsz``).
        dtype: output dtype (float32 or float16). Values are computed in float32 (the resize in
            float64) and cast at the end.

    Returns:
        ``(B, 3, dst, dst)`` tensor of ``dtype`` on the CPU, RGB, values in [0, 1]; padding is
        ``114 / 255``. The tile content sits at input px ``[pad_y, pad_y + new_h) × [pad_x,
        pad_x + new_w)`` of :func:`letterbox_params` ``(th, tw, dst)``.

    Raises:
        TilingError: a tile runs outside the chunk, or the shapes are not as documented.
    """
    img = torch.as_tensor(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != torch.uint8:
        raise TilingError(
            f"preprocess needs an (H, W, 3) uint8 RGB chunk, got shape {tuple(img.shape)} "
            f"dtype {img.dtype}"
        )
    off = torch.as_tensor(np.asarray(offsets), dtype=torch.int64).reshape(-1, 2)
    th, tw = (int(v) for v in tile_size)
    H, W = img.shape[:2]
    lb = letterbox_params(th, tw, dst)
    bad = (off[:, 0] < 0) | (off[:, 1] < 0) | (off[:, 0] + tw > W) | (off[:, 1] + th > H)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        x, y = (int(v) for v in off[i])
        raise TilingError(
            f"tile {i} at (x={x}, y={y}) of size {tw}x{th} (w x h) runs outside the {W}x{H} chunk; "
            "every tile must lie inside the chunk it is cut from"
        )
    B = off.shape[0]
    crops = (  # (B, th, tw, 3) uint8
        torch.stack([img[y : y + th, x : x + tw] for x, y in off.tolist()])
        if B
        else img.new_zeros((0, th, tw, 3))
    )
    crops = crops.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, th, tw), values 0..255
    if (lb.new_h, lb.new_w) != (th, tw):
        y0, y1, wy = _source_coords(lb.new_h, th)
        x0, x1, wx = _source_coords(lb.new_w, tw)
        c = crops.to(torch.float64)
        top = c[:, :, y0, :]  # (B, 3, new_h, tw)
        bot = c[:, :, y1, :]
        rows = top + (bot - top) * wy[:, None]  # vertical blend: (1 - w) * a + w * b
        left, right = rows[:, :, :, x0], rows[:, :, :, x1]
        crops = (left + (right - left) * wx).to(torch.float32)  # horizontal blend
    out = torch.full((B, 3, dst, dst), float(PAD_VALUE), dtype=torch.float32)
    out[:, :, lb.pad_y : lb.pad_y + lb.new_h, lb.pad_x : lb.pad_x + lb.new_w] = crops
    return (out / 255).to(dtype)


def decode_nms_head(raw: torch.Tensor, conf: float) -> list[torch.Tensor]:
    """Decode a YOLOv8/11-style head output into per-image candidate detections.

    Args:
        raw: ``(B, 4 + nc, N)`` float (cast to float32): rows 0-3 are box centre x, y, width,
            height in input px, rows 4.. the class scores after the sigmoid, one column per
            anchor.
        conf: keep a candidate when its score is **strictly greater** than ``conf``
            (ultralytics ``non_max_suppression``: ``conf > conf_thres``).

    Returns:
        B float32 tensors ``(M_b, 6)``: ``(x1, y1, x2, y2, score, class_id)`` in input px, in
        ascending anchor order. ``score`` is the maximum class score and ``class_id`` its class;
        ties go to the lowest class id (``torch.max`` semantics, as ultralytics). The corners are
        ``xy ∓ wh / 2`` evaluated in fp32 in that order, bit-identical to ultralytics'
        ``xywh2xyxy``.
    """
    if raw.ndim != 3 or raw.shape[1] < 5:
        raise ValueError(
            f"decode_nms_head needs a (B, 4 + nc, N) tensor, got shape {tuple(raw.shape)}"
        )
    raw = raw.to(torch.float32)
    out = []
    for r in raw:  # (4 + nc, N)
        score, cls = r[4:].max(0)  # (N,), first maximum on ties
        keep = score > conf
        xywh = r[:4, keep].T  # (M, 4)
        xy, half = xywh[:, :2], xywh[:, 2:] / 2
        out.append(torch.cat([xy - half, xy + half, score[keep, None], cls[keep, None].float()], 1))
    return out


def decode_end2end(
    raw: torch.Tensor, conf: float, max_det: int | None = None
) -> list[torch.Tensor]:
    """Filter a YOLOv10/YOLO26 end-to-end head output (already one box per object, no NMS).

    Args:
        raw: ``(B, K, 6)`` float (cast to float32), rows ``(x1, y1, x2, y2, score, class_id)``
            in input px, as the head's top-K emits them (descending score).
        conf: keep rows whose score is **strictly greater** than ``conf`` (as ultralytics).
        max_det: keep at most this many rows per image, the first ones (None: all).

    Returns:
        B float32 tensors ``(M_b, 6)``, rows in their original order.
    """
    if raw.ndim != 3 or raw.shape[2] != 6:
        raise ValueError(f"decode_end2end needs a (B, K, 6) tensor, got shape {tuple(raw.shape)}")
    raw = raw.to(torch.float32)
    return [r[r[:, 4] > conf][:max_det] for r in raw]


def box_iou_pairs(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one box against many, with torchvision's exact fp arithmetic.

    ``inter = clamp(min(x2) - max(x1), 0) * clamp(min(y2) - max(y1), 0)``, ``area = (x2 - x1) *
    (y2 - y1)``, ``iou = inter / ((area_a + area_b) - inter)``, in the boxes' dtype, operation for
    operation as ``torchvision/csrc/ops/cpu/nms_kernel.cpp``. Degenerate pairs (zero union) give
    NaN, which never exceeds a threshold.

    Args:
        box: ``(4,)`` xyxy. boxes: ``(M, 4)`` xyxy, same dtype and frame.

    Returns:
        ``(M,)`` IoU in the boxes' dtype.
    """
    area_a = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    inter = w * h
    return inter / ((area_a + areas) - inter)


def nms(
    dets: torch.Tensor, iou: float, max_det: int | None = 300, class_aware: bool = True
) -> torch.Tensor:
    """Greedy non-maximum suppression of one image's (one tile's) detections.

    Rule, in order:

    1. Rank all rows by descending score; equal scores keep their input order (lower row index
       first) — a stable sort. This is the deterministic tie rule the kernel must follow.
    2. Walking down the ranking, a row is kept unless a kept row of higher rank *of the same
       class* (any class if ``class_aware=False``) overlaps it with IoU **strictly greater**
       than ``iou``. IoU is computed in the boxes' dtype exactly as torchvision
       (:func:`box_iou_pairs`) and compared in float64 against the Python float ``iou``, as
       torchvision's kernel compares its float IoU with its double threshold.
    3. Kept rows are returned in rank order, the first ``max_det`` of them.

    Classes are separated by running the greedy pass per class, never by adding a per-class
    coordinate offset, so the result does not depend on coordinate magnitude: 10⁵-px
    coordinates in fp32 suppress exactly as small ones do (an offset trick like
    ``batched_nms``' ``class * (max_coord + 1)`` loses fp32 precision there).

    Equivalent to ``torchvision.ops.batched_nms(dets[:, :4], dets[:, 4], dets[:, 5], iou)
    [:max_det]`` whenever torchvision's sort keeps ties in index order (its CPU kernel does).

    Args:
        dets: ``(M, 6)`` float32 (or float64) ``(x1, y1, x2, y2, score, class_id)``, any frame.
        iou: IoU threshold in [0, 1].
        max_det: cap on the number of rows returned (None: no cap).
        class_aware: suppress only within a class (True) or across all classes (False).

    Returns:
        ``(K, 6)`` rows of ``dets`` (same dtype), sorted by descending score.
    """
    if dets.ndim != 2 or dets.shape[1] != 6:
        raise ValueError(f"nms needs an (M, 6) tensor, got shape {tuple(dets.shape)}")
    if dets.shape[0] == 0:
        return dets[:0]
    order = torch.sort(dets[:, 4], descending=True, stable=True).indices  # rank -> row
    ranked = dets[order]
    groups = ranked[:, 5].unique() if class_aware else ranked.new_zeros(1)
    kept_ranks = []
    for c in groups:
        ranks = (
            (ranked[:, 5] == c).nonzero()[:, 0]
            if class_aware
            else torch.arange(len(ranked), device=dets.device)
        )
        boxes = ranked[ranks, :4]
        suppressed = torch.zeros(len(ranks), dtype=torch.bool, device=dets.device)
        for i in range(len(ranks)):
            if suppressed[i]:
                continue
            kept_ranks.append(int(ranks[i]))
            rest = box_iou_pairs(boxes[i], boxes[i + 1 :])
            suppressed[i + 1 :] |= rest.to(torch.float64) > float(iou)
    keep = torch.tensor(sorted(kept_ranks), dtype=torch.int64, device=dets.device)[:max_det]
    return ranked[keep]


def scale_to_slide(
    dets: torch.Tensor,
    letterbox: Letterbox | Sequence[float],
    tile_origin: tuple[float, float] = (0.0, 0.0),
    l0_per_tile_px: float | tuple[float, float] = 1.0,
    tile_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Map one tile's detections from input px to level-0 slide px.

    Per box corner, in float64:

    1. clip to the letterboxed content ``[pad_x, pad_x + new_w] × [pad_y, pad_y + new_h]``
       (input px) — the same as clipping to the tile ``[0, tw] × [0, th]`` after step 2;
    2. undo the letterbox: ``u = (x - pad_x) / gx`` (tile px), where the gain ``gx`` is the
       exact per-axis scale of the resize, ``new_w / tw``, when ``tile_size`` is given (what
       ultralytics ``scale_boxes`` inverts), else ``scale``. The two differ only when rounding
       made ``new_w != tw * scale``, which never happens for square tiles; then using ``scale``
       is off by less than ``0.5 / scale`` tile px at the far edge of the tile;
    3. to level-0: ``X = x0 + u * l0_per_tile_px``.

    Score and class pass through unchanged.

    Precision: the float64 default keeps ~1e-11 px at 10⁵ px. With ``dtype=torch.float32`` the
    result is rounded once at the end: up to 0.004 px error at 10⁵ px (fp32 spacing 0.0078 px
    there), fine for detection boxes but not bit-comparable across implementations.

    Args:
        dets: ``(M, 6)`` ``(x1, y1, x2, y2, score, class_id)`` in input px, any float dtype.
        letterbox: the :class:`Letterbox` of this tile size (``letterbox_params(th, tw, dst)``),
            or the same five numbers ``(scale, pad_x, pad_y, new_w, new_h)``.
        tile_origin: ``(x0, y0)`` level-0 px of the tile's top-left corner.
        l0_per_tile_px: level-0 px per tile px (the downsample of the level the tile was read
            at; 1.0 at level 0), one float or ``(sx, sy)``.
        tile_size: ``(th, tw)`` tile size in tile px, for the exact per-axis gain (recommended
            for non-square tiles); None uses ``scale``.
        dtype: float64 (default) or float32 output.

    Returns:
        ``(M, 6)`` of ``dtype``: boxes in level-0 px, then score and class_id.
    """
    if dets.ndim != 2 or dets.shape[1] != 6:
        raise ValueError(f"scale_to_slide needs an (M, 6) tensor, got shape {tuple(dets.shape)}")
    scale, pad_x, pad_y, new_w, new_h = letterbox
    if tile_size is None:
        gx = gy = float(scale)
    else:
        th, tw = tile_size
        gx, gy = new_w / tw, new_h / th
    if isinstance(l0_per_tile_px, (int, float)):
        sx = sy = float(l0_per_tile_px)
    else:
        sx, sy = (float(v) for v in l0_per_tile_px)
    x0, y0 = (float(v) for v in tile_origin)
    d = dets.to(torch.float64)
    xs = (d[:, [0, 2]].clamp(pad_x, pad_x + new_w) - pad_x) / gx  # tile px
    ys = (d[:, [1, 3]].clamp(pad_y, pad_y + new_h) - pad_y) / gy
    out = torch.stack(
        [
            x0 + xs[:, 0] * sx,
            y0 + ys[:, 0] * sy,
            x0 + xs[:, 1] * sx,
            y0 + ys[:, 1] * sy,
            d[:, 4],
            d[:, 5],
        ],
        1,
    )
    return out.to(dtype)


def postprocess(
    raw: torch.Tensor, head: str, conf: float, iou: float, max_det: int | None = 300
) -> list[torch.Tensor]:
    """Head output → final per-image detections in input px.

    ``head="nms"``: :func:`decode_nms_head` then class-aware :func:`nms` with ``iou`` and
    ``max_det``. ``head="end2end"``: :func:`decode_end2end` only (``iou`` unused), first
    ``max_det`` rows. Same results as ultralytics ``non_max_suppression`` (default
    ``agnostic=False``, ``multi_label=False``), except that ultralytics keeps only the 30000
    highest-scoring candidates before NMS and stops NMS after a time limit; this op does neither.

    Args:
        raw: ``(B, 4 + nc, N)`` for ``"nms"``, ``(B, K, 6)`` for ``"end2end"``.
        head: one of :data:`HEAD_KINDS`.
        conf: score threshold (strict ``>``). iou: NMS IoU threshold (strict ``>``).
        max_det: per-image cap (None: none).

    Returns:
        B float32 tensors ``(M_b, 6)`` ``(x1, y1, x2, y2, score, class_id)`` in input px, by
        descending score.
    """
    if head == "nms":
        return [nms(d, iou, max_det) for d in decode_nms_head(raw, conf)]
    if head == "end2end":
        return decode_end2end(raw, conf, max_det)
    raise ValueError(f"unknown head kind {head!r}; expected one of {HEAD_KINDS}")
