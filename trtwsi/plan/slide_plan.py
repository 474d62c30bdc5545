"""A slide's plan: what to read and run, decided before any tile is read.

:func:`plan_slide` finds the tissue sections (or takes a region), and builds one
:class:`~trtwsi.plan.grid.TileGrid` per target and model input size. A plan owns nothing on a
device: it is a description of tiles that flows through a :class:`~trtwsi.runtime.Runtime`.

Tile ids: tile ``k`` of target ``t`` at input size ``s`` has the slide-wide id
``plan.tile_base[s][t] + k``, so detections can name the tile they came from (the seam merge
compares only boxes of different tiles).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from trtwsi.errors import TilingError, UsageError
from trtwsi.plan.grid import TileGrid
from trtwsi.plan.tissue import Section, find_sections

__all__ = ["SlideOptions", "SlidePlan", "plan_slide"]


@dataclass(frozen=True)
class SlideOptions:
    """What a slide is run with (``trtwsi predict``'s per-slide options).

    ``overlap``: tile overlap, ratio in [0, 1) or model px. ``mpp``: µm/px of the models' input
    (None: level-0 px as they are). ``section``: one section index (reading order) or None for
    all; ``region``: a level-0 ``(x, y, w, h)`` instead of sections. ``min_tissue``: drop tiles
    whose tissue fraction is below this. ``merge``: options of
    :func:`trtwsi.merge.merge_detections`.
    """

    overlap: float = 0.2
    mpp: float | None = None
    section: int | None = None
    region: tuple[int, int, int, int] | None = None
    min_tissue: float = 0.0
    merge: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.section is not None and self.region is not None:
            raise UsageError("give either section= or region=, not both")
        if self.region is not None:
            x, y, w, h = (int(v) for v in self.region)
            if w <= 0 or h <= 0:
                raise TilingError(f"region must have positive size, got {self.region}")
            object.__setattr__(self, "region", (x, y, w, h))


@dataclass
class SlidePlan:
    """The tiles of one slide. ``targets``: ``(section index or -1, Section or level-0 box)``;
    ``grids[imgsz]``: one TileGrid per target; ``tile_base[imgsz]``: slide-wide id of each
    grid's first tile; ``sections``: JSON-ready section descriptions; ``seconds``: planning
    wall time."""

    slide: object
    options: SlideOptions
    targets: list
    grids: dict[int, list[TileGrid]]
    tile_base: dict[int, list[int]]
    sections: list[dict]
    seconds: float

    @property
    def n_tiles(self) -> int:
        """Tiles over all targets and input sizes."""
        return sum(len(g) for grids in self.grids.values() for g in grids)


def plan_slide(
    slide, imgsizes: Sequence[int], options: SlideOptions, sections: list[Section] | None = None
) -> SlidePlan:
    """Plan ``slide`` (an open :class:`~trtwsi.slide.Slide`) for models of the given input
    sizes; ``sections``: the slide's tissue sections when already found elsewhere. Raises a :class:`~trtwsi.errors.TrtwsiError` for a section that does not exist."""
    t0 = time.perf_counter()
    if options.region is not None:
        targets: list = [(-1, options.region)]
        sections_info: list[dict] = []
    else:
        found: list[Section] = find_sections(slide) if sections is None else list(sections)
        sections_info = [
            {"index": s.index, "bbox": list(map(int, s.bbox)), "area": int(s.area)} for s in found
        ]
        if options.section is not None:
            if not 0 <= options.section < len(found):
                raise TilingError(
                    f"section {options.section} does not exist: this slide has {len(found)} "
                    f"tissue section(s) (0..{len(found) - 1}); run `trtwsi info` to list them"
                )
            found = [found[options.section]]
        targets = [(s.index, s) for s in found]
    grids: dict[int, list[TileGrid]] = {}
    bases: dict[int, list[int]] = {}
    base = 0
    for size in dict.fromkeys(int(s) for s in imgsizes):
        grids[size] = [
            TileGrid(
                slide,
                target,
                tile_size=size,
                overlap=options.overlap,
                mpp=options.mpp,
                min_tissue=options.min_tissue,
            )
            for _, target in targets
        ]
        bases[size] = []
        for g in grids[size]:
            bases[size].append(base)
            base += len(g)
    return SlidePlan(
        slide=slide,
        options=options,
        targets=targets,
        grids=grids,
        tile_base=bases,
        sections=sections_info,
        seconds=time.perf_counter() - t0,
    )
