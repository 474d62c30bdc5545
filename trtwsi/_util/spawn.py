"""Spawned helper processes that do not re-run the user's script.

``multiprocessing``'s ``spawn`` start method makes every child import the parent's ``__main__``
module (as ``__mp_main__``). A user script without an ``if __name__ == "__main__":`` guard then
runs again in each child, which tries to start children of its own and dies; the parent sees a
broken pool. trtwsi's worker processes run functions of trtwsi modules only and never need the
user's ``__main__``, so they are started with it hidden: no guard needed.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

__all__ = ["await_pool", "main_module_hidden", "preload_decoders", "spawn_pool", "start_pool"]

_LOCK = threading.RLock()
_MISSING = object()


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """While active, processes started with ``spawn``/``forkserver`` do not import ``__main__``.

    ``multiprocessing.spawn.get_preparation_data`` reads ``__main__.__spec__`` and
    ``__main__.__file__`` when a process starts; both are hidden here and restored afterwards.
    Start processes (``Process.start``, a pool's launch) inside, not lazily later.
    """
    main = sys.modules.get("__main__")
    with _LOCK:
        if main is None:
            yield
            return
        saved = {k: getattr(main, k, _MISSING) for k in ("__spec__", "__file__")}
        try:
            main.__spec__ = None
            if saved["__file__"] is not _MISSING:
                del main.__file__
            yield
        finally:
            for k, v in saved.items():
                if v is not _MISSING:
                    setattr(main, k, v)


def preload_decoders() -> None:
    """Import the decoders a slide-reading worker needs (tifffile, imagecodecs, cv2) once, at
    start: otherwise the first slide a fresh worker gets waits ~0.3 s for them."""
    import contextlib
    import importlib

    for name in ("tifffile", "imagecodecs", "cv2"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _pid() -> int:
    import os

    return os.getpid()


def start_pool(processes: int, initializer=None, initargs: tuple = ()):
    """Start a ``ProcessPoolExecutor`` of ``processes`` spawned workers now (from this thread,
    with ``__main__`` hidden) without waiting for them: returns ``(pool, pings)``, one future
    per worker that completes once that worker has run ``initializer``. Pass both to
    :func:`await_pool`; the workers import and initialize while the caller does other work."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(
        max_workers=processes,
        mp_context=mp.get_context("spawn"),
        initializer=initializer,
        initargs=initargs,
    )
    try:
        with main_module_hidden():
            launch = getattr(pool, "_launch_processes", None)
            if launch is not None:  # start all now (CPython >= 3.9 spawns lazily otherwise)
                launch()
            pings = [pool.submit(_pid) for _ in range(processes)]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool, pings


def await_pool(pool, pings, timeout: float = 120):
    """Wait until every worker of :func:`start_pool` has answered; returns ``pool``. Raises
    what stopped them (``BrokenProcessPool``, ``OSError`` or ``TimeoutError``) after shutting
    the pool down."""
    try:
        for f in pings:
            f.result(timeout=timeout)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    return pool


def spawn_pool(processes: int, initializer=None, initargs: tuple = (), timeout: float = 120):
    """:func:`start_pool` then :func:`await_pool`: all workers started and each answering."""
    return await_pool(*start_pool(processes, initializer, initargs), timeout=timeout)
