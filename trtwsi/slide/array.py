"""In-memory slides: numpy arrays and ordinary images (PNG, JPEG, BMP, small TIFF via OpenCV)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trtwsi.errors import CorruptSlideError, UnsupportedFormatError
from trtwsi.slide.base import Level, OnError, Slide, level_downsample
from trtwsi.slide.color import to_rgb_uint8

#: Largest image held in memory by ArraySlide (RGB bytes = 3 × this).
MAX_ARRAY_PIXELS = 1 << 31


class ArraySlide(Slide):
    """A slide held in memory as one RGB uint8 ``(H, W, 3)`` array, with a computed pyramid.

    Levels: downsamples 1, 4, 16, … (area-averaged) until the longer side is < 1024 px, so
    ``thumbnail`` and tissue detection stay cheap on large arrays.
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
        self._images = [np.ascontiguousarray(img)]
        self.levels = [Level(img.shape[1], img.shape[0], 1.0)]
        while max(self._images[-1].shape[:2]) >= 1024:
            import cv2

            prev = self._images[-1]
            nh, nw = max(1, prev.shape[0] // 4), max(1, prev.shape[1] // 4)
            small = cv2.resize(prev, (nw, nh), interpolation=cv2.INTER_AREA)
            self._images.append(small)
            lv0 = self.levels[0]
            self.levels.append(Level(nw, nh, level_downsample(lv0.width, lv0.height, nw, nh)))
        self.mpp = mpp
        self.path = path
        self.format = format

    @classmethod
    def from_file(cls, path: str | Path, mpp: float | None = None, on_error: OnError = "record"):
        """Open a PNG/JPEG/BMP/... with OpenCV (16-bit and alpha are converted by to_rgb_uint8)."""
        import cv2

        path = Path(path)
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
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
        out[...] = self._images[level][y : y + h, x : x + w]
