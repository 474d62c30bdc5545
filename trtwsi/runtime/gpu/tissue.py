"""Tissue detection on the runtime's GPU, from planner threads.

:class:`GpuTissue` runs :func:`~trtwsi.plan.find_sections` with ``backend="cupy"`` on the
runtime's CUDA device on non-blocking streams (so it never waits for, or holds up, the tile
pipeline's streams): one per concurrent caller, reused, so CuPy's per-stream memory pool does
not grow with the number of planner threads a runtime starts over its life. The thumbnail is still read and decoded on the
host; steps 1–4 of the detection run on the GPU, the section assembly on the host.

If the CuPy path fails for a reason other than the slide (a CuPy without ``cupyx.scipy.ndimage``
or an error on the device), it warns once and the runtime finds tissue with OpenCV from then on.
"""

from __future__ import annotations

import threading
import warnings

from trtwsi.errors import TrtwsiError
from trtwsi.plan.tissue import Section, find_sections

__all__ = ["GpuTissue", "gpu_tissue_available"]


def gpu_tissue_available() -> bool:
    """True when CuPy with ``cupyx.scipy.ndimage`` (label, median, EDT) imports."""
    try:
        import cupy  # noqa: F401
        from cupyx.scipy.ndimage import distance_transform_edt, label, median_filter  # noqa: F401
    except Exception:
        return False
    return True


class GpuTissue:
    """Finds tissue sections on CUDA device ``index``; thread-safe."""

    def __init__(self, index: int):
        self.index = int(index)
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._streams: list = []  # idle streams

    def sections(self, slide, thumbnail=None) -> list[Section] | None:
        """The sections of ``slide`` (an open Slide), or None when the GPU path has failed (then
        the caller finds them on the CPU). Errors of the slide itself (TrtwsiError) propagate.
        ``thumbnail``: ``slide.thumbnail(TISSUE_THUMBNAIL)`` if the caller has read it."""
        if self.failed is not None:
            return None
        try:
            import cupy

            with cupy.cuda.Device(self.index):
                with self._lock:
                    stream = self._streams.pop() if self._streams else None
                if stream is None:
                    stream = cupy.cuda.Stream(non_blocking=True)
                try:
                    with stream:
                        found = find_sections(slide, backend="cupy", thumbnail=thumbnail)
                    stream.synchronize()
                finally:
                    with self._lock:
                        self._streams.append(stream)
                return found
        except TrtwsiError:
            raise
        except Exception as e:
            self._give_up(e, "failed", "from now on")
            return None

    def _give_up(self, e: Exception, what: str, when: str) -> None:
        """Mark the GPU path failed (``self.failed``) and say so once."""
        self.failed = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"tissue detection on cuda:{self.index} {what} ({self.failed}); finding tissue on "
            f"the CPU {when}".rstrip(),
            RuntimeWarning,
            stacklevel=3,
        )

    def warm(self) -> bool:
        """Run steps 1–4 once on a small synthetic thumbnail (two stained blobs on glass), so
        that CuPy compiles (or loads from its disk cache) every kernel now, not in the first
        slide's planning; the first run on a fresh machine compiles for seconds. Returns
        False (and marks this object failed, with a warning) if the GPU path does not work."""
        import numpy as np

        yy, xx = np.mgrid[:192, :256]
        thumb = np.full((192, 256, 3), 236, np.uint8)
        for cx, cy, r in ((70, 90, 40), (180, 100, 50)):
            thumb[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (170, 90, 150)
        try:
            import cupy

            from trtwsi.plan.tissue import DEFAULT_MIN_CONTRAST
            from trtwsi.plan.tissue_nd import components

            with cupy.cuda.Device(self.index):
                stream = cupy.cuda.Stream(non_blocking=True)
                with stream:
                    components(thumb, threshold=None, min_contrast=DEFAULT_MIN_CONTRAST,
                               merge_radius=4.0, backend="cupy")  # fmt: skip
                stream.synchronize()
                with self._lock:
                    self._streams.append(stream)
        except Exception as e:
            self._give_up(e, "does not work", "")
            return False
        return True

    def close(self) -> None:
        """Drop the streams and return CuPy's cached blocks of this device to the driver."""
        with self._lock:
            self._streams.clear()
        try:
            import cupy

            with cupy.cuda.Device(self.index):
                cupy.get_default_memory_pool().free_all_blocks()
        except Exception:
            pass
