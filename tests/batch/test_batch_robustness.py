"""Batch robustness: tile-error limit, stale outputs, --slide-timeout, progress over slides, and
a manifest that survives a full disk, a file size limit and a read-only folder. Real slides,
the bundled demo model, real file systems (tmpfs mounts are skipped where mounting is refused)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.app.slides import MODEL, REPO, damaged_slide, small_slide
from trtwsi.app.cli import main
from trtwsi.batch import MANIFEST_NAME, Manifest, latest_slide_records, read_manifest, run_batch
from trtwsi.errors import BatchError, ManifestWriteError, OutputFolderError
from trtwsi.synthetic import make_slide


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(YOLO_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trtwsi.app.cli", *args],
        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=timeout,
    )  # fmt: skip


@contextlib.contextmanager
def _tmpfs(where: Path, opts: str):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), data[-80:]
    return [json.loads(line) for line in data.splitlines()]


BATCH = ["--model", str(MODEL), "--devices", "cpu", "--threads", "1", "--no-progress"]


# --- manifest -------------------------------------------------------------------------------
def test_manifest_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / MANIFEST_NAME
    m = Manifest(path, "r1")
    m.append({"record": "run", "event": "start"})
    m.append({"record": "slide", "slide": "a", "status": "done"})
    m.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"v":1,"run":"r1","record":"sli')  # killed mid-record
    m = Manifest(path, "r2")
    assert path.read_bytes() == whole  # the torn record is cut off, not glued to the next
    m.append({"record": "slide", "slide": "b", "status": "done"})
    m.close()
    assert [r.get("slide") for r in _whole_lines(path)] == [None, "a", "b"]


def test_manifest_file_size_limit_truncates_back_and_raises(tmp_path):
    """RLIMIT_FSIZE (a real kernel limit, EFBIG) cuts a record short: the manifest is truncated
    back to whole records and ManifestWriteError says what to do."""
    path = tmp_path / MANIFEST_NAME
    script = textwrap.dedent(
        f"""
        import resource, signal
        from trtwsi.batch import Manifest
        from trtwsi.errors import ManifestWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        m = Manifest({str(path)!r}, "r1")
        try:
            for i in range(100):
                m.append({{"record": "slide", "slide": f"s{{i}}", "status": "done", "pad": "x" * 40}})
        except ManifestWriteError as e:
            print("ERR", e)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ERR cannot write a record to the batch manifest"), r.stdout
    assert "File too large" in r.stdout and "rerun the same command" in r.stdout
    recs = _whole_lines(path)
    assert 5 <= len(recs) < 100 and path.stat().st_size <= 1000


def test_manifest_in_read_only_folder(tmp_path):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        with pytest.raises(ManifestWriteError, match="Read-only file system"):
            Manifest(ro / MANIFEST_NAME, "r1")
        with pytest.raises(OutputFolderError, match="cannot create the batch lock file"):
            run_batch([str(MODEL)], ro, [MODEL])  # refused before any worker starts


