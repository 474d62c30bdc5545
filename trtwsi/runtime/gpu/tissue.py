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
from trtwsi.plan.tissue import TISSUE_THUMBNAIL, Section, find_sections
from trtwsi.slide import open_slide

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
        """Run :meth:`sections` once on a synthetic slide (stained blobs on glass) whose
        thumbnail is full size (``TISSUE_THUMBNAIL``² px), so that CuPy compiles (or loads
        from its disk cache) every kernel of steps 1–4, the component stats and the section
        masks now, and its memory pool holds blocks of a real slide's sizes, not in the first
        slide's planning (there they cost about 0.1 s on an H100 host; on a fresh machine the
        compiles take seconds). Returns False (and marks this object failed, with a warning)
        if the GPU path does not work."""
        import numpy as np

        side = TISSUE_THUMBNAIL
        yy, xx = np.ogrid[:side, :side]
        img = np.full((side, side, 3), 236, np.uint8)
        for cx, cy, r in ((0.2, 0.3, 0.12), (0.7, 0.3, 0.15), (0.45, 0.8, 0.1)):
            img[(xx - cx * side) ** 2 + (yy - cy * side) ** 2 < (r * side) ** 2] = (170, 90, 150)
        slide = open_slide(img)
        try:
            found = self.sections(slide, thumbnail=img)
        except Exception as e:  # a TrtwsiError here is this code's fault, not a slide's
            self._give_up(e, "does not work", "")
            return False
        if found is None:  # sections() gave up and warned
            return False
        if len(found) != 3:
            self._give_up(
                RuntimeError(f"found {len(found)} sections on the 3-blob warm-up image"),
                "does not work",
                "",
            )
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
