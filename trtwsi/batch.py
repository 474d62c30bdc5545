"""Batch runs over many slides: one result set per slide, a manifest, resume.

``run_batch(slides, out_dir, models, params, devices=..., ray=...)`` runs the same per-slide work
as ``trtwsi predict SLIDE`` on every slide and writes, for a slide named ``NAME``,
``OUT/NAME.geojson`` (and ``.csv`` / ``.json`` / ``.png`` as asked), each file atomically
(:mod:`trtwsi._atomic`). Work is spread over worker processes, one per device
(:mod:`trtwsi.workers`), or over Ray actors (:mod:`trtwsi.ray_runner`); this module plans the
batch, keeps the manifest, and decides what a rerun does.

Slides and names
    :func:`discover_slides` takes files as given and scans folders (not recursively) for
    :data:`SLIDE_SUFFIXES`. A slide's ``name`` is its file stem (``a/x.svs`` → ``x``); when two
    slides of one batch share a stem (case-insensitively) each gets ``STEM-<8 hex of the SHA-1 of
    its absolute path>``.

Job key (what "the same work" means)
    ``key = sha256(slide fingerprint, models, params)``, hex. The **fingerprint** is the file
    size plus the SHA-256 of its first and last MiB (:func:`slide_fingerprint`): it reads 2 MiB
    whatever the slide's size, survives copying or moving the file (unlike path + mtime, which
    a copy to cluster storage changes), and changes when a slide is re-scanned or re-exported
    (headers and tile offsets move). It does not see an edit of the middle of a file that keeps
    its size: pass ``force=True`` (``--force``) after such an edit. **Models**: each model's
    weights SHA-256, name, classes, ``min_conf``, ``iou``, ``head``, ``imgsz``, ``max_det``.
    **Params**: overlap, mpp, slide_mpp, section, region and the output formats
    (:meth:`BatchParams.key_params`). Device, batch size and thread counts are *not* part of the
    key: they change speed, not what is detected (on the CPU, torch's thread count changes the
    last bits of scores, see :class:`BatchParams`).

Manifest (``OUT/manifest.jsonl``)
    JSON lines, appended and fsync'ed one record at a time by the coordinating process only
    (workers never write it); :func:`read_manifest` skips a torn last line. Two kinds of record:

    ``{"record": "slide", ...}`` — one per state change of a slide:

    ========== ===============================================================================
    field      meaning
    ========== ===============================================================================
    v          manifest format version (1)
    run        id of the run that wrote the record (see ``run`` records)
    slide      the slide's name (output stem)
    path       absolute path of the slide file
    key        job key (hex SHA-256, above); None when the file could not even be fingerprinted
    status     ``running`` (handed to a worker), ``done`` (all outputs written),
               ``failed`` (the slide raised; ``error`` says why), ``crashed`` (the worker process
               died while on it; retried when ``retry`` is true), ``interrupted`` (Ctrl-C/SIGTERM)
    attempt    1 for the first try in this run, +1 per retry after a worker crash
    worker     the device the worker runs on (``cpu``, ``cuda:1``, ``ray:cuda`` …)
    slot       index of the worker (local pool) or actor (Ray)
    host, pid  where the worker ran (``done``/``failed``: the worker; ``running``: the worker)
    time       when the record was written (ISO 8601, local time with offset)
    ---------- -------------------------------------------------------------------------------
    done only
    outputs    file names written, relative to OUT
    n_detections, counts   total, and ``{model name: {class name: count}}``
    n_tiles, pixels        tiles run, level-0 pixels of the slide (width × height)
    seconds    wall time in the worker: open → outputs written
    timings    per-stage seconds (``Results.timings``)
    tile_errors            file tiles that failed to decode (filled white; run went on)
    ---------- -------------------------------------------------------------------------------
    failed / crashed / interrupted
    error      ``{"type": exception class, "message": str}`` (``crashed``: ``WorkerCrash``
               with the exit code or signal)
    retry      (crashed) whether the slide was put back in the queue
    ========== ===============================================================================

    ``{"record": "run", "event": "start" | "end" | "interrupted" | "aborted", ...}`` — one at
    the start and one at the end of each run (``aborted``: an error stopped it, e.g. no worker
    could load the models; its ``error`` says which): ``run`` id, ``time``, ``host``, ``pid``,
    ``trtwsi`` version, ``runner`` (``local`` / ``ray``), ``devices``; start: ``params``,
    ``models`` (name, weights, sha256), ``slides`` (in the batch), ``skipped`` (already done);
    the others: ``done``, ``failed``, ``crashed`` (worker deaths), ``seconds``.

Rerun semantics
    A slide is skipped when its latest record is ``done`` with the same key and its outputs exist;
    every other slide runs (failed, crashed, interrupted, never seen, or changed key). A slide's
    outputs are valid only when its latest record is ``done``. The batch owns the files of slides
    the manifest knows and replaces them when it reruns a slide; a file it does not own is
    refused (the slide fails with ``OutputExistsError``) unless ``overwrite=True``. An output
    folder is locked (``OUT/.trtwsi-batch.lock``, ``flock``) while a run writes to it; at start
    the run removes temporary files a killed run left (``.NAME.EXT.*.tmp``).

Interrupts
    Ctrl-C (or SIGTERM through the CLI) stops the workers; a worker interrupted on a slide removes
    the outputs it had written for that slide and its temporary files; the coordinator writes an
    ``interrupted`` record for each slide in flight and an ``interrupted`` run record, then
    re-raises KeyboardInterrupt. After a SIGKILL of the coordinator the workers die with it
    (Linux ``PR_SET_PDEATHSIG``); the next run cleans what they left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import glob
import hashlib
import json
import os
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trtwsi.errors import BatchError, TrtwsiError

__all__ = [
    "MANIFEST_NAME",
    "SLIDE_SUFFIXES",
    "BatchParams",
    "BatchSummary",
    "Manifest",
    "SlideJob",
    "SlideRunner",
    "discover_slides",
    "job_key",
    "model_spec",
    "read_manifest",
    "run_batch",
    "slide_fingerprint",
    "slide_names",
]

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".trtwsi-batch.lock"
MANIFEST_VERSION = 1
#: Suffixes a folder scan picks up (whole-slide formats). Image files (.png, .jpg) given
#: explicitly are run too, but a folder scan skips them: they are often overlays, not slides.
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".scn",
    ".bif",
    ".btf",
    ".tf8",
    ".qptiff",
    ".mrxs",
    ".vms",
    ".czi",
)
FINGERPRINT_BYTES = 1 << 20
#: Environment variable of the crash test hook: ``NAME:MARKER`` makes the worker that gets the
#: slide ``NAME`` exit at once (``os._exit(86)``) if the file ``MARKER`` does not exist yet, after
#: creating it — one crash, then the retry runs normally. Tests only.
CRASH_HOOK_ENV = "TRTWSI_TEST_CRASH_ONCE"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _version() -> str:
    from trtwsi import __version__

    return __version__


# ------------------------------------------------------------------------------------------
# slides, names, keys
# ------------------------------------------------------------------------------------------
def discover_slides(paths: Iterable[str | os.PathLike], exclude: Iterable = ()) -> list[Path]:
    """Slide files from ``paths``: files as given, folders scanned (not recursively) for
    :data:`SLIDE_SUFFIXES` in name order. Absolute paths, duplicates dropped, first seen first.
    Paths under ``exclude`` (e.g. the output folder) are left out of folder scans.

    Raises:
        BatchError: a path does not exist, or nothing was found.
    """
    excl = [Path(e).resolve() for e in exclude]
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise BatchError(f"slide path not found: {str(p)!r}; check the path (nothing was run)")
        if p.is_dir():
            found = sorted(
                f
                for f in p.iterdir()
                if f.is_file() and f.name.lower().endswith(SLIDE_SUFFIXES) and f.name[0] != "."
            )
            found = [f for f in found if not any(f.resolve().is_relative_to(e) for e in excl)]
        else:
            found = [p]
        for f in found:
            r = f.resolve()
            if r not in seen:
                seen.add(r)
                out.append(r)
    if not out:
        raise BatchError(
            f"no slides found in {[str(p) for p in paths]}: folders are scanned for "
            f"{', '.join(SLIDE_SUFFIXES)} (not recursively); name slide files explicitly otherwise"
        )
    return out


def slide_names(paths: Sequence[Path]) -> list[str]:
    """Output stems, one per slide: the file stem, or ``STEM-<8 hex>`` where stems collide."""
    stems = [Path(p).stem for p in paths]
    count: dict[str, int] = {}
    for s in stems:
        count[s.lower()] = count.get(s.lower(), 0) + 1
    return [
        s if count[s.lower()] == 1 else f"{s}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
        for s, p in zip(stems, paths, strict=True)
    ]


def slide_fingerprint(path: str | os.PathLike) -> dict:
    """``{"size": bytes, "sha256": hex of (first MiB + last MiB)}`` of a slide file."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return {"size": size, "sha256": h.hexdigest()}


