"""Tissue detection on the runtime's GPU, from planner threads.

:class:`GpuTissue` runs :func:`~trtwsi.plan.find_sections` with ``backend="cupy"`` on the
runtime's CUDA device, each planner thread on its own non-blocking stream (so it never waits
for, or holds up, the tile pipeline's streams). The thumbnail is still read and decoded on the
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
        self._local = threading.local()

    def sections(self, slide) -> list[Section] | None:
        """The sections of ``slide`` (an open Slide), or None when the GPU path has failed (then
        the caller finds them on the CPU). Errors of the slide itself (TrtwsiError) propagate."""
        if self.failed is not None:
            return None
        try:
            import cupy

            with cupy.cuda.Device(self.index):
                stream = getattr(self._local, "stream", None)
                if stream is None:
                    stream = self._local.stream = cupy.cuda.Stream(non_blocking=True)
                with stream:
                    found = find_sections(slide, backend="cupy")
                stream.synchronize()
                return found
        except TrtwsiError:
            raise
        except Exception as e:
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"tissue detection on cuda:{self.index} failed ({self.failed}); finding tissue "
                "on the CPU from now on",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
