"""The GPU session scripts of bench/ parse, and their shared start (bench/_gpu_run.sh) works on
any machine: a device call that dies on a shell error costs minutes of GPU time."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.sh")))
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shared_start_notes_the_tree_and_packs_results(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    code = (
        f'set -u; out={out}; r={scratch}; source {BENCH / "_gpu_run.sh"}; '
        'echo result > "$r/x.txt"; pack; type compile_bytecode > /dev/null; '
        'echo "$TRTWSI_BENCH_CACHE $YOLO_OFFLINE"'
    )
    r = subprocess.run(
        ["bash", "-c", code], capture_output=True, text=True, cwd=BENCH.parent, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["/tmp/bc", "1"]
    assert (scratch / "tree.txt").read_text()  # the GPU (or why not) and the commit
    with tarfile.open(out / "results.tgz") as t:
        names = {Path(n).name for n in t.getnames()}
    assert {"x.txt", "tree.txt"} <= names
