"""Wall-clock seconds per named stage."""

from __future__ import annotations

import threading
from collections import defaultdict

__all__ = ["Timer"]


class Timer:
    """Accumulates seconds per stage (thread-safe): ``add(stage, seconds)``; ``t`` is the dict."""

    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.t[stage] += seconds

    def rounded(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 6) for k, v in self.t.items()}
