"""Tissue detection in worker processes, for planning many slides ahead of the GPU.

Finding a slide's tissue sections (thumbnail decode, stain feature, Otsu, morphology,
components) takes ~0.3–0.6 s of CPU for a 0.3-gigapixel slide, and planner threads share the
GIL with everything else in the runtime's process. A :class:`PlannerPool` runs
:func:`~trtwsi.plan.find_sections` in spawned processes that reopen the slide by path and send
back the sections (small: bboxes and thumbnail-resolution masks). The result is the same as
in-process detection: same code, same pixels.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

from trtwsi._util.spawn import preload_decoders, spawn_pool
from trtwsi.errors import ReaderStartError
from trtwsi.plan.tissue import Section, find_sections
from trtwsi.read.processes import SlideRef

__all__ = ["PlannerPool"]

_SLIDES: OrderedDict = OrderedDict()


def _sections(ref: SlideRef) -> list[Section]:
    slide = _SLIDES.pop(ref, None)
    if slide is None:
        if ref.kind == "openslide":
            from trtwsi.slide.openslide_reader import OpenSlideSlide

            slide = OpenSlideSlide(ref.path, mpp=ref.mpp, on_error=ref.on_error)
        else:
            from trtwsi.slide import open_slide

            slide = open_slide(ref.path, mpp=ref.mpp, on_error=ref.on_error, threads=2)
    _SLIDES[ref] = slide
    while len(_SLIDES) > 2:
        with contextlib.suppress(Exception):
            _SLIDES.popitem(last=False)[1].close()
    return find_sections(slide)


class PlannerPool:
    """``processes`` spawned processes computing tissue sections of slides opened from files.

    Raises :class:`~trtwsi.errors.ReaderStartError` when they cannot start.
    """

    def __init__(self, processes: int):
        from concurrent.futures.process import BrokenProcessPool

        self.processes = max(1, int(processes))
        self._pool = None
        try:
            self._pool = spawn_pool(self.processes, preload_decoders)
        except (BrokenProcessPool, OSError, TimeoutError) as e:
            raise ReaderStartError(
                f"planner processes could not start ({type(e).__name__}: {e})"
            ) from e

    def sections(self, slide) -> list[Section]:
        """The tissue sections of ``slide`` (a slide opened from a file), computed in a worker."""
        return self._pool.submit(_sections, SlideRef.of(slide)).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
