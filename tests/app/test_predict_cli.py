"""`trtwsi predict` on one slide: everything checked before the run, one-line errors, rescue
file, tile-error limit, one progress bar, Ctrl-C. Real slides, the bundled demo model."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.app.slides import MODEL, REPO, damaged_slide, small_slide
from trtwsi.app.cli import build_parser, main
from trtwsi.errors import OutputWriteError

MISSING_MODEL = "/nonexistent/weights.pt"  # loading it would fail: its error must not come first


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(YOLO_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trtwsi.app.cli", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return small_slide(tmp_path_factory.mktemp("slide") / "s.tif", seed=5)


@pytest.fixture(scope="module")
def two_sections(tmp_path_factory) -> Path:
    return small_slide(
        tmp_path_factory.mktemp("slide2") / "two.tif", seed=6, size=(1600, 1200), n_sections=2
    )


def _one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("trtwsi predict: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.mark.parametrize(
    "case",
    [
        "exists",
        "suffix",
        "also",
        "parent_is_file",
        "missing_slide",
        "device_gpu",
        "section",
        "decode_gpu_on_cpu",
        "decode_gpu_batch",
        "compile_on_cpu",
        "compile_on_cpu_batch",
    ],
)
def test_predict_refuses_before_loading_models(case, slide, tmp_path, capsys):
    """Each mistake is reported (one line, exit 1) before the models load: the model path does
    not exist, so any later check would report that instead."""
    out = tmp_path / "r.geojson"
    args = [str(slide), "--model", MISSING_MODEL, "--device", "cpu", "--no-progress"]
    needle = {
        "exists": "already exists",
        "suffix": "'.tiff' is not supported",
        "also": "--also 'xml'",
        "parent_is_file": "is a file",
        "missing_slide": "does not exist",
        "device_gpu": "--device 'gpu'",
        "section": "--section 7: this slide has 1 tissue section",
        "decode_gpu_on_cpu": "--decode gpu decodes JPEG tiles on the GPU, but this run is on cpu",
        "decode_gpu_batch": "--decode gpu decodes JPEG tiles on the GPU, but this run is on cpu",
        "compile_on_cpu": "--compile compiles the model for a CUDA GPU, but this run is on cpu",
        "compile_on_cpu_batch": "--compile compiles the model for a CUDA GPU, but this run is on cpu",
    }[case]
    if case == "exists":
        out.write_text("old")
    elif case == "suffix":
        out = tmp_path / "r.tiff"
    elif case == "also":
        args += ["--also", "xml"]
    elif case == "parent_is_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "r.geojson"
    elif case == "missing_slide":
        args[0] = str(tmp_path / "nope.tif")
    elif case == "device_gpu":
        args[args.index("cpu")] = "gpu"
    elif case == "section":
        args += ["--section", "7"]
    elif case == "decode_gpu_on_cpu":
        args += ["--decode", "gpu"]
    elif case == "decode_gpu_batch":  # two slides: the batch path
        args += ["--decode", "gpu"]
        args.insert(1, str(slide))
        out = tmp_path / "batch-out"
    elif case == "compile_on_cpu":
        args += ["--compile"]
    elif case == "compile_on_cpu_batch":
        args += ["--compile"]
        args.insert(1, str(slide))
        out = tmp_path / "batch-out"
    assert main(["predict", *args, "--out", str(out)]) == 1
    _one_line_error(capsys.readouterr().err, needle)
    if case != "exists":
        assert not out.exists()
    else:
        assert out.read_text() == "old"


def test_device_error_is_one_line_without_traceback(slide, tmp_path):
    """`--device gpu` (and cuda on a machine without one) in a real process: one line, exit 1."""
    for dev in ("gpu", "cuda:9"):
        r = _cli("predict", str(slide), "--device", dev, "--out", str(tmp_path / "x.geojson"))
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        _one_line_error(r.stderr, f"--device '{dev}'")


def test_read_only_output_folder(slide, tmp_path, capsys):
    """A read-only file system (a real read-only tmpfs mount; root ignores chmod)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        args = ["predict", str(slide), "--model", MISSING_MODEL, "--no-progress"]
        assert main([*args, "--out", str(ro / "r.geojson")]) == 1
        _one_line_error(capsys.readouterr().err, "cannot write into", str(ro))
        assert main([*args, "--out", str(ro / "sub" / "r.geojson")]) == 1
        _one_line_error(capsys.readouterr().err, "cannot write into")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_every_option_has_help():
    """Every argument of every subcommand says what it does in --help."""
    ap = build_parser()
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [("trtwsi", ap)] + [(n, p) for s in subs for n, p in s.choices.items()]
    missing = [
        f"{name} {a.dest}"
        for name, p in parsers
        for a in p._actions
        if not (a.help and a.help.strip()) and a.help is not argparse.SUPPRESS
    ]
    assert not missing, missing


def test_max_tile_errors_values():
    parse = build_parser().parse_args
    for given, want in (("none", None), ("0.1", 0.1), ("3", 3), ("0", 0)):
        a = parse(["predict", "s.tif", "--max-tile-errors", given])
        assert a.max_tile_errors == want
    assert parse(["predict", "s.tif"]).max_tile_errors == 0.05
    for bad in ("-1", "1.5", "lots"):
        with pytest.raises(SystemExit):
            parse(["predict", "s.tif", "--max-tile-errors", bad])


