"""Turns: threads that started in any order act in the order of the numbers they were given."""

from __future__ import annotations

import contextlib
import threading

__all__ = ["Turns"]


class Turns:
    """``with turns.turn(n):`` blocks until turns ``0 … n-1`` have ended, and ends turn ``n``
    when the block is left (also by an exception), so the next one can start.

    Every number from 0 up must be taken exactly once, or the turns after a missing one wait
    for ever: hand the numbers out where the work is queued (in order), and enter the turn as
    the first thing the queued work does.
    """

    def __init__(self):
        self._next = 0
        self._cond = threading.Condition()

    def turn(self, n: int):
        return self._turn(int(n))

    @contextlib.contextmanager
    def _turn(self, n: int):
        with self._cond:
            if n < self._next:
                raise ValueError(f"turn {n} was taken already (next is {self._next})")
            while self._next != n:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._next = n + 1
                self._cond.notify_all()
