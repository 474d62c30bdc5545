"""Checks `trtwsi predict` runs before anything is loaded or inferred, so that a run is never
thrown away at the end for a reason that was known at the start."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from trtwsi.errors import (
    BatchError,
    OutputFolderError,
    SlideNotFoundError,
    TrtwsiError,
    UsageError,
)
from trtwsi.results import SUPPORTED_EXTENSIONS, UnsupportedOutputFormatError


def normalize_format(fmt: str, what: str = "--also") -> str:
    """``csv`` / ``.CSV`` → ``.csv``; raises UnsupportedOutputFormatError naming the value."""
    f = fmt.strip().lower()
    f = f if f.startswith(".") else "." + f
    if f not in SUPPORTED_EXTENSIONS:
        raise UnsupportedOutputFormatError(
            f"{what} {fmt!r}: {f!r} is not supported; choose from {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return f


def single_outputs(slide: str, out: str | None, also: Sequence[str] | None) -> list[Path]:
    """The files a one-slide ``predict`` writes: ``--out`` (default ``SLIDE.detections.geojson``)
    and one per ``--also`` format next to it."""
    if out:
        main = Path(out)
        if not main.suffix:
            raise UnsupportedOutputFormatError(
                f"--out {out!r} has no extension: end it in one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)} (the format follows it)"
            )
        normalize_format(main.suffix, "--out extension")
    else:
        p = Path(slide)
        main = p.with_name(p.stem + ".detections.geojson")
    paths = [main]
    for f in also or []:
        p = main.with_suffix(normalize_format(f))
        if p not in paths:
            paths.append(p)
    return paths


def check_writable_dir(folder: Path, what: str = "--out") -> None:
    """Raise OutputFolderError unless files can be created in ``folder`` (or, when it does not
    exist yet, in the nearest existing folder above it). Tries it: creates and removes a file."""
    folder = Path(folder).expanduser().absolute()
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputFolderError(
            f"{what}: cannot create folder {str(folder)!r}: {str(probe)!r} is a file; choose "
            "another output path"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=".trtwsi-write-check-", dir=probe)
    except OSError as e:
        raise OutputFolderError(
            f"{what}: cannot write into {str(probe)!r} ({e.strerror or e}); choose a writable "
            "output folder or fix its permissions"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def check_outputs(paths: Sequence[Path], overwrite: bool) -> None:
    """Every output writable: no folder in the way, not existing unless ``overwrite``."""
    from trtwsi._util.atomic import check_output_path

    for p in paths:
        try:
            check_output_path(p, overwrite=overwrite)
        except IsADirectoryError:
            raise OutputFolderError(
                f"output {str(p)!r} is a folder; give a file path (or a slide folder for a batch)"
            ) from None
    for d in dict.fromkeys(p.parent for p in paths):
        check_writable_dir(d)


def check_slide_exists(path: str) -> None:
    p = Path(path).expanduser()
    if not p.exists():
        raise SlideNotFoundError(
            f"slide {path!r} not found: it does not exist; check the path (nothing was run)"
        )
    if p.is_dir():
        raise UsageError(f"slide {path!r} is a folder; a folder runs as a batch: add --out DIR")


def check_device(device: str) -> str:
    """The device ``--device`` names, checked (no CUDA GPU, bad index → DeviceError)."""
    from trtwsi.runtime import pick_device

    try:
        return pick_device(device)
    except TrtwsiError as e:
        raise type(e)(f"--device {device!r}: {e}") from None


def check_decode(decode: str, device: str) -> None:
    """``--decode gpu`` needs the GPU pipeline: refused on a CPU device before anything loads.
    ``device``: the device :func:`check_device` resolved."""
    if decode == "gpu" and not str(device).startswith("cuda"):
        raise UsageError(
            f"--decode gpu decodes JPEG tiles on the GPU, but this run is on {device}; use "
            "--decode auto or --decode cpu, or a CUDA --device"
        )


def check_compile(compile: bool, device: str) -> None:
    """``--compile`` compiles for a CUDA GPU: refused on a CPU device before anything loads."""
    if compile and not str(device).startswith("cuda"):
        raise UsageError(
            f"--compile compiles the model for a CUDA GPU, but this run is on {device}; drop "
            "--compile, or use a CUDA --device"
        )


def check_section(slide, section: int | None) -> None:
    """``--section`` names a tissue section of this open slide."""
    if section is None:
        return
    from trtwsi.plan.tissue import find_sections

    n = len(find_sections(slide))
    if not 0 <= section < n:
        raise UsageError(
            f"--section {section}: this slide has {n} tissue section(s)"
            + (f" (0..{n - 1})" if n else "")
            + "; run `trtwsi info SLIDE` to list them"
        )


def check_batch_options(a) -> None:
    """Batch options that cannot work, before any worker starts."""
    if a.section is not None and a.section < 0:
        raise UsageError(f"--section {a.section}: sections count from 0")
    if a.slide_timeout is not None:
        if not a.slide_timeout > 0:
            raise UsageError(
                f"--slide-timeout {a.slide_timeout}: give a positive number of seconds"
            )
        if a.ray is not None:
            raise BatchError(
                "--slide-timeout works with the local worker pool only; with --ray use Ray's own "
                "limits, or drop --ray"
            )
