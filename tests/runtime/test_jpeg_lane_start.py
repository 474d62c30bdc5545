"""The GPU JPEG lane's background start (``start_lane``), driven on the CPU: torchvision's
decoder runs there too, so the probe, the wait for the warm-up and its bound are real; only
nvJPEG itself needs the GPU (tests/runtime/test_pipeline.py, marker ``gpu``)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("imagecodecs")

from trtwsi.runtime.gpu import jpeg_lane


def test_probe_waits_for_go_then_builds_the_lane():
    go = threading.Event()
    fut = jpeg_lane.start_lane("cpu", None, depth=2, go=go)
    time.sleep(0.3)
    assert not fut.done()  # imported, then waiting for the warm-up
    t0 = time.perf_counter()
    go.set()
    lane = fut.result(timeout=120)
    assert isinstance(lane, jpeg_lane.JpegLane), lane
    assert lane.depth == 2 and 0 < fut.seconds < time.perf_counter() - t0 + 120
    lane.close()


def test_probe_never_waits_forever(monkeypatch):
    """A pipeline that fails before its warm-up and forgets the go: the probe gives up (its
    thread is not a daemon, so waiting forever would hold up the interpreter's exit)."""
    monkeypatch.setattr(jpeg_lane, "GO_TIMEOUT", 0.2)
    fut = jpeg_lane.start_lane("cpu", None, go=threading.Event())
    why = fut.result(timeout=60)
    assert isinstance(why, str) and "no go after" in why and "TimeoutError" in why


def test_probe_reports_why_the_decoder_cannot_run(monkeypatch):
    import trtwsi.read.jpeg_batch as jb

    monkeypatch.setattr(jb, "jpeg_batch_unavailable", lambda device: "no decoder here")
    assert jpeg_lane.start_lane("cpu", None).result(timeout=60) == "no decoder here"
