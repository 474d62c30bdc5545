"""Slide reads in worker processes, decoded straight into shared (and page-locked) host memory.

Why processes: one process decoding JPEG tiles in threads tops out around 0.6 gigapixels/s on a
16-core host (the GIL is taken per tile; ``bench/results/read-*.json``), below what one GPU
consumes. Worker processes decode regions into a ring of buffers that live in one shared memory
file (``/dev/shm``); the owner maps the same file and, when a CUDA GPU is present, page-locks it
(``cudaHostRegister``), so the host → device copy of a chunk reads the very bytes the worker
wrote: no extra copy, no pickling of pixels.

The pool is not tied to a slide: a request names the slide (:class:`SlideRef`: path, reader
kind, mpp, on_error), the level, the region and the ring slot; each worker keeps a few slides
open (:data:`OPEN_SLIDES`, least recently used closed first). So one pool serves every slide a
:class:`~trtwsi.runtime.Runtime` runs, and starts once per runtime, not per slide.

Only slides opened from a file can be read this way; :func:`process_readable` says which.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from trtwsi._util.env import env_setting
from trtwsi._util.spawn import await_pool, preload_decoders, start_pool
from trtwsi.errors import (
    ReaderStartError,
    RegionError,
    RuntimeStateError,
    TileReadError,
)
from trtwsi.read.host import SharedBuffer
from trtwsi.slide.base import region_parts

__all__ = ["OPEN_SLIDES", "PendingRead", "ReaderPool", "SlideRef", "process_readable"]


#: Strip boundary unit (level rows) when a region is split across workers and its level has no
#: file tiles (strip-stored TIFF, OpenSlide without tile sizes); tiled levels cut on their tile rows.
STRIP_ROWS = 512
#: Slides each worker keeps open (file handles, parsed headers).
OPEN_SLIDES = 4


class SlideRef(NamedTuple):
    """How a worker process reopens a slide: ``kind`` is ``"openslide"`` or ``"auto"``."""

    path: str
    kind: str
    mpp: float | None
    on_error: str

    @classmethod
    def of(cls, slide) -> SlideRef:
        from trtwsi.slide.openslide_reader import OpenSlideSlide

        kind = "openslide" if isinstance(slide, OpenSlideSlide) else "auto"
        return cls(str(slide.path), kind, slide.mpp, slide.on_error)


def process_readable(slide) -> bool:
    """True when ``slide`` can be reopened by path in another process (TIFF/OpenSlide readers)."""
    from trtwsi.slide.array import ArraySlide

    return getattr(slide, "path", None) is not None and not isinstance(slide, ArraySlide)


# --- worker side -------------------------------------------------------------------------------
_W: dict = {}


def touched_rows(top: int, h: int, unit: int) -> tuple[int, int]:
    """The first tile row (level rows ``[first·unit, (first+1)·unit)``) and how many tile rows
    the level rows ``[top, top + h)`` touch."""
    first = top // unit
    return first, -(-(top + h) // unit) - first


def strips(
    top: int, h: int, n: int, unit: int, weights: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """At most ``n`` horizontal strips ``(first row, rows)`` covering rows ``[0, h)`` of a
    region whose first row is level row ``top``. Every inner boundary lies on a multiple of
    ``unit`` level rows (the file's tile height), so no tile row is decoded by two workers: cut
    anywhere else, a JPEG tile row on the cut is decoded twice (with 512-row strips of 256-row
    tiles, 1.5× the decode work of a chunk).

    The cuts balance the strips' decode work: ``weights`` ``(R,)``, one per tile row the region
    touches (:func:`touched_rows`: ``R`` rows, the first holding ``top``), is
    what each costs (e.g. the file tiles the read's parts reach in it); None: every touched row
    costs the same (a partly covered row is a whole row of tiles to decode). A lone read waits
    for its slowest strip, so a region touching 16 rows over 16 workers is cut into 16 one-row
    strips, not 15 with a two-row one.
    """
    first, rows = touched_rows(top, h, unit)
    n = max(1, min(n, rows))
    w = np.ones(rows) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (rows,):
        raise ValueError(
            f"weights must have one value per touched tile row ({rows}), got {w.shape}"
        )
    cum = np.concatenate([[0.0], np.cumsum(w)])  # cum[b]: the work of the first b rows
    if n == rows:  # a row each: the least work the slowest strip can get
        bounds = range(1, rows)
    else:
        bounds = []
        for k in range(1, n):
            target = cum[-1] * k / n
            b = int(np.searchsorted(cum, target))  # the first b with cum[b] >= target
            if b > 0 and target - cum[b - 1] < cum[b] - target:
                b -= 1  # the nearer boundary
            bounds.append(b)
    cuts = [0]
    for b in bounds:
        c = (first + b) * unit - top
        if cuts[-1] < c < h:
            cuts.append(c)
    cuts.append(h)
    return [(a, b - a) for a, b in itertools.pairwise(cuts)]


def row_weights(parts: np.ndarray, x: int, top: int, h: int, unit: int, tile_w: int) -> np.ndarray:
    """Per tile row a region touches (:func:`touched_rows`), the file tiles that the
    ``(x, y, w, h)`` ``parts`` (region px; the region's top-left at level px ``(x, top)``)
    reach in it: ``(R,)`` float64."""
    first, rows = touched_rows(top, h, unit)
    if not len(parts):
        return np.zeros(rows)
    px, py, pw, ph = (np.asarray(parts[:, k], dtype=np.int64) for k in range(4))
    c0, c1 = (x + px) // tile_w, (x + px + pw - 1) // tile_w
    r0, r1 = (top + py) // unit - first, (top + py + ph - 1) // unit - first
    base = int(c0.min())
    hit = np.zeros((rows, int(c1.max()) - base + 1), dtype=bool)
    for a, b, c, d in zip(r0.tolist(), r1.tolist(), (c0 - base).tolist(), (c1 - base).tolist(),
                          strict=True):  # fmt: skip
        hit[a : b + 1, c : d + 1] = True
    return hit.sum(axis=1).astype(np.float64)


def _strip_parts(a: np.ndarray, r0: int, rows: int) -> np.ndarray:
    """The ``(x, y, w, h)`` rectangles of ``a`` (:func:`~trtwsi.slide.base.region_parts`,
    region px) that reach rows ``[r0, r0 + rows)``, clipped to them and moved to the strip's
    own rows."""
    top = np.maximum(a[:, 1], r0)
    bottom = np.minimum(a[:, 1] + a[:, 3], r0 + rows)
    keep = bottom > top
    return np.stack([a[keep, 0], top[keep] - r0, a[keep, 2], bottom[keep] - top[keep]], axis=1)


def _strips_setting(value: str | None) -> int | str:
    """``$TRTWSI_READ_STRIPS`` (checked by :func:`~trtwsi._util.env.env_setting`) →
    ReaderPool.strips: ``"adaptive"`` (also when unset) or a positive int."""
    return "adaptive" if value in (None, "adaptive") else int(value)


def _worker_init(shm_path: str, size: int) -> None:
    fd = os.open(shm_path, os.O_RDWR)
    try:
        _W["map"] = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    _W["array"] = np.frombuffer(_W["map"], dtype=np.uint8)
    _W["slides"] = OrderedDict()
    preload_decoders()


def _open(ref: SlideRef):
    slides: OrderedDict = _W["slides"]
    slide = slides.get(ref)
    if slide is not None:
        slides.move_to_end(ref)
        return slide
    if ref.kind == "openslide":
        from trtwsi.slide.openslide_reader import OpenSlideSlide

        slide = OpenSlideSlide(ref.path, mpp=ref.mpp, on_error=ref.on_error)
    else:
        from trtwsi.slide import open_slide

        slide = open_slide(ref.path, mpp=ref.mpp, on_error=ref.on_error, threads=1)
    slides[ref] = slide
    while len(slides) > OPEN_SLIDES:
        _, old = slides.popitem(last=False)
        with contextlib.suppress(Exception):
            old.close()
    return slide


def _worker_read(
    ref: SlideRef, offset: int, x: int, y: int, w: int, h: int, level: int, only=None
) -> list[dict]:
    """Read one region of ``ref`` into the shared ring at byte ``offset`` (``only``: as
    :meth:`~trtwsi.slide.Slide.read_region`); return the tile errors it met (as dicts). A
    slide that fails to open raises (the caller's slide fails)."""
    slide = _open(ref)
    out = _W["array"][offset : offset + w * h * 3].reshape(h, w, 3)
    before = len(slide.read_errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent re-records and warns once
        slide.read_region(x, y, w, h, level=level, out=out, only=only)
    errs = slide.read_errors[before:]
    del slide.read_errors[before:]  # the parent's slide keeps them; the cache stays small
    return [{"message": str(e), "level": e.level, "tile": e.tile, "region": e.region} for e in errs]


# --- owner side --------------------------------------------------------------------------------
class PendingRead:
    """A read queued by :meth:`ReaderPool.submit`: its strips' futures and where they land."""

    def __init__(self, pool: ReaderPool, slide, view: np.ndarray):
        self._pool, self._slide, self._view = pool, slide, view
        self.futures: list = []
        self._done = False

    def result(self) -> np.ndarray:
        """Wait for every strip; record their tile errors on the slide; return the
        ``(h, w, 3)`` uint8 view of the slot. Raises what a worker raised (a slide that
        failed to open) once all strips are done."""
        if self._done:
            raise RuntimeStateError("PendingRead.result() was called twice")
        self._done = True
        results, first = [], None
        try:
            for f in self.futures:
                try:
                    results.append(f.result())
                except BaseException as e:
                    first = first or e
        finally:
            self._pool._read_done()
        if first is not None:
            raise first
        for errors in results:
            for e in errors:
                tile = tuple(e["tile"]) if isinstance(e["tile"], list) else e["tile"]
                self._slide._tile_failed(
                    TileReadError(e["message"], level=e["level"], tile=tile, region=e["region"])
                )
        return self._view


class ReaderPool:
    """``processes`` worker processes decoding slide regions into ``slots`` shared buffers.

    Args:
        processes: number of worker processes (spawned: safe with CUDA in the parent; the
            caller's ``__main__`` module is not re-imported by them, so a script without an
            ``if __name__ == "__main__":`` guard works too).
        slots: ring size; ``slot_bytes``: size of each slot (the largest chunk, h × w × 3).
        pin: page-lock the shared mapping with ``cudaHostRegister`` (needs CuPy and a GPU;
            skipped with a warning if it fails: copies are then synchronous but correct).
        wait: wait for every worker to start (import its decoders) before returning. With
            False the workers start in the background and :meth:`ready` (which :meth:`read`
            calls) waits for them, so the caller can load models meanwhile.

    :meth:`read` blocks the calling thread until the region is in the slot (call it from a
    reader thread); :meth:`close` stops the workers and removes the shared file.

    Raises:
        ReaderStartError: the workers could not start (the message says why and what to do).
    """

    def __init__(
        self, processes: int, slots: int, slot_bytes: int, pin: bool = True, wait: bool = True
    ):
        self.processes = max(1, int(processes))
        #: strips per read: an int caps them (1: one task per region); "adaptive" (the
        #: default; ``$TRTWSI_READ_STRIPS`` overrides it) cuts a read into ``processes / reads
        #: in flight`` strips: all workers on a lone read (a slide's first chunk), one task
        #: each when the ring is full, so this process' pool threads pickle fewer tasks under
        #: the GIL the launch loop needs (4 Gpx slide on an H100 host: 0.84-0.89 s vs
        #: 0.92-0.95 s with ``processes`` strips on every read)
        self.strips: int | str = _strips_setting(env_setting("TRTWSI_READ_STRIPS"))
        self._reading = 0  # reads in flight (for "adaptive")
        self._reading_lock = threading.Lock()
        self.slot_bytes = int(slot_bytes)
        self.size = self.slot_bytes * int(slots)
        self._pool = None
        self._pings = None
        self._ready_lock = threading.Lock()
        self._registered = None
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.shm_path = tempfile.mkstemp(prefix="trtwsi-ring-", dir=shm_dir)
        try:
            os.ftruncate(fd, self.size)
            self._map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self.buffers = [
            SharedBuffer(self._array, i * self.slot_bytes, self.slot_bytes) for i in range(slots)
        ]
        if pin:
            self._pin()
        try:
            self._pool, self._pings = start_pool(
                self.processes, _worker_init, (self.shm_path, self.size)
            )
        except OSError as e:
            self._fail(e)
        if wait:
            self.ready()

    def _fail(self, e: BaseException):
        self.close()
        raise ReaderStartError(
            f"slide reader processes could not start ({type(e).__name__}: {e}); "
            "use readers='threads' (--readers threads) to read in this process"
        ) from e

    def ready(self, timeout: float = 120) -> None:
        """Wait until every worker has started (once; later calls return at once).

        Raises:
            ReaderStartError: a worker died or did not answer within ``timeout`` seconds.
        """
        if self._pings is None:
            return
        from concurrent.futures.process import BrokenProcessPool

        with self._ready_lock:
            if self._pings is None:
                return
            try:
                await_pool(self._pool, self._pings, timeout=timeout)
            except (BrokenProcessPool, OSError, TimeoutError) as e:
                self._pool = None  # (await_pool shut it down)
                self._fail(e)
            self._pings = None

    def _pin(self) -> None:
        try:
            import cupy

            ptr = self._array.ctypes.data
            cupy.cuda.runtime.hostRegister(ptr, self.size, 0)
            self._registered = ptr
        except Exception as e:  # page-locking is an optimization: keep going without it
            warnings.warn(
                f"could not page-lock the shared read buffers ({type(e).__name__}: {e}); "
                "host-to-device copies will be synchronous",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def pinned(self) -> bool:
        return self._registered is not None

    def read(
        self, slot: int, slide, x: int, y: int, w: int, h: int, level: int, only=None
    ) -> np.ndarray:
        """Read level-0 origin ``(x, y)``, ``w × h`` read-level px at ``level`` of ``slide``
        into ``slot``; returns the ``(h, w, 3)`` uint8 view. Tile errors are recorded on
        ``slide`` as if it had read them itself. ``only``: the parts that will be used, as
        :meth:`~trtwsi.slide.Slide.read_region` takes them (a strip no part touches is not
        read at all). :meth:`submit` then :meth:`PendingRead.result`.
        """
        return self.submit(slot, slide, x, y, w, h, level, only).result()

    def submit(
        self, slot: int, slide, x: int, y: int, w: int, h: int, level: int, only=None
    ) -> PendingRead:
        """Queue the read of :meth:`read` with the workers and return at once; the region is
        in ``slot`` once the returned :class:`PendingRead`'s ``result()`` returns (call it
        exactly once). The workers take queued strips first come, first served, so the reads
        submitted first are decoded first.

        The region is cut into horizontal strips (:func:`strips`, cut on the level's file-tile
        rows) decoded by different workers at once, so one large chunk is ready in a fraction
        of the time one process would need. Strips need an integer downsample
        (``floor((y + r·ds) / ds) == floor(y / ds) + r``); otherwise the region is one task.
        """
        if w * h * 3 > self.slot_bytes:
            raise RegionError(f"region {w}x{h} does not fit a {self.slot_bytes}-byte slot")
        self.ready()
        if self._pool is None:
            raise RuntimeStateError("the reader pool is closed")
        ref = SlideRef.of(slide)
        if only is not None:
            only = region_parts(only)
        buf = self.buffers[slot]
        lv = slide.levels[level]
        ds = float(lv.downsample)
        with self._reading_lock:
            self._reading += 1
            reading = self._reading
        pending = PendingRead(self, slide, buf.view((h, w, 3)))
        try:
            if self.strips == "adaptive":
                n = -(-self.processes // reading)
            else:
                n = min(self.processes, self.strips)
            if ds.is_integer():
                unit, top = lv.tile_height or STRIP_ROWS, y // int(ds)
                weights = None
                if only is not None and lv.tile_width:
                    weights = row_weights(only, x // int(ds), top, h, unit, lv.tile_width)
                parts = strips(top, h, n, unit, weights)
            else:
                parts = [(0, h)]
            for r0, rows in parts:
                sub = None if only is None else _strip_parts(only, r0, rows)
                if sub is not None and not len(sub):
                    continue
                at = buf.offset + r0 * w * 3
                pending.futures.append(
                    self._pool.submit(
                        _worker_read, ref, at, x, y + int(r0 * ds), w, rows, level, sub
                    )
                )
        except BaseException:
            with contextlib.suppress(BaseException):  # the first error is the one to raise
                pending.result()  # waits for what was queued, then counts the read as done
            raise
        return pending

    def _read_done(self) -> None:
        with self._reading_lock:
            self._reading -= 1

    def level_reader(self, slot: int, slide):
        """A ``read_level(level, x, y, w, h, out)`` callable for :meth:`Slide.thumbnail
        <trtwsi.slide.Slide.thumbnail>` that decodes in the workers, through ``slot`` (which the
        caller holds alone meanwhile): level px ``(x, y)``, ``w × h`` into ``out``. Levels of a
        non-integer downsample, and regions larger than a slot, are read by ``slide`` itself."""

        def read_level(level: int, x: int, y: int, w: int, h: int, out: np.ndarray) -> None:
            ds = float(slide.levels[level].downsample)
            if not ds.is_integer() or w * h * 3 > self.slot_bytes:
                slide._read_level(level, x, y, w, h, out)
                return
            out[...] = self.read(slot, slide, int(x * ds), int(y * ds), w, h, level)

        return read_level

    def close(self) -> None:
        """Stop the workers (waiting for them), unregister and remove the shared file."""
        self._pings = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._registered is not None:
            import cupy

            with contextlib.suppress(Exception):
                cupy.cuda.runtime.hostUnregister(self._registered)
            self._registered = None
        if self.shm_path:
            with contextlib.suppress(OSError):
                os.unlink(self.shm_path)
            self.shm_path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