def test_batch_cli_full_disk_and_read_only(tmp_path):
    """A full disk (a tmpfs filled up) and a read-only --out: one line, exit 1, no traceback,
    no torn manifest."""
    slides = tmp_path / "slides"
    slides.mkdir()
    small_slide(slides / "a.tif", seed=1)
    with _tmpfs(tmp_path / "full", "size=256k") as full:
        out = full / "out"
        out.mkdir()
        with open(full / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        r = _cli("predict", str(slides), "--out", str(out), *BATCH)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert "cannot write a record to the batch manifest" in line
        assert "No space left on device" in line
        _whole_lines(out / MANIFEST_NAME)
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        r = _cli("predict", str(slides), "--out", str(ro), *BATCH)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert "cannot write into" in line and str(ro) in line


# --- slides that fail -------------------------------------------------------------------------
def test_failed_tiles_fail_the_slide_and_stale_outputs_are_renamed(tmp_path):
    """Run 1: both slides done. The file of one is then replaced by a copy whose tiles are all
    undecodable: run 2 records it failed (exit 4), and its run-1 outputs, which no longer
    describe it, become NAME.EXT.stale."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    small_slide(slides / "good.tif", seed=1)
    small_slide(slides / "later_bad.tif", seed=2)
    args = ["predict", str(slides), "--out", str(out), "--also", "csv", *BATCH]
    r = _cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "later_bad.geojson").exists() and (out / "later_bad.csv").exists()
    old = (out / "later_bad.geojson").read_bytes()

    damaged = damaged_slide(tmp_path / "damaged.tif", seed=2)
    shutil.copy(damaged, slides / "later_bad.tif")
    r = _cli(*args)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "failed later_bad: TooManyTileErrorsError" in r.stdout
    state = latest_slide_records(read_manifest(out / MANIFEST_NAME))
    assert state["good"]["status"] == "done"
    bad = state["later_bad"]
    assert bad["status"] == "failed" and bad["error"]["type"] == "TooManyTileErrorsError"
    assert bad["tile_errors"] > 0
    assert sorted(bad["stale_outputs"]) == ["later_bad.csv.stale", "later_bad.geojson.stale"]
    assert not (out / "later_bad.geojson").exists() and not (out / "later_bad.csv").exists()
    assert (out / "later_bad.geojson.stale").read_bytes() == old

    # accepting the damage: the slide is done again (its old outputs stay .stale)
    r = _cli(*args, "--max-tile-errors", "none")
    assert r.returncode == 0, r.stdout + r.stderr
    assert latest_slide_records(read_manifest(out / MANIFEST_NAME))["later_bad"]["status"] == "done"


def test_interrupt_right_after_a_done_record_keeps_the_slide_done(tmp_path, monkeypatch):
    """Ctrl-C landing after a slide's done record reached the manifest but before the
    coordinator's bookkeeping (a race seen once in CI): the slide stays done, with no
    ``interrupted`` record after it, and the rerun skips it."""
    from trtwsi.batch.jobs import BatchParams

    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    paths = [small_slide(slides / "a.tif", seed=1), small_slide(slides / "b.tif", seed=2)]
    real = Manifest.append

    def append(self, record):
        rec = real(self, record)
        if record.get("status") == "done":
            raise KeyboardInterrupt  # as if Ctrl-C came right after the write
        return rec

    monkeypatch.setattr(Manifest, "append", append)
    params = BatchParams(threads=1)
    with pytest.raises(KeyboardInterrupt):
        run_batch(paths, out, [MODEL], params, devices="cpu")
    monkeypatch.undo()
    recs = read_manifest(out / MANIFEST_NAME)
    (done,) = [r for r in recs if r.get("status") == "done"]
    assert not [r for r in recs[recs.index(done) + 1 :] if r.get("slide") == done["slide"]]
    assert recs[-1]["event"] == "interrupted" and recs[-1]["done"] == 1, recs[-1]
    summary = run_batch(paths, out, [MODEL], params, devices="cpu")
    assert summary.skipped == [done["slide"]] and len(summary.done) == 1


def test_slide_timeout_fails_one_slide_others_go_on(tmp_path, capsys):
    """A slide over --slide-timeout is failed (its worker restarted); the slides queued behind
    it on that worker still run. The progress bar counts slides and shows tiles/s."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    slides.mkdir()
    # Scanned at 3 µm/px, run at 0.5 µm/px (--mpp): ~200 tiles from a 3 Mpx file, minutes
    # even on a fast idle CPU (~0.25 s/tile); the small slides (0.5 µm/px) take 2 tiles each,
    # seconds even on a busy one (~2.5 s/tile).
    make_slide(slides / "a_big.tif", 2000, 1600, seed=4, n_sections=2, mpp=3.0, threads=2)
    small_slide(slides / "b.tif", seed=5)
    small_slide(slides / "c.tif", seed=6)
    argv = ["predict", str(slides), "--out", str(out), "--model", str(MODEL), "--devices", "cpu"]
    rc = main([*argv, "--threads", "1", "--mpp", "0.5", "--slide-timeout", "12"])
    cap = capsys.readouterr()
    assert rc == 4, cap.out + cap.err
    state = latest_slide_records(read_manifest(out / MANIFEST_NAME))
    assert state["a_big"]["status"] == "failed"
    assert state["a_big"]["error"]["type"] == "SlideTimeoutError"
    assert "--slide-timeout 12 s" in state["a_big"]["error"]["message"]
    assert state["b"]["status"] == state["c"]["status"] == "done"
    assert not (out / "a_big.geojson").exists()
    assert "slides:" in cap.err and "tiles/s" in cap.err and "3/3" in cap.err


def test_slide_timeout_refused_with_ray(tmp_path, capsys):
    with pytest.raises(BatchError, match="--slide-timeout works with the local worker pool"):
        run_batch([str(MODEL)], tmp_path / "o", [MODEL], ray=True, slide_timeout=5)
    assert main(["predict", str(MODEL), "--out", str(tmp_path / "o"), "--ray", "--slide-timeout",
                 "5", "--model", str(MODEL)]) == 1  # fmt: skip
    assert "--slide-timeout works with the local worker pool" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device", "gpu"], "--device 'gpu'"),
        (["--also", "xml"], "--also 'xml'"),
        (["--section", "-1"], "--section -1"),
        (["--slide-timeout", "0"], "--slide-timeout 0"),
        (["MISSING"], "slide path not found"),
    ],
)
def test_batch_refuses_before_loading_models(tmp_path, capsys, extra, needle):
    """A batch mistake is one line, exit 1, before the (here missing) model loads or a worker
    starts; nothing is created in --out."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.tif").write_bytes(b"not read: refused before")
    given = [str(slides)] + ([str(tmp_path / "nope.tif")] if extra == ["MISSING"] else [])
    extra = [] if extra == ["MISSING"] else extra
    argv = ["predict", *given, "--out", str(tmp_path / "o"), "--model", "/nonexistent.pt"]
    assert main([*argv, "--no-progress", *extra]) == 1
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert line.startswith("trtwsi predict: error: ") and needle in line, line
    assert not (tmp_path / "o").exists()
