"""Batch runs on the CPU: manifest, resume after SIGINT/SIGKILL, worker crash retry, Ray.

One batch of small synthetic slides (4 good, a truncated TIFF, a file of random bytes) is run
once uninterrupted (``reference``); every other run must give byte-identical GeoJSON and CSV.
Every run uses one torch thread per worker: CPU scores are bit-identical only at equal torch
thread counts (see trtwsi.batch.BatchParams).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trtwsi._util.resources import bundled_models_dir
from trtwsi.batch import (
    MANIFEST_NAME,
    BatchParams,
    Manifest,
    SlideJob,
    SlideRunner,
    discover_slides,
    job_key,
    latest_slide_records,
    model_spec,
    plan_batch,
    read_manifest,
    run_batch,
    slide_fingerprint,
    slide_names,
)
from trtwsi.batch.pools.local import parse_devices
from trtwsi.engines.model import Model
from trtwsi.errors import BatchError
from trtwsi.results import UnsupportedOutputFormatError
from trtwsi.synthetic import make_slide

REPO = Path(__file__).resolve().parents[2]
#: Folder whose sitecustomize.py injects one worker crash (TRTWSI_TEST_CRASH_ONCE=NAME:MARKER).
CRASH_HOOK_DIR = Path(__file__).resolve().parent / "crash_hook"
CRASH_HOOK_ENV = "TRTWSI_TEST_CRASH_ONCE"
MODEL = bundled_models_dir() / "demo-yolo11n.pt"
GOOD = ["s0", "s1", "s2", "s3"]
BAD = ["corrupt", "notaslide"]
FORMATS = (".geojson", ".csv")


def _params() -> BatchParams:
    return BatchParams(threads=1, formats=FORMATS, batch=4)


def _env() -> dict:
    """Environment for subprocesses: import this checkout's trtwsi, never the network."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(YOLO_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    for i, name in enumerate(GOOD):
        make_slide(d / f"{name}.tif", 1600, 1200, seed=200 + i, n_sections=2, threads=2)
    data = (d / "s0.tif").read_bytes()
    (d / "corrupt.tif").write_bytes(data[: len(data) // 3])  # truncated: tiles beyond EOF
    (d / "notaslide.svs").write_bytes(np.random.default_rng(0).bytes(50_000))
    (d / "notes.txt").write_text("not a slide")  # not picked up by the folder scan
    return d


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(MODEL)


@pytest.fixture(scope="module")
def reference(slides, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary = run_batch([slides], out, [model], _params(), devices="cpu")
    return out, summary


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in FORMATS}


def _slide_records(out: Path) -> list[dict]:
    return [r for r in read_manifest(out / MANIFEST_NAME) if r.get("record") == "slide"]


def _assert_complete(out: Path, reference_out: Path) -> list[dict]:
    """Every good slide done exactly once with the reference's bytes; the bad ones failed."""
    recs = _slide_records(out)
    done = Counter(r["slide"] for r in recs if r["status"] == "done")
    assert done == Counter(GOOD), done
    state = latest_slide_records(recs)
    assert {n: state[n]["status"] for n in BAD} == {n: "failed" for n in BAD}
    assert state["corrupt"]["error"]["type"] == "CorruptSlideError"
    assert "truncated" in state["corrupt"]["error"]["message"]
    assert _outputs(out) == _outputs(reference_out)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    return recs


# ------------------------------------------------------------------------------------------
# units (no worker processes)
# ------------------------------------------------------------------------------------------
def test_discover_names_and_keys(slides, model, tmp_path):
    found = discover_slides([slides], exclude=[tmp_path])
    assert [p.name for p in found] == ["corrupt.tif", "notaslide.svs"] + [f"{n}.tif" for n in GOOD]
    # files as given (any extension), duplicates dropped, output folder excluded from scans
    (slides / "out").mkdir(exist_ok=True)
    (slides / "out" / "x.tif").write_bytes(b"x")
    assert discover_slides([slides / "s0.tif", slides / "notes.txt", slides / "s0.tif"]) == [
        slides / "s0.tif",
        slides / "notes.txt",
    ]
    with pytest.raises(BatchError, match="slide path not found"):
        discover_slides([slides / "missing.tif"])
    with pytest.raises(BatchError, match="no slides found"):
        discover_slides([slides / "out"], exclude=[slides / "out"])
    names = slide_names([Path("/a/x.svs"), Path("/b/X.tif"), Path("/b/y.tif")])
    assert names[2] == "y" and names[0].startswith("x-") and names[1].startswith("X-")
    assert len(set(names)) == 3

    fp = slide_fingerprint(slides / "s0.tif")
    assert fp["size"] == (slides / "s0.tif").stat().st_size
    assert fp != slide_fingerprint(slides / "s1.tif")
    key = job_key(fp, [model], _params())
    # speed-only options do not change the key; what changes results does
    assert key == job_key(fp, [model], BatchParams(threads=2, formats=FORMATS, batch=16))
    assert key == job_key(fp, [model], BatchParams(threads=1, formats=FORMATS, decode="cpu"))
    assert key != job_key(fp, [model], BatchParams(threads=1, formats=FORMATS, overlap=0.3))
    assert key != job_key(fp, [model], BatchParams(formats=(".geojson",)))
    assert key != job_key(fp, [Model(MODEL, min_conf=0.3)], _params())
    with pytest.raises(UnsupportedOutputFormatError, match=r"\.tiff"):
        BatchParams(formats=("geojson", "tiff"))
    with pytest.raises(BatchError, match="'nvjpeg'"):
        BatchParams(decode="nvjpeg")


def test_engine_cache_loads_each_engine_once(model):
    """Predictors sharing an engine_cache (a batch worker's slides) reuse one loaded engine."""
    import trtwsi
    from trtwsi.synthetic import make_array

    cache: dict = {}
    img, _ = make_array(800, 700, seed=5)
    runs = [
        trtwsi.Predictor(img, [model], engine_cache=cache, device="cpu").run(
            region=(0, 0, 700, 700)
        )
        for _ in range(2)
    ]
    assert len(cache) == 1
    ((m, engine),) = cache.values()
    assert m is model and engine.model is model
    assert np.array_equal(runs[0].detections.to_numpy(), runs[1].detections.to_numpy())


def test_manifest_tolerates_a_torn_last_line(tmp_path):
    path = tmp_path / MANIFEST_NAME
    m = Manifest(path, "run1")
    m.append({"record": "slide", "slide": "a", "status": "done"})
    m.close()
    with open(path, "ab") as f:  # a record cut short by a hard kill
        f.write(b'{"record":"slide","slide":"b","sta')
    assert [r["slide"] for r in read_manifest(path)] == ["a"]
    m = Manifest(path, "run2")  # starts the next record on its own line
    m.append({"record": "slide", "slide": "b", "status": "failed"})
    m.close()
    recs = read_manifest(path)
    assert [(r["slide"], r["run"]) for r in recs] == [("a", "run1"), ("b", "run2")]
    assert latest_slide_records(recs)["b"]["status"] == "failed"


def test_parse_devices():
    assert parse_devices(None, cuda_count=0) == ["cpu"]
    assert parse_devices(None, cuda_count=2) == ["cuda:0"]
    assert parse_devices("all", cuda_count=0) == ["cpu"]
    assert parse_devices("all", cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert parse_devices("2, cuda:1", cuda_count=3) == ["cuda:2", "cuda:1"]
    assert parse_devices("cuda", cuda_count=1) == ["cuda:0"]
    assert parse_devices("1,0", cuda_count=2) == ["cuda:1", "cuda:0"]
    assert parse_devices("cpu,cpu,cpu", cuda_count=0) == ["cpu"] * 3
    with pytest.raises(BatchError, match="GPU 2 but 2 CUDA GPU"):
        parse_devices("0,2", cuda_count=2)
    with pytest.raises(BatchError, match="more than once"):
        parse_devices("0,cuda:0", cuda_count=1)
    with pytest.raises(BatchError, match="not a device"):
        parse_devices("gpu0", cuda_count=1)


# ------------------------------------------------------------------------------------------
# one batch, uninterrupted; rerun
# ------------------------------------------------------------------------------------------
def test_batch_writes_results_and_manifest(reference, slides, model):
    import torch

    import trtwsi

    out, summary = reference
    assert sorted(summary.done) == GOOD and sorted(summary.failed) == BAD
    assert summary.skipped == [] and summary.crashes == 0
    recs = _slide_records(out)
    # every slide: running, then exactly one final record
    for name in GOOD + BAD:
        assert next(r["status"] for r in recs if r["slide"] == name) == "running"
        assert len([r for r in recs if r["slide"] == name]) == 2
    s0 = summary.records["s0"]
    assert s0["outputs"] == ["s0.geojson", "s0.csv"] and s0["pixels"] == 1600 * 1200
    assert s0["n_detections"] == sum(s0["counts"]["demo-yolo11n"].values()) > 10
    assert s0["n_tiles"] > 0 and s0["seconds"] > 0 and s0["worker"] == "cpu"
    assert summary.records["notaslide"]["error"]["message"]
    assert not (out / "corrupt.geojson").exists()
    runs = [r for r in read_manifest(out / MANIFEST_NAME) if r.get("record") == "run"]
    assert [r["event"] for r in runs] == ["start", "end"]
    assert runs[1]["done"] == 4 and runs[1]["failed"] == 2
    assert runs[0]["models"][0]["sha256"] == model.sha256
    assert not list(out.glob(".*.tmp"))

    # a slide's batch results equal a plain single-slide run (same torch thread count)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = trtwsi.Predictor(slides / "s2.tif", [model], batch=4, workers=1).run()
    finally:
        torch.set_num_threads(n)
    res.save(out.parent / "single-s2.geojson")
    assert (out.parent / "single-s2.geojson").read_bytes() == (out / "s2.geojson").read_bytes()


def test_rerun_skips_done_and_retries_failed(reference, slides, model):
    out, _ = reference
    before = _outputs(out)
    summary = run_batch([slides], out, [model], _params(), devices="cpu")
    assert sorted(summary.skipped) == GOOD and summary.done == []
    assert sorted(summary.failed) == BAD  # retried, failed again, reported again
    assert _outputs(out) == before
    _assert_complete(out, out)
    # what a rerun with other settings would do (plan only): a changed key reruns every slide,
    # replacing the outputs the batch owns; --force reruns done slides with the same key
    state = latest_slide_records(read_manifest(out / MANIFEST_NAME))
    paths = discover_slides([slides])
    jobs, skipped, _ = plan_batch(paths, out, [Model(MODEL, min_conf=0.5)], _params(), state)
    assert skipped == [] and {j.name for j in jobs} == set(GOOD + BAD)
    assert all(j.overwrite for j in jobs)
    jobs, skipped, _ = plan_batch(paths, out, [model], _params(), state, force=True)
    assert skipped == [] and len(jobs) == 6
    (out / "s3.csv").unlink()  # a done slide whose output went missing runs again
    jobs, skipped, _ = plan_batch(paths, out, [model], _params(), state)
    assert sorted(j.name for j in jobs) == sorted([*BAD, "s3"])
    (out / "s3.csv").write_bytes(before["s3.csv"])


def test_slide_runner_refuses_files_it_does_not_own(slides, model, tmp_path):
    """In-process: outputs the manifest does not know are refused unless overwrite; a failed
    slide leaves none of its outputs."""
    spec = {**model_spec(model), "sha256": model.sha256}
    runner = SlideRunner([spec], BatchParams(formats=FORMATS), "cpu")
    (tmp_path / "s0.csv").write_text("user's file\n")
    job = SlideJob("s0", str(slides / "s0.tif"), "k", str(tmp_path))
    rec = runner(job)
    assert rec["status"] == "failed" and rec["error"]["type"] == "OutputExistsError"
    assert (tmp_path / "s0.csv").read_text() == "user's file\n"
    assert not (tmp_path / "s0.geojson").exists()
    bad = runner(SlideJob("corrupt", str(slides / "corrupt.tif"), "k", str(tmp_path)))
    assert bad["status"] == "failed" and not list(tmp_path.glob("corrupt*"))
    with pytest.raises(BatchError, match="changed since the batch started"):
        SlideRunner([{**spec, "sha256": "0" * 64}], BatchParams(), "cpu")


# ------------------------------------------------------------------------------------------
# resume after killing the CLI midway
# ------------------------------------------------------------------------------------------
def _cli(slides: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trtwsi.app.cli",
        "predict",
        str(slides),
        "--out",
        str(out),
        "--model",
        str(MODEL),
        "--devices",
        "cpu",
        "--threads",
        "1",
        "--batch",
        "4",
        "--also",
        "csv",
        *extra,
    ]


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default. A test run started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt, so the signal this test sends would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_resume_after_kill(reference, slides, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli(slides, out),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        recs = _slide_records(out) if out.exists() else []
        if any(r["status"] == "done" for r in recs):
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(sig)
    log = proc.communicate(timeout=60)[0]
    recs = _slide_records(out)
    first_done = {r["slide"] for r in recs if r["status"] == "done"}
    assert first_done and first_done < set(GOOD), log
    running = {r["slide"]: r for r in recs if r["status"] == "running"}
    if sig == signal.SIGINT:
        assert proc.returncode == 130, log
        assert "rerun the same command" in log
        # consistent manifest: every slide handed out got a final record, the run is closed
        final = latest_slide_records(recs)
        assert all(final[n]["status"] != "running" for n in running)
        assert any(r["status"] == "interrupted" for r in recs), log
        assert read_manifest(out / MANIFEST_NAME)[-1]["event"] == "interrupted"
        # only finished slides have outputs; nothing half-written
        assert {p.stem for p in out.glob("*.geojson")} == first_done
        assert not list(out.glob(".*.tmp"))
    else:
        assert proc.returncode == -signal.SIGKILL
        # the worker died with the coordinator (PR_SET_PDEATHSIG): nothing keeps writing
        pids = {r["pid"] for r in running.values()}
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and any(_alive(p) for p in pids):
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)

    rerun = subprocess.run(
        _cli(slides, out), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 4, rerun.stdout + rerun.stderr  # 4: some slides failed
    assert f"{len(first_done)} skipped" in rerun.stdout
    recs = _assert_complete(out, reference[0])
    # slides finished before the kill were not run again
    for name in first_done:
        assert len({r["run"] for r in recs if r["slide"] == name}) == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ------------------------------------------------------------------------------------------
# a worker process dies on a slide
# ------------------------------------------------------------------------------------------
def _assert_crash_retried(recs: list[dict], name: str) -> None:
    mine = [r for r in recs if r["slide"] == name]
    assert [r["status"] for r in mine] == ["running", "crashed", "running", "done"], mine
    crash = mine[1]
    assert crash["retry"] is True and crash["error"]["type"] == "WorkerCrash"
    assert mine[2]["attempt"] == 2 and mine[3]["attempt"] == 2


def test_worker_crash_is_retried(reference, slides, model, tmp_path, monkeypatch):
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv(CRASH_HOOK_ENV, f"s1:{marker}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(CRASH_HOOK_DIR), _env()["PYTHONPATH"]]))
    out = tmp_path / "out"
    summary = run_batch([slides], out, [model], _params(), devices="cpu,cpu")
    # every slide handed to the dead worker gets a crash record (it was in its runtime)
    assert marker.exists() and summary.crashes >= 1
    recs = _assert_complete(out, reference[0])
    _assert_crash_retried(recs, "s1")
    assert "exit code 86" in next(r for r in recs if r["status"] == "crashed")["error"]["message"]
    assert {r["slot"] for r in recs if r["status"] == "done"} <= {0, 1}


def test_no_worker_can_start(slides, tmp_path):
    """Weights that change under a running batch: the worker refuses them, the run stops with
    WorkerError naming the cause, and the manifest is closed (run aborted, no slide handed out)."""
    import shutil

    from trtwsi.errors import WorkerError

    weights = tmp_path / "m.pt"
    shutil.copy(MODEL, weights)
    m = Model(weights)
    assert m.sha256  # the coordinator's key uses the weights as they were here
    with open(weights, "ab") as f:
        f.write(b"changed")
    out = tmp_path / "out"
    with pytest.raises(WorkerError, match="changed since the batch started"):
        run_batch([slides / "s0.tif"], out, [m], _params(), devices="cpu")
    recs = read_manifest(out / MANIFEST_NAME)
    assert recs[-1]["record"] == "run" and recs[-1]["event"] == "aborted"
    assert [r["status"] for r in recs if r.get("record") == "slide"] == []


# ------------------------------------------------------------------------------------------
# Ray: a local cluster with CPU workers
# ------------------------------------------------------------------------------------------
@pytest.fixture
def local_ray(tmp_path):
    """A local Ray instance (2 CPUs, no dashboard) whose workers import this checkout and crash
    once on slide s2; yields (ray, crash marker path)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    marker = tmp_path / "crashed-once"
    path = os.pathsep.join([str(CRASH_HOOK_DIR), _env()["PYTHONPATH"]])
    env = {"PYTHONPATH": path, "YOLO_OFFLINE": "1", CRASH_HOOK_ENV: f"s2:{marker}"}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    try:
        yield ray, marker
    finally:
        ray.shutdown()


def test_ray_local_cluster(reference, slides, model, tmp_path, local_ray):
    ray, marker = local_ray
    out = tmp_path / "out"
    summary = run_batch([slides], out, [model], _params(), devices="cpu,cpu", ray=True)
    assert ray.is_initialized()  # a session the caller started is left running
    assert marker.exists() and summary.crashes == 1
    recs = _assert_complete(out, reference[0])
    _assert_crash_retried(recs, "s2")
    assert {r["worker"] for r in recs} == {"ray:cpu"}
    runs = [r for r in read_manifest(out / MANIFEST_NAME) if r.get("record") == "run"]
    assert runs[0]["runner"] == "ray" and runs[-1]["event"] == "end"
    # rerun semantics are the coordinator's, whichever runner: every done slide is skipped
    again = run_batch([slides / f"{n}.tif" for n in GOOD], out, [model], _params(), ray=True)
    assert sorted(again.skipped) == GOOD and again.done == []


# ------------------------------------------------------------------------------------------
# CLI argument errors (no workers start)
# ------------------------------------------------------------------------------------------
def test_cli_batch_argument_errors(slides, tmp_path, capsys):
    from trtwsi.app.cli import main

    base = ["predict", "--model", str(MODEL), "--no-progress"]
    assert main([*base, str(slides / "s0.tif"), str(slides / "s1.tif")]) == 1
    assert "needs --out DIR" in capsys.readouterr().err
    assert main([*base, str(slides), "--out", str(tmp_path / "o"), "--devices", "7"]) == 1
    assert "asks for GPU 7" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*base, str(slides), "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err
    assert main([*base, str(slides), "--out", str(tmp_path / "o"), "--also", "tiff"]) == 1
    assert "not supported" in capsys.readouterr().err
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()


def test_manifest_records_are_json_lines(reference):
    out, _ = reference
    for line in (out / MANIFEST_NAME).read_text().splitlines():
        rec = json.loads(line)
        assert rec["v"] == 1 and rec["record"] in ("run", "slide") and rec["time"]
