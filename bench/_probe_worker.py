"""A reader-process task that says when it ran (imported by bench/probe_start.py's workers)."""

from __future__ import annotations

import os
import time

from trtwsi.read import processes


def timed_read(*args) -> tuple[float, float, int]:
    """:func:`trtwsi.read.processes._worker_read` (same arguments) → ``(start, end, pid)``
    (``time.perf_counter``: one clock for every process of the host)."""
    t0 = time.perf_counter()
    processes._worker_read(*args)
    return t0, time.perf_counter(), os.getpid()
