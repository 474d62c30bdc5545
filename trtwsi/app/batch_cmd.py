"""`trtwsi predict` over several slides, a folder, or with --devices/--ray: a batch."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from trtwsi.app import validate
from trtwsi.errors import UsageError


def is_batch(a) -> bool:
    """Batch mode: several slides, a folder, --out an existing folder (or ending in /), or any of
    --devices / --ray / --force / --slide-timeout."""
    out_is_dir = bool(a.out) and (Path(a.out).is_dir() or a.out.endswith(("/", os.sep)))
    return (
        len(a.slide) > 1
        or Path(a.slide[0]).is_dir()
        or out_is_dir
        or a.devices is not None
        or a.ray is not None
        or a.force
        or a.slide_timeout is not None
    )


def batch_devices(a) -> str | None:
    """--devices; else with --ray one actor per cluster GPU; else one worker on --device."""
    if a.devices is not None:
        return a.devices
    if a.ray is not None:
        return "all"
    return None if a.device == "auto" else a.device


def cmd_predict_batch(a) -> int:
    from trtwsi.app.predict_cmd import models_from_args
    from trtwsi.batch import BatchParams, discover_slides, run_batch
    from trtwsi.batch.pools.local import parse_devices

    if not a.out:
        raise UsageError(
            "a batch (several slides, a folder, --devices or --ray) needs --out DIR: the folder "
            "for one result set per slide and the manifest"
        )
    out = Path(a.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {a.out!r} is a file; a batch writes into a folder")
    validate.check_batch_options(a)
    validate.check_writable_dir(out)
    params = BatchParams(
        overlap=a.overlap,
        mpp=a.mpp,
        slide_mpp=a.slide_mpp,
        section=a.section,
        region=a.region,
        formats=(".geojson", *(validate.normalize_format(f) for f in a.also or [])),
        batch=a.batch,
        workers=a.workers,
        threads=a.threads,
        max_tile_errors=a.max_tile_errors,
        decode=a.decode,
        compile=a.compile,
    )
    discover_slides(a.slide, exclude=[out.resolve()])  # missing slides: refused before loading
    devices = batch_devices(a)
    if a.ray is None:
        if a.devices is None:
            # names --device, not --devices, when it is wrong
            device = validate.check_device(a.device)
            validate.check_decode(a.decode, device)
            validate.check_compile(a.compile, device)
        parse_devices(devices)  # a bad --devices / --device: refused before loading
    models = models_from_args(a)

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        summary = run_batch(
            a.slide,
            a.out,
            models,
            params,
            devices=devices,
            ray=a.ray is not None,
            ray_address=a.ray or None,
            force=a.force,
            overwrite=a.overwrite,
            max_retries=a.retries,
            slide_timeout=a.slide_timeout,
            progress=not a.no_progress,
            log=lambda line: print(line, flush=True),
        )
    except KeyboardInterrupt:
        print(
            f"trtwsi predict: interrupted; finished slides are kept in {a.out}, rerun the same "
            "command to do the rest",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    print(
        f"batch: {len(summary.done)} done, {len(summary.failed)} failed, "
        f"{len(summary.skipped)} skipped (already done), {summary.crashes} worker crash(es), "
        f"{summary.seconds:.1f} s; manifest {summary.manifest}"
    )
    for name in summary.failed:
        err = summary.records[name].get("error", {})
        print(f"  failed {name}: {err.get('type')}: {err.get('message')}")
    return 4 if summary.failed else 0
