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
        f"set -u; out={out}; r={scratch}; source {BENCH / '_gpu_run.sh'}; "
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


def test_pack_ab_makes_one_results_json_and_trusts_no_path(tmp_path):
    """bench/pack_ab.py: the runs in the order given, the first run's device, the tests' last
    line; an archive member outside the folder is never written anywhere."""
    import io
    import json
    import sys

    def slides(sec):
        one = {"seconds": sec, "tissue_gpx_per_s": round(0.2 / sec, 3), "again": {"seconds": sec}}
        return {
            "gpu": {"name": "GPU X"},
            "host": {"cores": 16},
            "batch": 64,
            "slides": {"1gpx": one},
        }

    tgz = tmp_path / "results.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        files = {
            "./slides-a.json": json.dumps(slides(0.4)).encode(),
            "./slides-b.json": json.dumps(slides(0.5)).encode(),
            "./gpu-tests.txt": b"..s.\n3 passed, 1 skipped in 27.5s\n\n",
            "../evil.json": b"{}",
        }
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(BENCH / "pack_ab.py"), str(tgz), "--tree", "b=old", "--tree",
           "a=new (x=y)", "--what", "test", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert list(doc["runs"]) == ["b", "a"] and doc["runs"]["a"]["tree"] == "new (x=y)"
    assert doc["runs"]["a"]["slides"]["1gpx"]["seconds"] == 0.4
    assert doc["gpu"] == {"name": "GPU X"} and doc["gpu_tests"] == "3 passed, 1 skipped in 27.5s"
    assert "0.5 / 0.5 s" in r.stdout
    assert not (tmp_path.parent / "evil.json").exists()
    r = subprocess.run([*cmd[:3], "--tree", "c=missing", *cmd[7:]], capture_output=True, text=True)
    assert r.returncode != 0 and "slides-c.json is not in" in r.stderr
