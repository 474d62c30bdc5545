"""bench/probe_start.py runs on the CPU: the tissue profile and the first chunk's reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "probe_start.py"


def test_start_probe_small(tmp_path):
    from trtwsi.synthetic import make_slide

    slide = tmp_path / "s.tif"
    make_slide(slide, 9000, 7000, seed=2, n_sections=2)
    out = tmp_path / "start.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--slide", str(slide), "--repeat", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    cv = doc["tissue"]["cv2"]
    assert cv["sections"] == 2 and cv["same_sections_as_first_backend"]
    assert list(cv["steps_median_ms"]) == ["sections"]
    reads = doc["reads"]
    assert reads["chunks"] >= 1 and reads["in_order"]["reads"] == reads["slots"]
    alone = reads["first_chunk"]["alone_in_pool"]
    assert len(alone["strip_s"]["all_ms"]) == 2 * alone["strips"]
    assert alone["spread_s"]["min_ms"] <= alone["wall"]["min_ms"]