def test_all_tiles_failed_is_an_error_not_an_empty_result(tmp_path):
    """Every tile undecodable: exit 1, no output (today: 0 detections, exit 0). With
    --overwrite an earlier output of that path is renamed .stale. `none` accepts it."""
    bad = damaged_slide(tmp_path / "bad.tif", seed=3)
    out = tmp_path / "bad.geojson"
    base = ["predict", str(bad), "--model", str(MODEL), "--no-progress", "--device", "cpu"]
    base += ["--region", "0,0,1200,900", "--out", str(out)]
    r = _cli(*base)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    msg = [ln for ln in r.stderr.splitlines() if ln.startswith("trtwsi predict: error:")]
    assert len(msg) == 1 and "could not be decoded" in msg[0] and "--max-tile-errors" in msg[0]
    assert not out.exists()

    out.write_text("an earlier run's detections")
    r = _cli(*base, "--overwrite")
    assert r.returncode == 1
    assert not out.exists()
    assert (tmp_path / "bad.geojson.stale").read_text() == "an earlier run's detections"

    r = _cli(*base, "--max-tile-errors", "none")
    assert r.returncode == 0, r.stderr
    assert out.exists()


def test_write_failure_saves_a_rescue_file(slide, tmp_path):
    """Writing fails after the run: the detections are kept in a rescue file the error names."""
    from trtwsi import Predictor, Results
    from trtwsi.app.predict_cmd import save_outputs

    with Predictor(str(slide), [MODEL], device="cpu") as p:
        res = p.run()
    assert len(res.detections)
    (tmp_path / "blocker").write_text("a file where a folder should be")
    good, bad = tmp_path / "r.geojson", tmp_path / "blocker" / "r.csv"
    with pytest.raises(OutputWriteError) as e:
        save_outputs(res, [good, bad], overwrite=False)
    rescue = e.value.rescue
    assert rescue is not None and Path(rescue).is_file()
    assert str(rescue) in str(e.value) and str(bad) in str(e.value)
    assert good.exists() and str(good) in str(e.value)  # what was written is kept
    back = Results.load(rescue)
    assert len(back.detections) == len(res.detections)
    Path(rescue).unlink()


def _bars(stderr: str) -> list[tuple[int, int | None]]:
    """(n, total) of every tqdm 'tiles' frame; total None for a bar without one."""
    frames = [f for f in re.split(r"[\r\n]", stderr) if f.startswith("tiles:")]
    out = []
    for f in frames:
        m = re.search(r"\| *(\d+)/(\d+) \[", f)
        out.append((int(m[1]), int(m[2])) if m else (-1, None))
    return out


def test_one_progress_bar_over_the_whole_slide(two_sections, tmp_path):
    """Two sections, one bar: its total (every tile of the slide) is known from its first
    frame and it ends once at total/total."""
    r = _cli(
        "predict", str(two_sections), "--model", str(MODEL), "--device", "cpu",
        "--out", str(tmp_path / "p.geojson"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    n_tiles = int(re.search(r"tiles: (\d+) in", r.stdout)[1])
    bars = _bars(r.stderr)
    assert bars, r.stderr
    assert {t for _, t in bars} == {n_tiles}, bars
    assert bars[-1] == (n_tiles, n_tiles)
    ns = [n for n, _ in bars]
    assert ns == sorted(ns)  # never restarts


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default. A test run started in the
    background of a non-interactive shell inherits SIGINT ignored, and Python then never
    raises KeyboardInterrupt, so the signal this test sends would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_single_slide(two_sections, tmp_path):
    """SIGINT in the middle of the tiles: one line, exit 130, no output files. (--mpp 0.25:
    4x the tiles, so that the run is still going when the signal lands on a fast CPU.)"""
    out = tmp_path / "i.geojson"
    p = subprocess.Popen(
        [
            sys.executable, "-m", "trtwsi.app.cli", "predict", str(two_sections),
            "--model", str(MODEL), "--device", "cpu", "--batch", "1", "--mpp", "0.25",
            "--out", str(out), "--also", "csv",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=REPO,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    buf = b""
    deadline = time.monotonic() + 240
    os.set_blocking(p.stderr.fileno(), False)
    while time.monotonic() < deadline:  # wait for the first tile to finish
        chunk = p.stderr.read() or b""
        buf += chunk
        if re.search(rb"\| *[1-9]\d*/\d+ \[", buf):
            break
        assert p.poll() is None, buf.decode()
        time.sleep(0.05)
    else:
        p.kill()
        pytest.fail("no tile finished in time")
    p.send_signal(signal.SIGINT)
    try:
        rc = p.wait(60)
    finally:
        p.kill()
    os.set_blocking(p.stderr.fileno(), True)
    err = (buf + p.stderr.read()).decode()
    assert rc == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and not ln.startswith("tiles:")]
    assert lines == ["trtwsi predict: interrupted; no outputs were written"], err
    assert not out.exists() and not out.with_suffix(".csv").exists()
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]
