"""Bookkeeping of the GPU pipeline, free of CUDA so CPU tests can drive it with fake events.

- :class:`ChunkRing`: device chunk slots, the event after which each slot's upload is done
  (``uploaded``), the event after which it may be overwritten (``free``: the preprocess of the
  last batch that cut tiles from it) and how many of its tiles wait in a partial batch.
- :class:`BatchBuilder`: collects tiles into batches of one input-size group and one read
  geometry; :meth:`~BatchBuilder.take` hands out a :class:`PendingBatch`.
- :class:`SlideRun` and :class:`SlideTracker`: per-slide state (rows, timer, error) and the
  rule that a slide is finished when all its chunks were taken, none of its tiles waits in a
  partial batch and none of its batches is in flight; finished slides are handed on in the
  order they came. ``on_tiles`` hears of every batch's tiles as they come back (their rows
  are in ``run.rows`` by then), so the seam merge can run beside the rest of the slide.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from trtwsi._util.timer import Timer

#: Yielded by a slide stream while its next slide is still being opened or planned.
IDLE = object()

__all__ = [
    "IDLE",
    "BatchBuilder",
    "ChunkRing",
    "PendingBatch",
    "SlideRun",
    "SlideTracker",
]


class ChunkRing:
    """``slots`` device chunk slots used round robin."""

    def __init__(self, slots: int):
        self.slots = int(slots)
        self.uploaded: list = [None] * self.slots
        self.free: list = [None] * self.slots
        self.pending = [0] * self.slots
        self._next = 0

    def next_slot(self) -> int:
        d = self._next
        self._next = (d + 1) % self.slots
        return d

    def preprocessed(self, slots, event) -> None:
        """The batch's preprocess (recorded as ``event``) read these slots."""
        for d in slots:
            self.free[d] = event


@dataclass(eq=False)  # identity: runs are dict keys
class SlideRun:
    """One slide in the stream: its ``plan`` (or the ``error`` that stopped it), per-model
    ``rows`` (lists of ``(M, 8)`` arrays), a :class:`~trtwsi._util.timer.Timer`, and counters
    the tracker keeps. ``tag``: whatever the caller attached (e.g. a batch job)."""

    index: int
    source: object
    plan: object = None
    error: BaseException | None = None
    tag: object = None
    rows: list = field(default_factory=list)
    timer: Timer = field(default_factory=Timer)
    pending: int = 0
    inflight: int = 0
    issued: bool = False
    t_start: float = 0.0
    #: perf_counter of the slide's start marks (None before): planning done, first chunk
    #: read submitted (to a reader thread), first CPU read queued with the reader processes
    #: and back from them, first chunk taken by the pipeline (read or GPU-decoded), first
    #: batch launched, last batch returned. The tracker turns them into the timings
    #: ``planned_at``, ``first_submit_at``, ``first_queued_at``, ``first_read_at``,
    #: ``first_chunk_at``, ``first_launch_at`` and ``last_return_at`` (seconds after
    #: ``t_start``): before the first launch, only planning and reads ran; after the last
    #: return, only the merge
    t_planned: float | None = None
    t_first_submit: float | None = None
    t_first_queued: float | None = None
    t_first_read: float | None = None
    t_first_chunk: float | None = None
    t_first_launch: float | None = None
    t_last_return: float | None = None
    #: what merges the slide's rows while its tiles come back (runtime/seams.py), or None
    seams: object = None

    def fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e

    @property
    def finished(self) -> bool:
        return self.issued and self.pending == 0 and self.inflight == 0


@dataclass
class PendingBatch:
    """Tiles of one batch: ``n`` real tiles with their arena byte ``offsets``, row ``strides``,
    level-0 ``origins``, device ``slots``, ``sections``, slide-wide ``tiles`` ids; ``runs``
    (distinct slides) and ``runs_index`` (per tile, into ``runs``). ``done``, ``out_slot`` and
    ``events`` are set at launch."""

    group: int
    geometry: tuple
    offsets: list = field(default_factory=list)
    strides: list = field(default_factory=list)
    origins: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    sections: np.ndarray | list = field(default_factory=list)
    tiles: np.ndarray | list = field(default_factory=list)
    runs: list = field(default_factory=list)
    runs_index: list = field(default_factory=list)
    done: object = None
    out_slot: int = 0
    events: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.offsets)

    def share(self) -> dict:
        """Fraction of the batch's tiles per slide (to split batch-level times)."""
        counts = np.bincount(np.asarray(self.runs_index, dtype=np.int64), minlength=len(self.runs))
        return {r: float(c) / self.n for r, c in zip(self.runs, counts, strict=True)}

    def tiles_of(self) -> dict:
        counts = np.bincount(np.asarray(self.runs_index, dtype=np.int64), minlength=len(self.runs))
        return {r: int(c) for r, c in zip(self.runs, counts, strict=True)}


