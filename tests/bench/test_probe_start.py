"""bench/probe_start.py runs on the CPU: the first chunk's reads in the reader processes."""

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
    reads = doc["reads"]
    assert reads["chunks"] >= 1 and reads["in_order"]["reads"] == reads["slots"]
    alone = reads["first_chunk"]["alone_in_pool"]
    for alone in reads["first_chunk"]["alone_in_pool"].values():
        assert len(alone["strip"]["all_ms"]) == 2 * alone["strips"]
        assert alone["spread"]["min_ms"] <= alone["wall"]["min_ms"]
        assert alone["max_strip_tiles"] > 0
