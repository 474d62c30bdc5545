"""The one documented conversion of any sample layout to RGB uint8.

- dtype: uint8 unchanged; uint16 → ``value >> 8`` (the top byte; 65535 → 255); other integer
  types → scaled by their max; float → assumed in [0, 1], clipped, ``round(v * 255)``;
  bool → 0/255.
- channels: grayscale (H, W) or (H, W, 1) → replicated to 3; 2 channels (gray + alpha) → gray;
  RGBA / 4+ channels → the first 3 channels (alpha dropped, not composited: scanners store
  opaque tissue, and compositing would invent colours where alpha is 0).
"""

from __future__ import annotations

import numpy as np


def to_rgb_uint8(a: np.ndarray) -> np.ndarray:
    """Convert ``(H, W)`` or ``(H, W, C)`` samples of any dtype to RGB uint8 ``(H, W, 3)``."""
    a = np.asarray(a)
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        a = (
            (np.clip(a.astype(np.float64), 0, info.max) * (255.0 / info.max))
            .round()
            .astype(np.uint8)
        )
    elif np.issubdtype(a.dtype, np.floating):
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    else:
        raise TypeError(f"cannot convert samples of dtype {a.dtype} to RGB uint8")
    if a.ndim == 2:
        return np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3:
        raise ValueError(f"expected (H, W) or (H, W, C) samples, got shape {a.shape}")
    c = a.shape[2]
    if c == 3:
        return a
    if c in (1, 2):
        return np.repeat(a[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])
