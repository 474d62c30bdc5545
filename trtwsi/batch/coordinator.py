"""Batch runs over many slides: one result set per slide, a manifest, resume.

``run_batch(slides, out_dir, models, params, devices=..., ray=...)`` runs the same per-slide work
as ``trtwsi predict SLIDE`` on every slide and writes, for a slide named ``NAME``,
``OUT/NAME.geojson`` (and ``.csv`` / ``.json`` / ``.png`` as asked), each file atomically
(:mod:`trtwsi._util.atomic`). Work is spread over worker processes, one per device
(:mod:`trtwsi.batch.pools.local`), or over Ray actors (:mod:`trtwsi.batch.pools.ray`); this module plans the
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
               with the exit code or signal; over ``--slide-timeout``: ``SlideTimeoutError``;
               more undecodable tiles than ``--max-tile-errors``: ``TooManyTileErrorsError``,
               with ``n_tiles`` and ``tile_errors``)
    retry      (crashed) whether the slide was put back in the queue
    stale_outputs          (failed) outputs of an earlier run of the slide, renamed
               ``NAME.EXT.stale`` because they no longer describe it
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
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from trtwsi.batch.jobs import (
    BatchParams,
    SlideJob,
    _error_dict,
    _version,
    discover_slides,
    job_key,
    model_spec,
    slide_fingerprint,
    slide_names,
)
from trtwsi.batch.manifest import (
    MANIFEST_NAME,
    Manifest,
    _locked,
    _remove_stale_temporaries,
    latest_slide_records,
    read_manifest,
)
from trtwsi.batch.pools.local import LocalPool, parse_devices
from trtwsi.batch.pools.ray import RayPool
from trtwsi.errors import BatchError, ManifestWriteError, OutputFolderError


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
    slide_timeout: float | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Run ``models`` over ``slides`` (files or folders) into ``out_dir``; see the module doc.

    Args:
        models: :class:`~trtwsi.engines.model.Model` objects (or .pt paths).
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
        slide_timeout: seconds a slide may run on a local worker; one over it is recorded
            ``failed`` (``SlideTimeoutError``), its worker restarted, the others go on. Not
            with ``ray=True`` (BatchError).
        progress: a tqdm bar over the slides (tiles/s, ETA) on stderr.
        log: called with one line per event (progress); None: silent.

    A slide that fails (or times out) after an earlier run had written its outputs gets those
    outputs renamed ``NAME.EXT.stale``: they no longer describe the slide's latest run.

    Returns :class:`BatchSummary`. Raises :class:`BatchError` before anything runs for bad
    arguments or a locked output folder, :class:`~trtwsi.errors.WorkerError` when no worker can
    start, KeyboardInterrupt after cleaning up when interrupted.
    """
    from trtwsi.engines.model import Model

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
    if slide_timeout is not None:
        if not slide_timeout > 0:
            raise BatchError(
                f"slide_timeout must be a positive number of seconds, got {slide_timeout}"
            )
        if ray:
            raise BatchError(
                "--slide-timeout works with the local worker pool only; with --ray use Ray's "
                "own limits, or drop --ray"
            )
    pool = (
        RayPool(ray_address, devices)
        if ray
        else LocalPool(parse_devices(devices), slide_timeout=slide_timeout)
    )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputFolderError(
            f"--out {str(out)!r}: cannot create the folder ({e.strerror or e}); choose a "
            "writable output folder"
        ) from None

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
        owned = {j.name: j.overwrite for j in jobs}
        for rec in unreadable:
            owned[rec["slide"]] = overwrite or rec["slide"] in state
        bar = None
        if progress and n_total:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_total, unit="slide", desc="slides", dynamic_ncols=True)
            if log is not None:

                def say(line: str) -> None:
                    bar.write(line)  # above the bar, which is then redrawn

        tiles_done = 0

        def emit(rec: dict) -> None:
            nonlocal crashes, tiles_done
            if rec.get("status") == "failed" and owned.get(rec.get("slide")):
                stale = _mark_stale(out, rec["slide"], params.formats)
                if stale:
                    rec = {**rec, "stale_outputs": stale}
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
            if bar is not None:
                tiles_done += int(rec.get("n_tiles") or 0)
                elapsed = max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix_str(f"{tiles_done / elapsed:.1f} tiles/s", refresh=False)
                bar.update(1)
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
            # A slide's final record may have reached the manifest just before the interrupt
            # (between its write and the bookkeeping after it): it is not interrupted.
            latest: dict = {}
            if not isinstance(e, ManifestWriteError):
                with contextlib.suppress(OSError):
                    latest = latest_slide_records(read_manifest(manifest.path))
            for rec in list(inflight.values()) if not isinstance(e, ManifestWriteError) else []:
                final = latest.get(rec["slide"], {})
                if final.get("run") == manifest.run_id and final.get("status") != "running":
                    records[rec["slide"]] = final
                    continue
                emit(
                    {
                        **{k: rec.get(k) for k in ("record", "slide", "path", "key", "attempt")},
                        "worker": rec.get("worker"),
                        "slot": rec.get("slot"),
                        "status": "interrupted",
                        "error": {"type": type(e).__name__, "message": str(e) or "interrupted"},
                    }
                )
            with contextlib.suppress(ManifestWriteError):  # the manifest may be what failed
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
        finally:
            if bar is not None:
                bar.close()
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


def _mark_stale(out: Path, name: str, formats) -> list[str]:
    """Rename the outputs of slide ``name`` that exist to ``NAME.EXT.stale``; their names."""
    moved = []
    for f in formats:
        p = out / (name + f)
        if p.is_file():
            try:
                os.replace(p, p.with_name(p.name + ".stale"))
            except OSError:
                continue
            moved.append(p.name + ".stale")
    return moved


def _counts(records: Mapping[str, Mapping], crashes: int, t_start: float) -> dict[str, Any]:
    return {
        "done": sum(r["status"] == "done" for r in records.values()),
        "failed": sum(r["status"] != "done" for r in records.values()),
        "crashed": crashes,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
