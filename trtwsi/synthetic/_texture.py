"""Periodic noise textures indexed by absolute level-0 position (so renders do not depend on
how a slide is cut into regions)."""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np

#: Mean glass colour (RGB) and the per-pixel noise amplitude (std of a luminance noise).
GLASS_RGB = (245.0, 244.0, 247.0)
GLASS_NOISE = 1.6
_TEX_EXT = 1024  # textures are stored extended by this many px so crops up to this size are views


# ----------------------------------------------------------------------------------------------
# textures
# ----------------------------------------------------------------------------------------------
class _Texture:
    """A periodic float32 texture of period ``P`` (both axes), indexed by absolute level-0 px.

    Stored as ``(P + ext, P + ext)`` so a crop of up to ``ext`` px per side is a view.
    """

    def __init__(self, tile: np.ndarray, ext: int = _TEX_EXT):
        self.period = tile.shape[0]
        reps = 1 + math.ceil(ext / self.period)
        self.data = np.tile(tile, (reps, reps))[: self.period + ext, : self.period + ext].copy()
        self.ext = ext

    def crop(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w) float32 values at level-0 px ``[x, x+w) × [y, y+h)`` (a view when small)."""
        p = self.period
        ox, oy = x % p, y % p
        if w <= self.ext and h <= self.ext:
            return self.data[oy : oy + h, ox : ox + w]
        base = self.data[:p, :p]
        return base.take(np.arange(oy, oy + h) % p, axis=0).take(np.arange(ox, ox + w) % p, axis=1)


def _periodic_noise(rng: np.random.Generator, period: int, sigma: float) -> np.ndarray:
    """(period, period) float32 Gaussian-blurred white noise, periodic, zero mean, unit std."""
    t = rng.standard_normal((period, period), dtype=np.float32)
    pad = int(4 * sigma) + 2
    tp = np.pad(t, pad, mode="wrap")
    tp = cv2.GaussianBlur(tp, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    t = tp[pad:-pad, pad:-pad]
    t -= t.mean()
    t /= max(float(t.std()), 1e-6)
    return np.ascontiguousarray(t)


@functools.lru_cache(maxsize=4)
def _textures(seed: int) -> dict[str, _Texture]:
    """Per-seed textures (cached: several Scenes of one seed share them; read-only)."""
    rng = np.random.default_rng([seed, 0x7E57])
    grain = _periodic_noise(rng, 509, 0.8)  # fine grain: chromatin, tissue grain, glass noise
    mottle = _periodic_noise(rng, 1021, 2.5)  # mottled stroma texture
    edge = _periodic_noise(rng, 251, 1.5)  # raggedness of tissue edges
    glass = GLASS_NOISE * np.roll(grain, (211, 97), axis=(0, 1))
    glass_u8 = np.stack(
        [np.clip(np.rint(glass + GLASS_RGB[c]), 0, 255).astype(np.uint8) for c in range(3)], -1
    )
    tex = {
        # the tissue multiplier 1 + 0.12 grain + 0.28 mottle is split over two textures
        "grain": _Texture(1.0 + 0.12 * grain),
        "mottle": _Texture(0.28 * mottle),
        "edge": _Texture(edge),
        "glass": _Texture(glass.astype(np.float32)),
    }
    # uint8 RGB glass (3 channels): glass-only regions are plain copies of it
    reps = 1 + math.ceil(_TEX_EXT / 509)
    g8 = np.tile(glass_u8, (reps, reps, 1))[: 509 + _TEX_EXT, : 509 + _TEX_EXT].copy()
    tex["glass_u8"] = g8  # type: ignore[assignment]
    return tex


def _glass_u8(tex: dict, x: int, y: int, w: int, h: int) -> np.ndarray:
    p = 509
    g8 = tex["glass_u8"]
    ox, oy = x % p, y % p
    if w <= _TEX_EXT and h <= _TEX_EXT:
        return g8[oy : oy + h, ox : ox + w].copy()
    base = g8[:p, :p]
    return base.take(np.arange(oy, oy + h) % p, axis=0).take(np.arange(ox, ox + w) % p, axis=1)
