"""Overlay images: detection boxes drawn over a slide thumbnail, one colour per class name."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from trtwsi._util.atomic import write_bytes_atomic
from trtwsi.errors import ExportError
from trtwsi.results.detections import Detections

__all__ = ["PALETTE", "class_colors", "draw_overlay"]

#: Class colours (RGB), assigned in order of first appearance of a class name (see class_colors).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 225, 25),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
    (0, 0, 0),
)


def class_colors(model_class_names: Sequence[Sequence[str]]) -> dict[str, tuple[int, int, int]]:
    """RGB colour per class name: :data:`PALETTE` entries in order of first appearance of each
    distinct name (model order, then class id), so the same models always give the same colours
    and a class name shared by two models has one colour; beyond the palette, a colour derived
    from the name's CRC32."""
    out: dict[str, tuple[int, int, int]] = {}
    for names in model_class_names:
        for nm in names:
            if nm in out:
                continue
            k = len(out)
            if k < len(PALETTE):
                out[nm] = PALETTE[k]
            else:
                h = zlib.crc32(nm.encode())
                out[nm] = (64 + (h & 0xBF), 64 + ((h >> 8) & 0xBF), 64 + ((h >> 16) & 0xBF))
    return out


def _color_of(name: str, colors: Mapping[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    if name in colors:
        return colors[name]
    h = zlib.crc32(name.encode())
    return (64 + (h & 0xBF), 64 + ((h >> 8) & 0xBF), 64 + ((h >> 16) & 0xBF))


def draw_overlay(
    img: np.ndarray, det: Detections, slide_size: tuple[int, int], legend: bool = True
) -> np.ndarray:
    """Draw ``det`` (level-0 px) onto ``img`` (RGB uint8 ``(h, w, 3)``, the whole slide scaled
    to ``img``'s size) in place and return it. ``slide_size``: level-0 ``(width, height)``."""
    import cv2

    h, w = img.shape[:2]
    sx, sy = w / float(slide_size[0]), h / float(slide_size[1])
    colors = class_colors(det.model_class_names)
    names = det.names()
    if len(det):
        tx1 = np.floor(det.x1 * sx).astype(np.int64)
        ty1 = np.floor(det.y1 * sy).astype(np.int64)
        tx2 = np.maximum(np.ceil(det.x2 * sx).astype(np.int64) - 1, tx1)
        ty2 = np.maximum(np.ceil(det.y2 * sy).astype(np.int64) - 1, ty1)
        thick = max(1, round(max(h, w) / 1500))
        rgb = np.array([_color_of(nm, colors) for nm in names.tolist()], dtype=np.uint8)
        order = np.argsort(det.score, kind="stable")  # best boxes drawn last, on top
        small = (tx2 - tx1 <= 2 * thick) & (ty2 - ty1 <= 2 * thick)
        # tiny boxes: fill their few pixels directly (vectorized)
        idx = order[small[order]]
        for dy in range(2 * thick + 1):
            for dx in range(2 * thick + 1):
                m = (tx1[idx] + dx <= tx2[idx]) & (ty1[idx] + dy <= ty2[idx])
                xx, yy = tx1[idx][m] + dx, ty1[idx][m] + dy
                ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
                img[yy[ok], xx[ok]] = rgb[idx][m][ok]
        for i in order[~small[order]].tolist():
            c = tuple(int(v) for v in rgb[i])
            cv2.rectangle(img, (int(tx1[i]), int(ty1[i])), (int(tx2[i]), int(ty2[i])), c, thick)
    if legend:
        _draw_legend(img, det, colors)
    return img


def _draw_legend(img: np.ndarray, det: Detections, colors) -> None:
    import cv2

    entries = []
    for model, per_class in det.counts().items():
        for nm, k in per_class.items():
            label = f"{nm} ({k})" if len(det.model_names) == 1 else f"{model}: {nm} ({k})"
            entries.append((label, _color_of(nm, colors)))
    if not entries:
        return
    entries = entries[:20]
    h, w = img.shape[:2]
    scale = float(np.clip(min(h, w) / 1200.0, 0.3, 1.0))
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, th), base = cv2.getTextSize("Mg", font, scale, 1)
    line = th + base + 4
    width = max(cv2.getTextSize(t, font, scale, 1)[0][0] for t, _ in entries) + line + 12
    height = line * len(entries) + 8
    x0, y0 = 4, 4
    x1, y1 = min(w, x0 + width), min(h, y0 + height)
    if x1 <= x0 or y1 <= y0:
        return
    region = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = (0.25 * region + 0.75 * 255).astype(np.uint8)
    for k, (text, color) in enumerate(entries):
        ty = y0 + 4 + k * line
        sw = line - 6
        cv2.rectangle(img, (x0 + 4, ty + 1), (x0 + 4 + sw, ty + 1 + sw), color, -1)
        cv2.putText(img, text, (x0 + 10 + sw, ty + th + 1), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _save_image(path: Path, img: np.ndarray, overwrite: bool) -> Path:
    import cv2

    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(".jpg" if ext == ".jpeg" else ext, img[..., ::-1], params)
    if not ok:
        raise ExportError(f"OpenCV could not encode the overlay as {ext} for {path}")
    return write_bytes_atomic(path, buf.tobytes(), overwrite=overwrite)
