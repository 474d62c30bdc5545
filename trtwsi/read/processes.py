"""Slide reads in worker processes, decoded straight into shared (and page-locked) host memory.

Why processes: one process decoding JPEG tiles in threads tops out around 0.6 gigapixels/s on a
16-core host (the GIL is taken per tile; ``bench/results/read-*.json``), below what one GPU
consumes. Worker processes each open the slide themselves and decode regions into a ring of
buffers that live in one shared memory file (``/dev/shm``); the parent maps the same file and,
when a CUDA GPU is present, page-locks it (``cudaHostRegister``), so the host → device copy of a
chunk reads the very bytes the worker wrote: no extra copy, no pickling of pixels.

Only slides opened from a file can be read this way (the workers reopen it by path);
:func:`process_readable` says whether a slide qualifies.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from trtwsi.errors import TileReadError, TrtwsiError
from trtwsi.read.host import SharedBuffer

__all__ = ["ProcessReader", "ReaderStartError", "SharedBuffer", "process_readable"]


#: Strip height (rows) when a region is split across workers: a multiple of the usual 256/512
#: file-tile heights, so strips rarely share a file tile (which would decode it twice).
STRIP_ROWS = 512


class ReaderStartError(TrtwsiError):
    """The reader processes could not start (typically: a script using spawned processes
    without an ``if __name__ == "__main__":`` guard, or the slide fails to open in them)."""


def process_readable(slide) -> bool:
    """True when ``slide`` can be reopened by path in another process (TIFF/OpenSlide readers)."""
    from trtwsi.slide.array import ArraySlide

    return getattr(slide, "path", None) is not None and not isinstance(slide, ArraySlide)


# --- worker side -------------------------------------------------------------------------------
_W: dict = {}


def _worker_init(kind: str, path: str, mpp, on_error: str, shm_path: str, size: int) -> None:
    from trtwsi.slide import open_slide

    if kind == "openslide":
        from trtwsi.slide.openslide_reader import OpenSlideSlide

        _W["slide"] = OpenSlideSlide(path, mpp=mpp, on_error=on_error)
    else:
        _W["slide"] = open_slide(path, mpp=mpp, on_error=on_error, threads=1)
    fd = os.open(shm_path, os.O_RDWR)
    try:
        _W["map"] = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    _W["array"] = np.frombuffer(_W["map"], dtype=np.uint8)


def _worker_ping() -> int:
    return os.getpid()


def _worker_read(offset: int, x: int, y: int, w: int, h: int, level: int) -> list[dict]:
    """Read one region into the shared ring; return the tile errors it recorded (as dicts)."""
    slide = _W["slide"]
    out = _W["array"][offset : offset + w * h * 3].reshape(h, w, 3)
    before = len(slide.read_errors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent re-records and warns once
        slide.read_region(x, y, w, h, level=level, out=out)
    return [
        {"message": str(e), "level": e.level, "tile": e.tile, "region": e.region}
        for e in slide.read_errors[before:]
    ]


# --- parent side -------------------------------------------------------------------------------
class ProcessReader:
    """``processes`` worker processes reading ``slide`` into ``slots`` shared buffers.

    Args:
        slide: a slide opened from a file (:func:`process_readable`); tile errors the workers
            meet are recorded on it as if it had read them itself.
        processes: number of worker processes (spawned: safe with CUDA in the parent).
        slots: ring size; ``slot_bytes``: size of each slot (the largest chunk, h * w * 3).
        pin: page-lock the shared mapping with ``cudaHostRegister`` (needs CuPy and a GPU;
            skipped with a warning if it fails: copies are then synchronous but correct).

    :meth:`read` blocks the calling thread until the region is in the slot (call it from a
    reader thread); :meth:`close` stops the workers and releases the mapping.
    """

    def __init__(self, slide, processes: int, slots: int, slot_bytes: int, pin: bool = True):
        import multiprocessing as mp

        if not process_readable(slide):
            raise TrtwsiError(
                f"{slide!r} cannot be read in worker processes (not opened from a file); use "
                "readers='threads'"
            )
        self.slide = slide
        self.slot_bytes = int(slot_bytes)
        size = self.slot_bytes * int(slots)
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self._shm_path = tempfile.mkstemp(prefix="trtwsi-ring-", dir=shm_dir)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self.buffers = [
            SharedBuffer(self._array, i * self.slot_bytes, self.slot_bytes) for i in range(slots)
        ]
        self._registered = None
        if pin:
            self._pin(size)
        from trtwsi.slide.openslide_reader import OpenSlideSlide

        kind = "openslide" if isinstance(slide, OpenSlideSlide) else "auto"
        self._pool = ProcessPoolExecutor(
            max_workers=max(1, int(processes)),
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(kind, str(slide.path), slide.mpp, slide.on_error, self._shm_path, size),
        )
        self.processes = max(1, int(processes))
        self._start(self.processes)

    def _start(self, n: int) -> None:
        """Start every worker now, from the calling thread (not lazily from reader threads), and
        fail early with a clear error if they cannot start."""
        from concurrent.futures.process import BrokenProcessPool

        try:
            pings = [self._pool.submit(_worker_ping) for _ in range(n)]
            for f in pings:
                f.result(timeout=120)
        except (BrokenProcessPool, OSError, TimeoutError) as e:
            self.close()
            raise ReaderStartError(
                f"slide reader processes could not start ({type(e).__name__}: {e}). If this "
                "runs from a script, put its code under `if __name__ == '__main__':` (worker "
                "processes are spawned and re-import the main module), or use readers='threads'"
            ) from e

    def _pin(self, size: int) -> None:
        try:
            import cupy

            ptr = self._array.ctypes.data
            cupy.cuda.runtime.hostRegister(ptr, size, 0)
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

    def read(self, slot: int, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """Read level-0 origin ``(x, y)``, ``w × h`` read-level px at ``level`` into ``slot``;
        returns the ``(h, w, 3)`` view. Tile errors are recorded on ``self.slide``.

        The region is cut into horizontal strips (multiples of :data:`STRIP_ROWS` rows) decoded
        by different workers at once, so one large chunk is ready in a fraction of the time one
        process would need: the pipeline waits less for its first chunk of every grid. Strips
        need an integer downsample (``floor((y + r·ds) / ds) == floor(y / ds) + r``);
        otherwise the region is one task.
        """
        if w * h * 3 > self.slot_bytes:
            raise TrtwsiError(f"region {w}x{h} does not fit a {self.slot_bytes}-byte slot")
        buf = self.buffers[slot]
        ds = float(self.slide.levels[level].downsample)
        n = min(self.processes, -(-h // STRIP_ROWS)) if ds.is_integer() else 1
        rows = -(-h // max(n, 1))
        rows = -(-rows // STRIP_ROWS) * STRIP_ROWS
        futures = [
            self._pool.submit(
                _worker_read,
                buf.offset + r0 * w * 3,
                x,
                y + int(r0 * ds),
                w,
                min(rows, h - r0),
                level,
            )
            for r0 in range(0, h, rows)
        ]
        for f in futures:
            for e in f.result():
                tile = tuple(e["tile"]) if isinstance(e["tile"], list) else e["tile"]
                self.slide._tile_failed(
                    TileReadError(e["message"], level=e["level"], tile=tile, region=e["region"])
                )
        return buf.view((h, w, 3))

    def close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._registered is not None:
            import cupy

            cupy.cuda.runtime.hostUnregister(self._registered)
            self._registered = None
        if getattr(self, "_shm_path", None):
            with contextlib.suppress(OSError):
                os.unlink(self._shm_path)
            self._shm_path = None

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
