"""bench/bench_seam_tail.py runs, checks every policy's detections against one merge of all
rows, and the tail drains add drains only at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_seam_tail.py"


def test_seam_tail_bench_small(tmp_path):
    out = tmp_path / "tail.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--tiles-side", "12", "--objects", "2000",
         "--interval", "0", "--repeat", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    res = doc["results"]
    assert doc["tiles"] == 144 and doc["same_detections"]
    assert res["all-at-end"]["drains"] == 0
    # 144 tiles, every=256: no drain by count; the tail rule drains as the slide ends
    assert res["every"]["drains"] == 0 and res["every-and-tail"]["drains"] >= 2
    assert len({v["detections"] for v in res.values()}) == 1
