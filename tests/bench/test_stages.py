"""bench/_stages.py: which resource bounds a slide, from its stage timings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _stages import bound_of


def test_the_busiest_resource_bounds_the_slide():
    t = {
        "sections": 0.1, "read": 4.8, "wait_read": 0.02, "launch": 0.3, "collect": 0.05,
        "wait_gpu": 0.3, "gpu_h2d": 0.12, "gpu_preprocess": 0.04, "gpu_infer": 0.66,
        "gpu_postprocess": 0.01, "merge": 0.03, "merge_early": 1.4, "total": 0.9,
    }  # fmt: skip
    b = bound_of(t, workers=16, seconds=0.9)
    assert b["bound"] == "gpu_compute"
    assert b["gpu_compute"] == pytest.approx(0.71) and b["gpu_copy"] == pytest.approx(0.12)
    assert b["pipeline_thread"] == pytest.approx(0.35) and b["readers"] == pytest.approx(0.3)
    assert b["serial"] == pytest.approx(0.13) and b["overlap"] == pytest.approx(0.93)
    assert "first_launch_at" not in b
    t.update(first_launch_at=0.21, last_return_at=0.84, planned_at=0.1, first_chunk_at=0.2004)
    b = bound_of(t, workers=16, seconds=0.9)
    assert b["first_launch_at"] == 0.21 and b["after_last_return"] == pytest.approx(0.06)
    assert b["planned_at"] == 0.1 and b["first_chunk_at"] == 0.2
    assert "first_submit_at" not in b


def test_readers_bound_with_few_workers_and_per_model_stages_add_up():
    t = {"read": 4.0, "gpu_infer_0": 0.2, "gpu_infer_1": 0.3, "gpu_place": 0.5, "launch": 0.1}
    b = bound_of(t, workers=2, seconds=2.5)
    assert b["bound"] == "readers" and b["readers"] == 2.0
    assert b["gpu_compute"] == pytest.approx(0.5) and b["gpu_copy"] == pytest.approx(0.5)
    assert b["overlap"] == pytest.approx(0.8)
    assert bound_of({}, workers=0, seconds=0.0)["overlap"] is None
