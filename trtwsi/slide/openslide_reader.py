"""Slides read through OpenSlide (optional extra ``openslide``).

Used for the formats tifffile cannot read (MIRAX .mrxs, Ventana .bif variants, .vms, DICOM …)
and as an independent oracle in tests. ``openslide`` is imported lazily: importing this module
never fails, :func:`openslide_available` says whether the library loads, and
:class:`OpenSlideSlide` raises :class:`~trtwsi.errors.MissingDependencyError` naming the extra.

Pixels: ``OpenSlide.read_region`` returns un-premultiplied RGBA; alpha is dropped and pixels
with alpha 0 (no scanned data there, e.g. between MIRAX tiles) become ``fill`` (255). Regions
outside the slide are filled by :meth:`Slide.read_region` before OpenSlide is asked.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np

from trtwsi.errors import (
    CorruptSlideError,
    MissingDependencyError,
    SlideError,
    TileReadError,
    UnsupportedFormatError,
)
from trtwsi.slide.base import Level, OnError, Slide
from trtwsi.slide.tiff import PLAUSIBLE_MPP, _positive


@functools.lru_cache(maxsize=1)
def openslide_available() -> bool:
    """True when ``import openslide`` works (openslide-python and the OpenSlide library)."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _import_openslide():
    try:
        import openslide
    except (ImportError, OSError) as e:
        raise MissingDependencyError(
            f"reading this slide with OpenSlide needs openslide-python and the OpenSlide library, "
            f"which are not importable ({e}). Install them with: pip install 'trtwsi[openslide]'"
        ) from e
    return openslide


class OpenSlideSlide(Slide):
    """A slide opened with OpenSlide; same contract as every :class:`Slide`.

    ``format`` is OpenSlide's vendor (``'aperio'``, ``'hamamatsu'``, ``'mirax'``,
    ``'generic-tiff'`` …). ``levels`` come from ``level_dimensions``; ``downsample`` is level-0
    width / level width (as for every trtwsi slide; OpenSlide's own ``level_downsamples`` is kept
    for the level-0 location it is given). ``mpp`` from ``openslide.mpp-x`` unless ``mpp=`` is
    given (ignored outside the plausible microscope range, as in :class:`TiffSlide`); ``properties`` are OpenSlide's (all strings) plus ``mpp_x``, ``mpp_y``,
    ``objective_power`` and ``vendor`` as numbers/strings like :class:`TiffSlide`'s.
    """

    def __init__(
        self, path: str | os.PathLike, mpp: float | None = None, on_error: OnError = "record"
    ):
        super().__init__(on_error=on_error)
        self._osr = None
        openslide = _import_openslide()
        self.path = Path(path)
        if not self.path.exists():
            from trtwsi.errors import SlideNotFoundError

            raise SlideNotFoundError(f"slide file not found: {str(self.path)!r} (check the path)")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise UnsupportedFormatError(
                f"{str(self.path)!r}: OpenSlide does not recognise this file ({e}); it is not a "
                "supported whole-slide format (supported: .svs .ndpi .tif .mrxs .vms .scn .bif "
                ".czi .dcm …) or it is not a slide at all"
            ) from e
        except openslide.OpenSlideError as e:
            raise CorruptSlideError(
                f"{str(self.path)!r}: OpenSlide could not open this file ({e}); it is damaged or "
                "truncated — copy or export it again"
            ) from e
        osr = self._osr
        self.format = openslide.OpenSlide.detect_format(str(self.path)) or "openslide"
        props = dict(osr.properties)
        self._os_downsamples = [float(d) for d in osr.level_downsamples]
        self.levels = []
        for i, (w, h) in enumerate(osr.level_dimensions):
            tw = props.get(f"openslide.level[{i}].tile-width")
            th = props.get(f"openslide.level[{i}].tile-height")
            self.levels.append(
                Level(
                    width=int(w),
                    height=int(h),
                    downsample=self._os_downsamples[i],
                    tile_width=int(tw) if tw else None,
                    tile_height=int(th) if th else None,
                )
            )
        file_mpp = _plausible_mpp(props.get("openslide.mpp-x"))
        if file_mpp is not None:
            props["mpp_x"] = file_mpp
            props["mpp_y"] = _plausible_mpp(props.get("openslide.mpp-y")) or file_mpp
        mag = _positive(props.get("openslide.objective-power"))
        if mag is not None:
            props["objective_power"] = mag
        if props.get("openslide.vendor"):
            props["vendor"] = props["openslide.vendor"]
        self.properties = props
        if mpp is not None and not float(mpp) > 0:
            raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
        self.mpp = float(mpp) if mpp is not None else file_mpp

    def _read_level(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        """Fill ``out`` (uint8 ``(h, w, 3)``) with level pixels ``[y:y+h, x:x+w]`` via OpenSlide.

        OpenSlide takes the top-left in level-0 pixels: ``round(x * level_downsample)`` with
        OpenSlide's own downsample, exact whenever the downsample is an integer.
        """
        if self._osr is None:
            raise SlideError(f"{str(self.path)!r}: read from a closed slide (open it again)")
        ds = self._os_downsamples[level]
        loc = (round(x * ds), round(y * ds))
        try:
            img = self._osr.read_region(loc, level, (w, h))
        except Exception as e:
            err = TileReadError(
                f"{str(self.path)!r}: OpenSlide failed to read level {level} region x={x} y={y} "
                f"w={w} h={h} ({type(e).__name__}: {e}); filled with {self.fill}. The file is "
                "damaged there (OpenSlide may refuse further reads: reopen the slide)",
                level=level,
                tile=None,
                region=(x, y, w, h),
                cause=e,
            )
            self._tile_failed(err)
            out[...] = self.fill
            return
        rgba = np.asarray(img)  # (h, w, 4) uint8, un-premultiplied
        out[...] = rgba[..., :3]
        empty = rgba[..., 3] == 0
        if empty.any():
            out[empty] = self.fill

    def close(self) -> None:
        """Close the OpenSlide handle."""
        osr, self._osr = getattr(self, "_osr", None), None
        if osr is not None:
            with contextlib.suppress(Exception):
                osr.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def _plausible_mpp(v) -> float | None:
    """µm/px, or None outside :data:`trtwsi.slide.tiff.PLAUSIBLE_MPP` (e.g. a generic TIFF's
    72 dpi default, which OpenSlide reports as 352.8 µm/px)."""
    f = _positive(v)
    return f if f is not None and PLAUSIBLE_MPP[0] <= f <= PLAUSIBLE_MPP[1] else None
