"""In-memory slides: numpy arrays and ordinary images (PNG, JPEG, BMP, small TIFF via OpenCV)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from trtwsi.errors import CorruptSlideError, ImageTooLargeError, UnsupportedFormatError
from trtwsi.slide.base import Level, OnError, Slide, level_downsample
from trtwsi.slide.color import to_rgb_uint8
from trtwsi.slide.files import check_regular_file
from trtwsi.slide.image_header import probe_image

#: Largest image decoded whole into memory: ordinary images (JPEG/PNG/BMP…) opened by
#: :meth:`ArraySlide.from_file`, and untiled (strip) or single-tile TIFF segments that must be
#: decoded in one piece. 2**28 px = 768 MiB as RGB uint8 (16384 × 16384); the declared size is
#: checked from the file header before anything is decoded.
MAX_ARRAY_PIXELS = 1 << 28


_CONVERT = "vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90"


def check_decode_size(path, width: int, height: int, what: str = "image") -> None:
    """Raise :class:`ImageTooLargeError` when a ``width`` × ``height`` image (declared in a
    header) is over :data:`MAX_ARRAY_PIXELS`, the limit for decoding an image whole."""
    if width * height > MAX_ARRAY_PIXELS:
        raise ImageTooLargeError(
            f"{path}: {what} of {width}x{height} = {width * height} px is over the "
            f"{MAX_ARRAY_PIXELS} px limit for an image decoded whole into memory "
            f"(trtwsi.slide.array.MAX_ARRAY_PIXELS; {3 * width * height / 2**30:.1f} GiB as RGB). "
            f"Convert it to a tiled pyramidal TIFF, which is read tile by tile: {_CONVERT}"
        )


class ArraySlide(Slide):
    """A slide held in memory as one RGB uint8 ``(H, W, 3)`` array, with a computed pyramid.

    Levels: downsamples 1, 4, 16, … (area-averaged) until the longer side is < 1024 px, so
    ``thumbnail`` and tissue detection stay cheap on large arrays; each is made on its first
    read, so opening costs nothing and reading only level 0 never makes them.
    """

    def __init__(
        self,
        image: np.ndarray,
        mpp: float | None = None,
        path: Path | None = None,
        format: str = "array",
        on_error: OnError = "record",
    ):
        super().__init__(on_error=on_error)
        img = to_rgb_uint8(image)
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise CorruptSlideError(f"image has an empty dimension: shape {img.shape}")
        self._images: list[np.ndarray | None] = [np.ascontiguousarray(img)]
        self._build = threading.RLock()  # a level builds the one above it first
        self.levels = [Level(img.shape[1], img.shape[0], 1.0)]
        h, w = img.shape[:2]
        while max(h, w) >= 1024:
            h, w = max(1, h // 4), max(1, w // 4)
            lv0 = self.levels[0]
            self.levels.append(Level(w, h, level_downsample(lv0.width, lv0.height, w, h)))
            self._images.append(None)  # built on first read (0.57 s for 16384² at open)
        self.mpp = mpp
        self.path = path
        self.format = format

    @classmethod
    def from_file(cls, path: str | Path, mpp: float | None = None, on_error: OnError = "record"):
        """Open a PNG/JPEG/BMP/... with OpenCV (16-bit and alpha are converted by to_rgb_uint8).

        Before decoding, the header's declared size is checked against :data:`MAX_ARRAY_PIXELS`
        (:class:`ImageTooLargeError`) and a JPEG without EOI / PNG without IEND is refused
        (:class:`~trtwsi.errors.TruncatedImageError`); see :mod:`trtwsi.slide.image_header`.
        """
        import cv2

        path = check_regular_file(path)
        header = probe_image(path)  # raises TruncatedImageError for a cut-short JPEG/PNG
        if header is not None:
            check_decode_size(path, header.width, header.height, header.kind.upper())
        try:
            img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        except cv2.error as e:  # e.g. over OpenCV's own 2**30 px limit (formats not probed)
            msg = str(e).strip()[-300:]
            if "CV_IO_MAX_IMAGE_PIXELS" in msg or "validateInputImageSize" in msg:
                raise ImageTooLargeError(
                    f"{path}: the image is over OpenCV's size limit for decoding ({msg}); "
                    f"convert it to a tiled pyramidal TIFF: {_CONVERT}"
                ) from e
            raise CorruptSlideError(f"{path}: OpenCV failed to decode this image ({msg})") from e
        if img is None:
            raise UnsupportedFormatError(
                f"{path}: OpenCV could not decode this file as an image (corrupt or not an image)"
            )
        if img.ndim == 3 and img.shape[2] >= 3:
            img = img[:, :, [2, 1, 0, *range(3, img.shape[2])]]  # BGR(A) -> RGB(A)
        return cls(
            img,
            mpp=mpp,
            path=path,
            format=path.suffix.lower().lstrip(".") or "image",
            on_error=on_error,
        )

    def _read_level(self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
        out[...] = self._level_image(level)[y : y + h, x : x + w]

    def _level_image(self, level: int) -> np.ndarray:
        """Level ``level``'s pixels: the previous level area-averaged 4×, made on first use
        (reads of level 0 alone, e.g. a region run, never pay for the pyramid)."""
        img = self._images[level]
        if img is not None:
            return img
        with self._build:
            if self._images[level] is None:
                import cv2

                prev = self._level_image(level - 1)
                lv = self.levels[level]
                self._images[level] = cv2.resize(
                    prev, (lv.width, lv.height), interpolation=cv2.INTER_AREA
                )
            return self._images[level]
