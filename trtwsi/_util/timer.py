"""Wall-clock seconds per named stage."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

__all__ = ["Timer"]


class Timer:
    """Accumulates seconds per stage (thread-safe): ``add(stage, seconds)``, or ``timed(fn,
    stage)`` to time every call of ``fn``; ``t`` is the dict."""

    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.t[stage] += seconds

    def timed(self, fn, stage: str):
        """``fn`` that adds the seconds of every call (a failing one too) to ``stage``."""

        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)

        return call

    def rounded(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 6) for k, v in self.t.items()}