class BatchBuilder:
    """Collects up to ``batch`` tiles of one group and geometry."""

    def __init__(self, batch: int):
        self.batch = int(batch)
        self._pb: PendingBatch | None = None

    def accepts(self, group: int, geometry: tuple) -> bool:
        pb = self._pb
        return pb is None or pb.n == 0 or (pb.group == group and pb.geometry == geometry)

    def add(self, *, run, group, geometry, slot, offset, stride, origin, section, tile) -> None:
        pb = self._pb
        if pb is None or pb.n == 0:
            pb = self._pb = PendingBatch(group=group, geometry=geometry)
        elif (pb.group, pb.geometry) != (group, geometry):
            raise ValueError("take() the pending batch before adding tiles of another geometry")
        if pb.n >= self.batch:
            raise ValueError("batch is full: take() it first")
        if not pb.runs or pb.runs[-1] is not run:
            pb.runs.append(run)
        pb.runs_index.append(len(pb.runs) - 1)
        pb.offsets.append(offset)
        pb.strides.append(stride)
        pb.origins.append(origin)
        pb.slots.append(slot)
        pb.sections.append(section)
        pb.tiles.append(tile)

    def full(self) -> bool:
        return self._pb is not None and self._pb.n >= self.batch

    def take(self) -> PendingBatch | None:
        pb, self._pb = self._pb, None
        if pb is None or pb.n == 0:
            return None
        pb.sections = np.asarray(pb.sections, dtype=np.int64)
        pb.tiles = np.asarray(pb.tiles, dtype=np.int64)
        return pb


class SlideTracker:
    """Hands finished slides to ``on_done`` in the order they were added, and the slide-wide
    ids of each returned batch's tiles to ``on_tiles(run, tiles)`` per slide (from the thread
    that calls :meth:`returned`, after the batch's rows were added to ``run.rows``)."""

    def __init__(
        self,
        on_done: Callable[[SlideRun], None],
        on_tiles: Callable[[SlideRun, np.ndarray], None] | None = None,
    ):
        self.on_done = on_done
        self.on_tiles = on_tiles
        self._order: deque[SlideRun] = deque()

    def add(self, run: SlideRun) -> None:
        self._order.append(run)

    def issued(self, run: SlideRun) -> None:
        run.issued = True
        self._emit()

    def launched(self, pb: PendingBatch, ring: ChunkRing | None = None) -> None:
        now = time.perf_counter()
        for run, n in pb.tiles_of().items():
            run.pending -= n
            run.inflight += 1
            if run.t_first_launch is None:
                run.t_first_launch = now
        if ring is not None:
            for d in pb.slots:
                ring.pending[d] -= 1

    def returned(self, pb: PendingBatch) -> None:
        now = time.perf_counter()
        for run in pb.runs:
            run.inflight -= 1
            run.t_last_return = now
        if self.on_tiles is not None:
            owner = np.asarray(pb.runs_index, dtype=np.int64)
            tiles = np.asarray(pb.tiles, dtype=np.int64)
            for ri, run in enumerate(pb.runs):
                if run.error is None and run.plan is not None:
                    self.on_tiles(run, tiles[owner == ri] if len(pb.runs) > 1 else tiles)
        self._emit()

    def _emit(self) -> None:
        while self._order and self._order[0].finished:
            run = self._order.popleft()
            for name, t in (
                ("planned_at", run.t_planned),
                ("first_submit_at", run.t_first_submit),
                ("first_queued_at", run.t_first_queued),
                ("first_read_at", run.t_first_read),
                ("first_chunk_at", run.t_first_chunk),
                ("first_launch_at", run.t_first_launch),
                ("last_return_at", run.t_last_return),
            ):
                if t is not None and run.t_start:
                    run.timer.add(name, t - run.t_start)
            self.on_done(run)

    def drain(self) -> None:
        """End of the stream: every slide must be finished by now."""
        self._emit()
        if self._order:
            left = [r.index for r in self._order]
            raise RuntimeError(f"slides {left} did not finish (pipeline bookkeeping bug)")
