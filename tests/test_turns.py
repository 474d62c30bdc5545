"""Turns: threads started in any order act in the order of their numbers."""

import threading
import time

import pytest

from trtwsi._util.turns import Turns


def test_threads_started_in_reverse_act_in_number_order():
    turns, seen = Turns(), []

    def work(n):
        with turns.turn(n):
            seen.append(n)
            time.sleep(0.001)  # a turn that takes a while still holds the ones after it

    threads = [threading.Thread(target=work, args=(n,)) for n in reversed(range(12))]
    for t in threads:
        t.start()
        time.sleep(0.002)  # the later numbers really are waiting before 0 starts
    for t in threads:
        t.join(10)
    assert seen == list(range(12))


def test_a_turn_that_raises_still_passes_on():
    turns, seen = Turns(), []

    def work(n):
        try:
            with turns.turn(n):
                if n == 1:
                    raise OSError("read failed")
                seen.append(n)
        except OSError:
            seen.append("failed")

    threads = [threading.Thread(target=work, args=(n,)) for n in (2, 1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert seen == [0, "failed", 2]


def test_a_number_taken_twice_is_refused():
    turns = Turns()
    with turns.turn(0):
        pass
    with pytest.raises(ValueError, match="turn 0 was taken already"), turns.turn(0):
        pass
    with turns.turn(1):  # the refusal passed nothing on, and broke nothing
        pass
