"""Engine sidecars (``.engine.json``) read as data: bounded strict JSON, and every field checked.

Anyone can edit or ship a sidecar next to an engine, and engine resolution (``trtwsi predict``,
``trtwsi doctor``) reads every sidecar next to a ``.pt`` before it reads any plan. A sidecar is
therefore treated like any other input file: parsed with :mod:`json` (data only, no object
hooks), refused when it is larger than :data:`MAX_SIDECAR_BYTES`, nested deeper than Python's
parser can take, or holds ``NaN``/``Infinity``, and each field is checked against
:data:`SIDECAR_FIELDS` (type and range) before an
:class:`~trtwsi.engines.sidecar.EngineMeta` is made from it. Without these checks
``"batch_min": "x"`` became a ``TypeError`` inside the fit check, ``"imgsz": NaN`` an
engine that "is NaN px", and ``"batch_max": 1000000000`` a request for host and device buffers
of a billion images. Errors are :class:`~trtwsi.errors.EngineMismatchError`, so resolution lists
the engine with the reason and goes on; the message names the sidecar, the key, the value seen
and what is allowed.

This module does not import :mod:`trtwsi.engines.sidecar` (which calls it).
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trtwsi.engines.config import HEAD_KINDS, IMGSZ_RANGE, MAX_DET_RANGE
from trtwsi.errors import EngineMismatchError

__all__ = [
    "BATCH_RANGE",
    "MAX_SIDECAR_BYTES",
    "SIDECAR_FIELDS",
    "check_sidecar",
    "load_sidecar_json",
]

#: A sidecar is about 1 kB; anything above this is not one.
MAX_SIDECAR_BYTES = 1 << 20
#: Engine batch sizes: above this, one fp32 640-px input batch alone is > 20 GB.
BATCH_RANGE = (1, 4096)
_REBUILD = "rebuild the engine with python -m trtwsi.export.build"


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi


def _str(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= 4096


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _list_of(check: Callable[[Any], bool], most: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) <= most and all(check(x) for x in v)


def _seconds(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < 1e7


_batch = _int_in(*BATCH_RANGE)
#: field → (check, what is allowed): every field of ``EngineMeta``.
SIDECAR_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "weights": (_str, "a file name (string)"),
    "weights_sha256": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "a SHA-256 hex digest (64 lowercase hex digits)",
    ),
    "names": (_list_of(_str, 100_000), "a list of class-name strings"),
    "imgsz": (_int_in(*IMGSZ_RANGE), f"an integer in [{IMGSZ_RANGE[0]}, {IMGSZ_RANGE[1]}]"),
    "stride": (_int_in(1, 1024), "an integer in [1, 1024]"),
    "head": (lambda v: v in HEAD_KINDS, f"one of {list(HEAD_KINDS)}"),
    "max_det": (_int_in(*MAX_DET_RANGE), f"an integer in [{MAX_DET_RANGE[0]}, {MAX_DET_RANGE[1]}]"),
    "precision": (lambda v: v in ("fp16", "fp32"), "'fp16' or 'fp32'"),
    "batch_min": (_batch, f"an integer in [{BATCH_RANGE[0]}, {BATCH_RANGE[1]}]"),
    "batch_opt": (_batch, f"an integer in [{BATCH_RANGE[0]}, {BATCH_RANGE[1]}]"),
    "batch_max": (_batch, f"an integer in [{BATCH_RANGE[0]}, {BATCH_RANGE[1]}]"),
    "flavour": (_str, "a TensorRT module name (string)"),
    "trt_version": (_str, "a version string"),
    "compute_capabilities": (
        _list_of(lambda c: isinstance(c, str) and re.fullmatch(r"\d{1,3}\.\d{1,3}", c), 64),
        'a list of compute capabilities like "8.6"',
    ),
    "hardware_compatibility": (_str, "a string"),
    "gpu_name": (_optional(_str), "a string or null"),
    "input_name": (_str, "a tensor name (string)"),
    "input_dtype": (lambda v: v in ("float32", "float16"), "'float32' or 'float16'"),
    "output_name": (_str, "a tensor name (string)"),
    "output_shape": (
        _list_of(_int_in(-1, 10_000_000), 8),
        "a list of at most 8 integers (-1 for a dynamic axis)",
    ),
    "onnx_opset": (_optional(_int_in(1, 1000)), "an integer or null"),
    "built_at": (_str, "a string"),
    "build_seconds": (_optional(_seconds), "a number of seconds or null"),
    "trtwsi_version": (_str, "a string"),
    "fp16_check": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "sidecar_version": (_int_in(0, 1_000_000), "an integer"),
}


def _seen(value: Any) -> str:
    text = repr(value)
    return f"{text[:80]}…" if len(text) > 80 else text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def load_sidecar_json(path: str | os.PathLike) -> Any:
    """Parse the JSON file ``path`` as data: size-limited, ``NaN``/``Infinity`` refused, too
    deep nesting refused.

    Raises:
        EngineMismatchError: unreadable, too large, or not strict JSON (names the file and the
            fix).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise EngineMismatchError(
                f"sidecar {str(path)!r} is {size} bytes, over the {MAX_SIDECAR_BYTES}-byte limit "
                f"(a sidecar is about 1 kB); {_REBUILD}"
            )
        return json.loads(path.read_bytes(), parse_constant=_no_constant)
    except EngineMismatchError:
        raise
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise EngineMismatchError(
            f"sidecar {str(path)!r} is not readable JSON: {why}; {_REBUILD}"
        ) from e


def check_sidecar(data: Mapping[str, Any], source: str = "sidecar") -> None:
    """Check the known fields of a sidecar dict (:data:`SIDECAR_FIELDS`; unknown keys, from
    newer writers, are ignored) and that ``batch_min ≤ batch_opt ≤ batch_max``.

    Raises:
        EngineMismatchError: ``data`` is not an object, or a field has the wrong type or is out
            of range (names ``source``, the key, the value seen and what is allowed).
    """
    if not isinstance(data, Mapping):
        raise EngineMismatchError(f"{source}: expected a JSON object, got {type(data).__name__}")
    for key, (check, allowed) in SIDECAR_FIELDS.items():
        if key in data and not check(data[key]):
            value = data[key]
            raise EngineMismatchError(
                f"{source}: {key} = {_seen(value)} ({type(value).__name__}) is not allowed; "
                f"{key} must be {allowed}; {_REBUILD}"
            )
    batch = [data.get(k) for k in ("batch_min", "batch_opt", "batch_max")]
    if None not in batch and not batch[0] <= batch[1] <= batch[2]:
        raise EngineMismatchError(
            f"{source}: batch range {batch} is not batch_min ≤ batch_opt ≤ batch_max; {_REBUILD}"
        )
