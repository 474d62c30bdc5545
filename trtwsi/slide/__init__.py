"""Open any whole-slide file (or array) as a :class:`Slide`.

Dispatch of :func:`open_slide` (a path that is not a regular file — FIFO, device,
directory — raises ``NotARegularFileError`` before anything is read):

- ``numpy.ndarray`` → :class:`ArraySlide`
- ``.png .jpg .jpeg .bmp .webp`` → :class:`ArraySlide` (decoded whole with OpenCV; small images
  only: the size declared in the header is checked first, ``ImageTooLargeError`` over
  :data:`~trtwsi.slide.array.MAX_ARRAY_PIXELS`, ``TruncatedImageError`` for a cut-short file)
- ``.svs .tif .tiff .ndpi .scn .bif .btf .tf8 .qptiff`` (and anything whose header is TIFF/BigTIFF)
  → :class:`TiffSlide` (tifffile + imagecodecs, tile-parallel reads)
- anything else, or a TIFF tifffile cannot read → :class:`OpenSlideSlide` when the ``openslide``
  extra is installed (``.mrxs``, ``.vms``, ``.czi`` …), else :class:`UnsupportedFormatError`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from trtwsi.errors import UnsupportedFormatError
from trtwsi.slide.array import ArraySlide
from trtwsi.slide.base import Level, OnError, Slide, SlideInfo
from trtwsi.slide.files import check_regular_file

__all__ = ["ArraySlide", "Level", "Slide", "SlideInfo", "open_slide"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
OPENSLIDE_ONLY_SUFFIXES = {".mrxs", ".vms", ".vmu", ".czi", ".dcm"}

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in _TIFF_MAGIC


def open_slide(
    src: str | os.PathLike | np.ndarray | Slide,
    *,
    mpp: float | None = None,
    on_error: OnError = "record",
    threads: int | None = None,
) -> Slide:
    """Open ``src`` as a Slide.

    ``mpp`` overrides (or supplies) microns per level-0 pixel. ``on_error``: what a file tile that
    fails to decode does ("record": fill + warning + ``slide.read_errors``; "raise"). ``threads``:
    decode threads of the TIFF reader (default: min(CPU count, 8)).
    """
    if isinstance(src, Slide):
        return src
    if isinstance(src, np.ndarray):
        return ArraySlide(src, mpp=mpp, on_error=on_error)
    path = check_regular_file(src)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return ArraySlide.from_file(path, mpp=mpp, on_error=on_error)
    if suffix not in OPENSLIDE_ONLY_SUFFIXES and _is_tiff(path):
        from trtwsi.slide.tiff import TiffSlide

        return TiffSlide(path, mpp=mpp, on_error=on_error, threads=threads)
    try:
        from trtwsi.slide.openslide_reader import OpenSlideSlide, openslide_available
    except ImportError:  # pragma: no cover
        openslide_available = lambda: False  # noqa: E731
    if openslide_available():
        return OpenSlideSlide(path, mpp=mpp, on_error=on_error)
    raise UnsupportedFormatError(
        f"{str(path)!r}: not a TIFF-family file or ordinary image, and OpenSlide is not installed "
        "to try other formats. Supported: .svs .ndpi .tif/.tiff (pyramidal, OME) .png .jpg; "
        "for .mrxs .vms .czi … install: pip install 'trtwsi[openslide]'"
    )
