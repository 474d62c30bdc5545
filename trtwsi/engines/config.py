"""Model settings: the type and range each one may have, and the models TOML file.

A models file holds ``[[model]]`` tables of :class:`~trtwsi.engines.model.Model` arguments; relative
``weights`` paths are relative to the file's folder::

    [[model]]
    name = "demo"
    weights = "demo-yolo11n.pt"
    min_conf = 0.25
    iou = 0.45
    classes = ["nucleus", "metaphase"]   # optional

The file is parsed as data only: UTF-8 text read by ``tomllib`` (no includes, no code, no
environment lookups). Every value is checked before any model loads (:data:`RULES`). A value of
the wrong type is refused, never converted: ``fallback_to_pt = "no"`` is a string, not false,
and ``min_conf = true`` is not 1.0. The same rules check :class:`~trtwsi.engines.model.Model`'s
arguments, and :func:`check_imgsz` also checks the input size a checkpoint carries (a
checkpoint ``imgsz`` of 32000 would reach the predictor and fail there with a MemoryError). Every
error is a :class:`~trtwsi.errors.ModelConfigError` naming the file, the model entry, the key,
the value seen and what is allowed.

This module does not import :mod:`trtwsi.engines.model`: :func:`load_models_config` takes the class
that builds a model from an entry.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trtwsi.errors import MissingDependencyError, ModelConfigError, ModelError, ModelNotFoundError

__all__ = [
    "BACKENDS",
    "CONFIG_KEYS",
    "GRAPH_BACKENDS",
    "HEAD_KINDS",
    "IMGSZ_RANGE",
    "MAX_DET_RANGE",
    "RULES",
    "check_imgsz",
    "check_model_args",
    "load_models_config",
    "read_toml",
]

BACKENDS = ("auto", "torch", "tensorrt", "onnxruntime", "openvino")
#: CPU backends that run the model's exported graph, and the runtime's name for messages
GRAPH_BACKENDS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
HEAD_KINDS = ("nms", "end2end")
DEFAULT_IMGSZ = 640
DEFAULT_MAX_DET = 300
#: Model input side in px: YOLO strides are 32 (64 for P6 models); past 4096 px one fp32 input
#: image alone is 200 MB and the anchor count explodes.
IMGSZ_RANGE = (32, 4096)
IMGSZ_STEP = 32
#: Detections kept per tile.
MAX_DET_RANGE = (1, 10_000)
#: A models file is a few kB; a larger file is not one (refused before it is read).
MAX_CONFIG_BYTES = 1 << 20

#: Keys a ``[[model]]`` table may have (the Model constructor's arguments).
CONFIG_KEYS = (
    "name",
    "weights",
    "classes",
    "min_conf",
    "iou",
    "backend",
    "fallback_to_pt",
    "imgsz",
    "head",
    "max_det",
    "trust_weights",
)


def _nonempty_str(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _path(v: Any) -> bool:
    return _nonempty_str(v) or (isinstance(v, os.PathLike) and str(v) != "")


def _unit_number(v: Any) -> bool:
    return (
        isinstance(v, numbers.Real)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and 0.0 <= v <= 1.0
    )


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi


def _imgsz(v: Any) -> bool:
    return _int_in(*IMGSZ_RANGE)(v) and v % IMGSZ_STEP == 0


def _class_id(k: Any) -> bool:
    if isinstance(k, str):
        return k.isdigit()
    return isinstance(k, int) and not isinstance(k, bool)


def _classes(v: Any) -> bool:
    if isinstance(v, list):
        return bool(v) and all(_nonempty_str(n) for n in v)
    if isinstance(v, Mapping):
        return bool(v) and all(_class_id(k) and _nonempty_str(n) for k, n in v.items())
    return False


#: key → (check, what is allowed). Booleans must be real booleans; numbers must not be booleans.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_nonempty_str, "a non-empty string"),
    "weights": (_path, "the path of the .pt file, a non-empty string"),
    "classes": (
        _classes,
        'a non-empty list of class names ["a", "b"], or a table of names by class id '
        '{0 = "a", 1 = "b"}',
    ),
    "min_conf": (_unit_number, "a number in [0, 1] (not a boolean)"),
    "iou": (_unit_number, "a number in [0, 1] (not a boolean)"),
    "backend": (lambda v: isinstance(v, str) and v in BACKENDS, f"one of {list(BACKENDS)}"),
    "fallback_to_pt": (lambda v: isinstance(v, bool), "a boolean: true or false (unquoted)"),
    "trust_weights": (lambda v: isinstance(v, bool), "a boolean: true or false (unquoted)"),
    "imgsz": (
        _imgsz,
        f"an integer multiple of {IMGSZ_STEP} in [{IMGSZ_RANGE[0]}, {IMGSZ_RANGE[1]}] "
        "(model input side in px)",
    ),
    "head": (lambda v: isinstance(v, str) and v in HEAD_KINDS, f"one of {list(HEAD_KINDS)}"),
    "max_det": (
        _int_in(*MAX_DET_RANGE),
        f"an integer in [{MAX_DET_RANGE[0]}, {MAX_DET_RANGE[1]}]",
    ),
}


def _seen(value: Any) -> str:
    text = repr(value)
    return f"{text[:80]}…" if len(text) > 80 else text


def check_model_args(args: Mapping[str, Any], where: str) -> None:
    """Check model settings against :data:`RULES`.

    Raises:
        ModelConfigError: an unknown key (the message lists the valid ones), or a value of the
            wrong type or out of range (the message names ``where``, the key, the value seen,
            its type and what is allowed).
    """
    unknown = sorted(str(k) for k in args if k not in RULES)
    if unknown:
        raise ModelConfigError(
            f"{where}: unknown model config key(s) {unknown}; valid keys: {list(CONFIG_KEYS)}"
        )
    for key, value in args.items():
        check, allowed = RULES[key]
        if not check(value):
            raise ModelConfigError(
                f"{where}: {key} = {_seen(value)} ({type(value).__name__}) is not allowed; "
                f"{key} must be {allowed}"
            )


def check_imgsz(value: Any, *, stride: int, where: str) -> int:
    """``value`` as a model input side: a positive int, a multiple of ``stride``, within
    :data:`IMGSZ_RANGE`. ``where`` says where it came from (``"imgsz"``, a checkpoint).

    Raises:
        ModelConfigError: naming ``where``, the value and the fix.
    """
    lo, hi = IMGSZ_RANGE
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ModelConfigError(
            f"{where}={_seen(value)} is not a positive int (model input side in px)"
        )
    if value % stride:
        near = min(max(stride, round(value / stride) * stride), hi // stride * stride)
        raise ModelConfigError(
            f"{where}={value} is not a multiple of the model stride {stride}; "
            f"pass imgsz= a multiple of {stride}, e.g. {near}"
        )
    if not lo <= value <= hi:
        raise ModelConfigError(
            f"{where}={value} is outside the allowed [{lo}, {hi}] px (model input side); "
            f"pass imgsz= a multiple of {stride} in that range, e.g. {DEFAULT_IMGSZ}"
        )
    return int(value)


def read_toml(path: str | os.PathLike) -> dict:
    """Parse a TOML file as data. UTF-8 only (a leading byte-order mark is allowed).

    Raises:
        ModelConfigError: larger than :data:`MAX_CONFIG_BYTES`, not UTF-8, or not TOML.
        MissingDependencyError: Python 3.10 without ``tomli``.
    """
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise MissingDependencyError(
                "reading a models TOML file on Python 3.10 needs the module 'tomli' "
                "(pip install tomli)"
            ) from e
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelConfigError(
            f"models config {str(path)!r} is {size} bytes; a models TOML file is a few kB "
            f"(limit {MAX_CONFIG_BYTES} bytes): is this the right file?"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelConfigError(
            f"models config {str(path)!r} is not UTF-8 text (byte {raw[e.start]:#04x} at offset "
            f"{e.start}); TOML files must be UTF-8: save it with UTF-8 encoding"
        ) from e
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ModelConfigError(f"models config {str(path)!r} is not valid TOML: {e}") from e


def _entries(path: Path, data: Mapping) -> list[tuple[str, dict]]:
    """``(label, checked entry)`` of each ``[[model]]`` table; all are checked (keys, types,
    ranges, distinct names) before any model loads."""
    where = f"models config {str(path)!r}"
    entries = data.get("model")
    if isinstance(entries, Mapping):  # a single [model] table
        entries = [entries]
    if not entries or not isinstance(entries, list):
        found = f" (top-level keys: {sorted(data)})" if data else ""
        raise ModelConfigError(f"{where} has no [[model]] tables{found}")
    extra = sorted(set(data) - {"model"})
    if extra:
        raise ModelConfigError(
            f"{where}: unknown top-level key(s) {extra}; the file holds [[model]] tables only"
        )
    checked, first_of = [], {}
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, Mapping):
            raise ModelConfigError(
                f"{where}, model #{i}: a [[model]] entry must be a table, got {_seen(entry)}"
            )
        name = entry.get("name")
        label = f"#{i} {name!r}" if isinstance(name, str) else f"#{i}"
        check_model_args(entry, f"{where}, model {label}")
        if "weights" not in entry:
            raise ModelConfigError(
                f"{where}, model {label}: no 'weights' (path to the .pt, relative to the file)"
            )
        shown = name if name is not None else Path(str(entry["weights"])).stem  # Model's default
        if shown in first_of:
            raise ModelConfigError(
                f"{where}: model #{first_of[shown]} and model #{i} are both named {shown!r}, so "
                "their detections could not be told apart in the results; give each "
                '[[model]] its own name = "…"'
            )
        first_of[shown] = i
        checked.append((label, dict(entry)))
    return checked


def load_models_config(
    path: str | os.PathLike, model_cls: Callable[..., Any], *, trust_weights: bool = False
) -> list:
    """Read a models TOML file into models built by ``model_cls.from_config(entry, base_dir=…)``.

    ``trust_weights=True`` (``trtwsi predict --trust-weights``) trusts every entry's weights;
    otherwise each entry's own ``trust_weights`` (default false) decides.

    Raises:
        ModelNotFoundError: the TOML file (or a weights file) does not exist.
        ModelConfigError: not UTF-8, invalid TOML, no ``[[model]]`` tables, an unknown key, a
            value of the wrong type or out of range, or two models with the same name.
        ModelError: a model cannot be built (the message names the file and the entry).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"models config not found: {str(path)!r}")
    models = []
    for label, entry in _entries(path, read_toml(path)):
        if trust_weights:
            entry["trust_weights"] = True
        try:
            models.append(model_cls.from_config(entry, base_dir=path.parent))
        except ModelError as e:
            err = type(e)(f"models config {str(path)!r}, model {label}: {e}")
            err.__dict__.update(e.__dict__)
            raise err from e
    return models