def model_spec(m) -> dict:
    """The constructor arguments that rebuild Model ``m`` in another process (plain types)."""
    return {
        "weights": str(Path(m.weights).resolve()),
        "classes": list(m.names),
        "min_conf": m.min_conf,
        "iou": m.iou,
        "backend": m.backend,
        "fallback_to_pt": m.fallback_to_pt,
        "imgsz": m.imgsz,
        "name": m.name,
        "head": m.head,
        "max_det": m.max_det,
    }


def _model_key(m) -> dict:
    spec = model_spec(m)
    del spec["weights"], spec["backend"], spec["fallback_to_pt"]  # the file's hash stands in
    return {**spec, "sha256": m.sha256}


def job_key(fingerprint: Mapping, models: Sequence, params: BatchParams) -> str:
    """Hex SHA-256 of what decides a slide's results (see the module docstring)."""
    doc = {
        "fingerprint": dict(fingerprint),
        "models": [_model_key(m) for m in models],
        "params": params.key_params(),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class BatchParams:
    """What every slide of a batch is run with (like ``trtwsi predict``'s options).

    Part of the job key: ``overlap``, ``mpp``, ``slide_mpp``, ``section``, ``region``,
    ``formats``. Not part of it (speed only): ``batch`` (tiles per forward; None: the
    Predictor's default), ``workers`` (reader
    threads per worker; default: the worker's ``threads``), ``threads`` (torch intra-op threads
    per worker; default: usable cores ÷ local workers, at least 1). CPU results are bit-identical
    between runs with the same ``threads``; other thread counts change the last bits of scores.
    """

    overlap: float = 0.2
    mpp: float | None = None
    slide_mpp: float | None = None
    section: int | None = None
    region: tuple[int, int, int, int] | None = None
    formats: tuple[str, ...] = (".geojson",)
    batch: int | None = None
    workers: int | None = None
    threads: int | None = None

    def __post_init__(self):
        from trtwsi.results import SUPPORTED_EXTENSIONS, UnsupportedOutputFormatError

        fmts = tuple(f.lower() if f.startswith(".") else "." + f.lower() for f in self.formats)
        bad = [f for f in fmts if f not in SUPPORTED_EXTENSIONS]
        if bad or not fmts:
            raise UnsupportedOutputFormatError(
                f"output formats {list(self.formats)!r}: {bad or 'none given'} not supported; "
                f"choose from {', '.join(SUPPORTED_EXTENSIONS)}"
            )
        object.__setattr__(self, "formats", tuple(dict.fromkeys(fmts)))
        if self.region is not None:
            object.__setattr__(self, "region", tuple(int(v) for v in self.region))
        for label in ("batch", "workers", "threads"):
            v = getattr(self, label)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise BatchError(f"{label} must be a positive int or None, got {v!r}")

    def key_params(self) -> dict:
        return {
            "overlap": self.overlap,
            "mpp": self.mpp,
            "slide_mpp": self.slide_mpp,
            "section": self.section,
            "region": list(self.region) if self.region is not None else None,
            "formats": list(self.formats),
        }


@dataclasses.dataclass
class SlideJob:
    """One slide to run: ``name`` (output stem), ``path`` (absolute), ``key`` (job key),
    ``overwrite`` (may replace existing output files), ``attempt`` (1 + retries after worker
    crashes), ``out_dir`` (absolute)."""

    name: str
    path: str
    key: str
    out_dir: str
    overwrite: bool = False
    attempt: int = 1

    def outputs(self, formats: Sequence[str]) -> list[Path]:
        return [Path(self.out_dir) / (self.name + f) for f in formats]

    def record(self, **fields) -> dict:
        """A manifest ``slide`` record of this job (slide, path, key, attempt) plus ``fields``."""
        return {
            "record": "slide",
            "slide": self.name,
            "path": self.path,
            "key": self.key,
            "attempt": self.attempt,
            **fields,
        }


# ------------------------------------------------------------------------------------------
# manifest
# ------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> list[dict]:
    """All records of a manifest, in order. Lines that are not a JSON object (a torn last line
    after a hard kill) are skipped. A missing file reads as no records."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def latest_slide_records(records: Iterable[Mapping]) -> dict[str, dict]:
    """``{slide name: its last slide record}``."""
    state: dict[str, dict] = {}
    for r in records:
        if r.get("record") == "slide" and isinstance(r.get("slide"), str):
            state[r["slide"]] = dict(r)
    return state


class Manifest:
    """Appends records to ``OUT/manifest.jsonl`` (one ``write`` + ``fsync`` each).

    Only one process writes (the coordinator; the output folder is locked). If the file does not
    end with a newline (a torn record of a killed run), a newline is written first so the next
    record starts on its own line.
    """

    def __init__(self, path: str | os.PathLike, run_id: str):
        self.path = Path(path)
        self.run_id = run_id
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, record: Mapping) -> dict:
        rec = {"v": MANIFEST_VERSION, "run": self.run_id, "time": _now(), **record}
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        os.write(self._fd, line.encode())
        os.fsync(self._fd)
        return rec

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _locked(out_dir: Path):
    """Hold an exclusive ``flock`` on ``OUT/.trtwsi-batch.lock`` (released when the process
    dies, however it dies)."""
    import fcntl

    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise BatchError(
                f"another trtwsi batch is writing to {str(out_dir)!r} ({other or 'pid unknown'}); "
                "wait for it to finish, or choose another --out folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(out_dir: Path, names: Iterable[str], formats) -> int:
    n = 0
    for name in names:
        for f in formats:
            for tmp in glob.glob(str(out_dir / f".{glob.escape(name + f)}.*.tmp")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                    n += 1
    return n


# ------------------------------------------------------------------------------------------
# per-slide work (runs in a worker process or a Ray actor)
# ------------------------------------------------------------------------------------------
def _error_dict(e: BaseException) -> dict:
    d = {"type": type(e).__name__, "message": str(e) or repr(e)}
    if not isinstance(e, TrtwsiError):  # unexpected: keep where it came from
        d["traceback"] = "".join(traceback.format_exception(e)[-6:])
    return d


class SlideRunner:
    """Loads the models once for ``device`` and runs slides one by one; each model's engine is
    loaded by the first slide's Predictor and reused by the next ones (``engine_cache``).

    Args:
        specs: :func:`model_spec` dicts plus ``"sha256"`` (checked against the file).
        params: the batch's :class:`BatchParams`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        threads: torch intra-op threads (None: leave torch's default).

    Calling it with a :class:`SlideJob` returns the slide record (``status`` ``done`` or
    ``failed``, see the module docstring; ``run``/``time``/``v`` are added by the coordinator).
    Exceptions of the slide become a ``failed`` record; KeyboardInterrupt/SystemExit remove the
    outputs this attempt wrote and propagate.
    """

    def __init__(self, specs: Sequence[Mapping], params: BatchParams, device: str, threads=None):
        import torch

        from trtwsi.model import Model

        if threads:
            torch.set_num_threads(int(threads))
        self.params = params
        self.device = device
        self.threads = threads
        self.models = []
        for s in specs:
            kw = {k: v for k, v in s.items() if k != "sha256"}
            m = Model(**kw)
            if s.get("sha256") and m.sha256 != s["sha256"]:
                raise BatchError(
                    f"model {m.name!r}: weights {kw['weights']!r} changed since the batch started "
                    f"(sha256 {m.sha256[:12]}…, expected {s['sha256'][:12]}…); rerun the batch"
                )
            self.models.append(m)
        self.engine_cache: dict = {}

    def __call__(self, job: SlideJob) -> dict:
        from trtwsi._atomic import check_output_path
        from trtwsi.predictor import Predictor
        from trtwsi.slide import open_slide

        _crash_hook(job)
        p = self.params
        t0 = time.perf_counter()
        base = job.record(host=socket.gethostname(), pid=os.getpid())
        outputs = job.outputs(p.formats)
        written: list[Path] = []
        try:
            if not job.overwrite:
                for o in outputs:
                    check_output_path(o, overwrite=False)
            slide = open_slide(job.path, mpp=p.slide_mpp, threads=p.workers or self.threads)
            try:
                pred = Predictor(
                    slide,
                    self.models,
                    engine_cache=self.engine_cache,
                    overlap=p.overlap,
                    mpp=p.mpp,
                    batch=p.batch,
                    workers=p.workers or self.threads,
                    device=self.device,
                    progress=False,
                )
                try:
                    res = pred.run(section=p.section, region=p.region)
                finally:
                    pred.close()  # the GPU pipeline's reader processes and buffers
                for o in outputs:
                    written.append(res.save(o, overwrite=job.overwrite, slide=slide))
            finally:
                slide.close()
        except Exception as e:
            _remove(written)
            return {**base, "status": "failed", "error": _error_dict(e)}
        except BaseException:  # interrupted: leave no outputs of an unfinished slide
            _remove(written)
            raise
        det = res.detections
        return {
            **base,
            "status": "done",
            "outputs": [o.name for o in outputs],
            "n_detections": len(det),
            "counts": det.counts(),
            "n_tiles": res.n_tiles,
            "pixels": int(res.slide.get("width", 0)) * int(res.slide.get("height", 0)),
            "seconds": round(time.perf_counter() - t0, 4),
            "timings": res.timings,
            "tile_errors": len(res.errors),
        }


def _remove(paths: Iterable[Path]) -> None:
    for w in paths:
        with contextlib.suppress(OSError):
            os.unlink(w)


def _crash_hook(job: SlideJob) -> None:
    hook = os.environ.get(CRASH_HOOK_ENV)
    if not hook:
        return
    name, _, marker = hook.partition(":")
    if job.name == name and marker and not os.path.exists(marker):
        Path(marker).write_text(f"crashed pid {os.getpid()}\n")
        os._exit(86)


# ------------------------------------------------------------------------------------------
# coordinator
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BatchSummary:
    """What a run did: ``done``/``failed``/``skipped`` slide names, ``crashes`` (worker deaths
    on a slide, each retried or failed), ``records`` (the final slide record of every slide run
    in this run, by name), ``seconds`` (wall time), ``manifest`` (its path)."""

    done: list[str]
    failed: list[str]
    skipped: list[str]
    crashes: int
    records: dict[str, dict]
    seconds: float
    manifest: Path

    @property
    def ok(self) -> bool:
        return not self.failed


def plan_batch(
    slides: Sequence[Path],
    out_dir: Path,
    models: Sequence,
    params: BatchParams,
    state: Mapping[str, Mapping],
    *,
    force: bool = False,
    overwrite: bool = False,
) -> tuple[list[SlideJob], list[str], list[dict]]:
    """Split the batch into (jobs to run, names skipped as done, failed records of slides that
    could not be fingerprinted)."""
    jobs, skipped, failed = [], [], []
    for path, name in zip(slides, slide_names(slides), strict=True):
        try:
            key = job_key(slide_fingerprint(path), models, params)
        except OSError as e:
            failed.append(
                {
                    "record": "slide",
                    "slide": name,
                    "path": str(path),
                    "key": None,
                    "status": "failed",
                    "attempt": 1,
                    "error": _error_dict(e),
                }
            )
            continue
        last = state.get(name)
        job = SlideJob(name, str(path), key, str(out_dir), overwrite=overwrite or last is not None)
        if (
            not force
            and last is not None
            and last.get("status") == "done"
            and last.get("key") == key
            and all(o.exists() for o in job.outputs(params.formats))
        ):
            skipped.append(name)
        else:
            jobs.append(job)
    return jobs, skipped, failed


def run_batch(
    slides: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    models: Sequence,
    params: BatchParams | None = None,
    *,
    devices: str | Sequence[str] | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    max_retries: int = 2,
    log: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Run ``models`` over ``slides`` (files or folders) into ``out_dir``; see the module doc.

    Args:
        models: :class:`~trtwsi.model.Model` objects (or .pt paths).
        params: per-slide options (default :class:`BatchParams`).
        devices: local worker processes, one per entry — ``"all"`` (every CUDA GPU; the CPU when
            there is none), ``"0,1"`` / ``["cuda:0", "cuda:1"]``, ``"cpu"``, ``"cpu,cpu"`` (two
            CPU workers), None (one worker on the CPU, or on ``cuda:0`` when there is a GPU).
            With ``ray=True``: one actor per entry, GPU entries get ``num_gpus=1`` (Ray picks the
            GPU), ``"all"`` / None = one actor per GPU of the Ray cluster.
        ray: run the slides as Ray actors (``pip install 'trtwsi[ray]'``). ``ray_address``: the
            cluster to join (``ray.init(address=...)``); None starts a local one (or uses the
            Ray session already initialized in this process).
        force: rerun slides that are done with the same key.
        overwrite: replace output files the manifest does not know.
        max_retries: times a slide is retried after its worker died on it.
        log: called with one line per event (progress); None: silent.

    Returns :class:`BatchSummary`. Raises :class:`BatchError` before anything runs for bad
    arguments or a locked output folder, :class:`~trtwsi.errors.WorkerError` when no worker can
    start, KeyboardInterrupt after cleaning up when interrupted.
    """
    from trtwsi.model import Model

    t_start = time.perf_counter()
    params = params or BatchParams()
    say = log or (lambda s: None)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {str(out)!r} is a file; a batch writes into a folder")
    paths = discover_slides(slides, exclude=[out])
    models = [m if isinstance(m, Model) else Model(m) for m in models]
    if not models:
        raise BatchError("a batch needs at least one model (--model PATH.pt or --models TOML)")
    if max_retries < 0:
        raise BatchError(f"max_retries must be >= 0, got {max_retries}")
    if ray:
        from trtwsi.ray_runner import RayPool

        pool = RayPool(ray_address, devices)
    else:
        from trtwsi.workers import LocalPool, parse_devices

        pool = LocalPool(parse_devices(devices))
    out.mkdir(parents=True, exist_ok=True)

    with _locked(out):
        run_id = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        manifest_path = out / MANIFEST_NAME
        state = latest_slide_records(read_manifest(manifest_path))
        jobs, skipped, unreadable = plan_batch(
            paths, out, models, params, state, force=force, overwrite=overwrite
        )
        _remove_stale_temporaries(out, [j.name for j in jobs], params.formats)
        manifest = Manifest(manifest_path, run_id)
        records: dict[str, dict] = {}
        inflight: dict[str, dict] = {}
        crashes = 0
        n_total = len(jobs) + len(unreadable)

        def emit(rec: dict) -> None:
            nonlocal crashes
            rec = manifest.append(rec)
            name, status = rec["slide"], rec["status"]
            if status == "running":
                inflight[name] = rec
                return
            inflight.pop(name, None)
            if status == "crashed":
                crashes += 1
                say(
                    f"worker {rec.get('worker')} died on {name} ({rec['error']['message']}); "
                    + ("retrying" if rec.get("retry") else "giving up")
                )
                if rec.get("retry"):
                    return
            records[name] = rec
            k = len(records)
            if rec["status"] == "done":
                mp = rec["pixels"] / 1e6
                say(
                    f"[{k}/{n_total}] {name}: done, {rec['n_detections']} detections, "
                    f"{rec['n_tiles']} tiles, {mp:.1f} Mpx in {rec['seconds']:.1f} s "
                    f"({rec.get('worker')})"
                )
            else:
                say(f"[{k}/{n_total}] {name}: {rec['status']}: {rec['error']['message']}")

        try:
            manifest.append(
                {
                    "record": "run",
                    "event": "start",
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "trtwsi": _version(),
                    "python": sys.version.split()[0],
                    "runner": "ray" if ray else "local",
                    "devices": pool.describe(),
                    "params": dataclasses.asdict(params),
                    "models": [
                        {
                            "name": m.name,
                            "weights": str(Path(m.weights).resolve()),
                            "sha256": m.sha256,
                        }
                        for m in models
                    ],
                    "slides": len(paths),
                    "skipped": len(skipped),
                }
            )
            if skipped:
                say(f"{len(skipped)} slide(s) already done with the same inputs: skipped")
            for rec in unreadable:
                emit(rec)
            if jobs:
                specs = [{**model_spec(m), "sha256": m.sha256} for m in models]
                pool.run(jobs, specs, params, emit, max_retries=max_retries, log=say)
        except BaseException as e:
            for rec in list(inflight.values()):
                emit(
                    {
                        **{k: rec.get(k) for k in ("record", "slide", "path", "key", "attempt")},
                        "worker": rec.get("worker"),
                        "slot": rec.get("slot"),
                        "status": "interrupted",
                        "error": {"type": type(e).__name__, "message": str(e) or "interrupted"},
                    }
                )
            manifest.append(
                {
                    "record": "run",
                    "event": "interrupted" if isinstance(e, KeyboardInterrupt) else "aborted",
                    "error": _error_dict(e),
                    **_counts(records, crashes, t_start),
                }
            )
            manifest.close()
            raise
        manifest.append({"record": "run", "event": "end", **_counts(records, crashes, t_start)})
        manifest.close()
    return BatchSummary(
        done=[n for n, r in records.items() if r["status"] == "done"],
        failed=[n for n, r in records.items() if r["status"] != "done"],
        skipped=skipped,
        crashes=crashes,
        records=records,
        seconds=time.perf_counter() - t_start,
        manifest=manifest_path,
    )


def _counts(records: Mapping[str, Mapping], crashes: int, t_start: float) -> dict[str, Any]:
    return {
        "done": sum(r["status"] == "done" for r in records.values()),
        "failed": sum(r["status"] != "done" for r in records.values()),
        "crashed": crashes,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
