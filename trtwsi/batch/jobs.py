"""What a batch runs: slide discovery and names, job keys, per-slide parameters and jobs.

See :mod:`trtwsi.batch.coordinator` for what the job key means and how reruns use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from trtwsi.errors import BatchError, TrtwsiError

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


def _version() -> str:
    from trtwsi import __version__

    return __version__


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
        "trust_weights": m.trust_weights,
    }


def _model_key(m) -> dict:
    spec = model_spec(m)
    # the file's hash stands in for the path; how it may be loaded does not change results
    del spec["weights"], spec["backend"], spec["fallback_to_pt"], spec["trust_weights"]
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
    ``max_tile_errors`` (not part of the key): a slide with more undecodable tiles than this is
    ``failed`` (a fraction of its tiles, a count, or None: no limit; see
    :mod:`trtwsi.results.tile_errors`). ``decode`` (not part of the key): where JPEG tiles are
    decoded on the GPU pipeline (``Runtime(decode=…)``). ``compile`` (not part of the key):
    compile the PyTorch models with ``torch.compile`` in each GPU worker (``Runtime(compile=…)``).
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
    max_tile_errors: float | int | None = 0.05
    decode: str = "auto"
    compile: bool = False

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
        from trtwsi.results.tile_errors import parse_tile_error_limit

        object.__setattr__(self, "max_tile_errors", parse_tile_error_limit(self.max_tile_errors))
        if self.region is not None:
            object.__setattr__(self, "region", tuple(int(v) for v in self.region))
        for label in ("batch", "workers", "threads"):
            v = getattr(self, label)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise BatchError(f"{label} must be a positive int or None, got {v!r}")
        if self.decode not in ("auto", "gpu", "cpu"):
            raise BatchError(f"decode must be 'auto', 'gpu' or 'cpu', got {self.decode!r}")
        if not isinstance(self.compile, bool):
            raise BatchError(f"compile must be True or False, got {self.compile!r}")

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


def _error_dict(e: BaseException) -> dict:
    d = {"type": type(e).__name__, "message": str(e) or repr(e)}
    if not isinstance(e, TrtwsiError):  # unexpected: keep where it came from
        d["traceback"] = "".join(traceback.format_exception(e)[-6:])
    return d
