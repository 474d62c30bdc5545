"""Loading ultralytics ``.pt`` checkpoints without running code from the file.

A ``.pt`` is a zip archive whose ``data.pkl`` is a Python pickle, and a pickle is a small
program: its GLOBAL opcode imports any name (``posix.system``, ``builtins.exec``) and its REDUCE
opcode calls it with arguments taken from the file. ``torch.load(weights_only=False)`` runs that
program, so a payload runs as the file loads: before trtwsi can reject the result, and also when
it hides in an otherwise valid checkpoint (the model then works, and nobody notices).

By default (:func:`load_checkpoint` with ``trust_weights=False``) trtwsi:

1. reads the file once into memory (so the bytes it checks are the bytes it loads) and takes
   ``data.pkl`` with torch's own archive reader (the record ``torch.load`` reads);
2. walks the pickle opcode by opcode with a symbolic stack (:func:`scan_pickle`), following what
   torch's weights-only unpickler does, and refuses the file with
   :class:`~trtwsi.errors.UnsafeWeightsError` (nothing from it has run) when:

   * a GLOBAL names anything outside the allow-list (:func:`allowed_globals`);
   * REDUCE calls anything but one of the allow-list's *data constructors*, in particular a
     model class's constructor. Allow-listing a class with ``torch.serialization.safe_globals``
     lets the pickle call it: ``DetectionModel(cfg)`` ``eval``s the ``activation`` string
     of ``cfg`` in ultralytics' ``parse_model``, so ``safe_globals([DetectionModel])`` plus
     ``weights_only=True`` runs code (seen with torch 2.14 and ultralytics 8.4). Model classes are
     accepted only through NEWOBJ (``cls.__new__``, no ``__init__``) and BUILD
     (``__setstate__`` or a ``__dict__`` update), which is how ``torch.save`` writes modules;
   * it uses an opcode that torch's weights-only unpickler does not implement;
3. loads with ``torch.load(weights_only=True)`` inside ``torch.serialization.safe_globals`` of
   the allow-listed globals the file names. That is a second gate: torch's restricted unpickler
   never imports a module and refuses any global that is not registered.

Where the allow-list comes from: the globals that real checkpoints name (the bundled demo models;
``YOLO.save`` files of YOLOv8/v10/11/26 detect, segment, pose, OBB and classify models; training
checkpoints of ultralytics 8.4, stripped and unstripped), widened to the whole family of classes
that are rebuilt the same safe way:

* model classes (NEWOBJ and BUILD only): every ``torch.nn.Module`` subclass defined in
  ``ultralytics.nn.modules.*``, ``ultralytics.nn.tasks`` (``DetectionModel`` …) and
  ``torch.nn.modules.*`` (``Conv2d``, ``BatchNorm2d``, ``SiLU``, ``Upsample`` …); the classes
  of ``ultralytics.utils.loss`` and ``ultralytics.utils.tal`` (training checkpoints of older
  ultralytics versions can keep the loss object; 8.4 strips it). Their ``__setstate__`` methods
  only fill in attributes that older versions lacked.
* data constructors (REDUCE allowed; they build values and run no user code): torch's tensor and
  parameter rebuild functions, ``torch.Size``, ``torch.device``, ``collections.OrderedDict``,
  ``builtins.set``, ``types.SimpleNamespace``, ``ultralytics.utils.IterableSimpleNamespace``
  (training arguments), ``numpy.dtype`` and numpy's scalar reconstructor (numpy floats in
  training metrics), ``_codecs.encode`` (protocol 2 writes each ``bytes`` as
  ``encode(text, "latin1")``; a codec name can only select an installed codec, e.g. from the
  stdlib ``encodings`` package, and codecs transform data), ``pathlib`` path classes (path
  objects only, no file access).
* plain values, never called: torch storage types and dtypes.
* names used by older ultralytics versions map to today's objects (``_LEGACY_MODULES``,
  ``_LEGACY_ATTRIBUTES``, the renames ultralytics' own loader applies).

Never allowed: ``builtins.getattr``, ``eval``, ``exec``, ``__import__``, ``open``, anything from
``os``/``posix``/``subprocess``/``sys``, any other function, any call of a class constructor, and
quantization-aware-training checkpoints (restoring them runs nvidia-modelopt code driven by
the file). ``trust_weights=True`` skips all of this and unpickles the file fully. That is the only
way to load files outside this format, and it runs whatever code the file contains.

Over 500 lines on purpose: the pickle scanner, the allow-list and the loader are one defence and
are reviewed together.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import functools
import importlib
import importlib.util
import io
import pickle
import pickletools
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from trtwsi.errors import MissingDependencyError, ModelError, UnsafeWeightsError, require

__all__ = [
    "TRUST_HINT",
    "PickleScan",
    "allowed_globals",
    "describe",
    "head_task",
    "load_checkpoint",
    "scan_pickle",
]

#: The explicit opt-in, quoted by every refusal.
TRUST_HINT = (
    "if you made this file yourself or trust its source, load it with "
    "Model(..., trust_weights=True), `trust_weights = true` in its models.toml entry, or "
    "`trtwsi predict --trust-weights` (that unpickles the file fully and runs any code it holds)"
)

# Old module paths in checkpoints written by older ultralytics versions (the same renames
# ultralytics' own ``torch_safe_load`` applies).
_LEGACY_MODULES = {
    "ultralytics.yolo.utils": "ultralytics.utils",
    "ultralytics.yolo.v8": "ultralytics.models.yolo",
    "ultralytics.yolo.data": "ultralytics.data",
}
_LEGACY_ATTRIBUTES = {
    "ultralytics.nn.modules.block.Silence": "torch.nn.Identity",
    "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
    "ultralytics.utils.loss.v10DetectLoss": "ultralytics.utils.loss.E2EDetectLoss",
}

#: Kinds of allow-listed globals: rebuilt from saved state only / callable with data / a value.
CLASS, CALL, DATA = "class", "call", "data"
_MODULE_CLASS_PACKAGES = ("ultralytics.nn.modules", "ultralytics.nn.tasks", "torch.nn.modules")
_PLAIN_CLASS_PACKAGES = ("ultralytics.utils.loss", "ultralytics.utils.tal")
_LOCK = threading.Lock()  # safe_globals() edits a process-wide set: one safe load at a time


def _in_packages(modname: str, packages: tuple[str, ...]) -> bool:
    return any(modname == p or modname.startswith(p + ".") for p in packages)


@functools.lru_cache(maxsize=1)
def allowed_globals() -> dict[str, tuple[Any, str]]:
    """The allow-list: pickled global name → ``(object, kind)``, ``kind`` one of ``"class"``
    (NEWOBJ/BUILD only), ``"call"`` (a data constructor REDUCE may call) and ``"data"`` (a value,
    never called). See the module docstring for what is on it and why. Built once, from modules
    the installed torch and ultralytics have imported (no name from a file is ever imported)."""
    import numpy as np
    import torch
    import ultralytics.nn.tasks  # imports every ultralytics.nn.modules.* module
    import ultralytics.utils.loss
    import ultralytics.utils.tal  # noqa: F401
    from ultralytics.utils import IterableSimpleNamespace

    allow: dict[str, tuple[Any, str]] = {}
    for modname, mod in sorted(sys.modules.items()):
        modules_only = _in_packages(modname, _MODULE_CLASS_PACKAGES)
        if mod is None or not (modules_only or _in_packages(modname, _PLAIN_CLASS_PACKAGES)):
            continue
        for obj in list(vars(mod).values()):
            if (
                isinstance(obj, type)
                and obj.__module__ == modname
                and not obj.__name__.startswith("_")
                and (not modules_only or issubclass(obj, torch.nn.Module))
            ):
                allow[f"{modname}.{obj.__qualname__}"] = (obj, CLASS)

    scalar = np.float64(0).__reduce__()[0]  # numpy.(_)core.multiarray.scalar
    path_cls = Path().__class__  # PosixPath here, WindowsPath on Windows: either OS's pickle loads
    calls = {
        "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
        "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "_codecs.encode": codecs.encode,  # bytes in a protocol-2 pickle: encode(text, "latin1")
        "types.SimpleNamespace": types.SimpleNamespace,
        "ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
        "numpy.dtype": np.dtype,
        "numpy.core.multiarray.scalar": scalar,
        "numpy._core.multiarray.scalar": scalar,
        **{
            f"{m}.{c}": path_cls
            for m in ("pathlib", "pathlib._local")
            for c in ("PosixPath", "WindowsPath")
        },
    }
    allow.update({name: (obj, CALL) for name, obj in calls.items()})
    for attr in dir(torch):
        obj = getattr(torch, attr, None)
        if isinstance(obj, torch.dtype) or (isinstance(obj, type) and attr.endswith("Storage")):
            allow[f"torch.{attr}"] = (obj, DATA)
    return allow


def _resolve(name: str) -> tuple[Any, str] | None:
    """``(object, kind)`` of a pickled global name (legacy names mapped), None when not allowed."""
    allow = allowed_globals()
    if name in allow:
        return allow[name]
    if name in _LEGACY_ATTRIBUTES:  # our own constants: safe to import
        module, _, attr = _LEGACY_ATTRIBUTES[name].rpartition(".")
        obj = getattr(importlib.import_module(module), attr)
        return allow.get(f"{obj.__module__}.{obj.__qualname__}")
    for old, new in _LEGACY_MODULES.items():
        if name.startswith(old + "."):
            return allow.get(new + name[len(old) :])
    return None


class PickleScan(NamedTuple):
    """What :func:`scan_pickle` found: ``globals`` (names, in order) and ``problems`` (why the
    pickle is refused, in order; empty when it may be loaded)."""

    globals: tuple[str, ...]
    problems: tuple[str, ...]


class _Global:
    """A stack item that is a pickled global, by name."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


_VALUE = object()  # any other stack item
#: Opcodes that push one plain value (those torch's weights-only unpickler implements).
_PUSH_ONE = frozenset(
    "NONE NEWFALSE NEWTRUE EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT BININT1 BININT2 "  # noqa: SIM905
    "BINFLOAT BINUNICODE SHORT_BINSTRING LONG1".split()
)


class _Malformed(Exception):
    pass


def scan_pickle(data: bytes) -> PickleScan:
    """Check a pickle for the safe loader without running any of it.

    Simulates the opcodes torch's weights-only unpickler implements (GLOBAL, REDUCE, NEWOBJ,
    BUILD, MARK, tuples, lists, dicts, sets, ints, floats, strings, BINPERSID, memo GET/PUT,
    PROTO, STOP) on a stack of "a global named X" / "some value" items, and reports: globals
    that are not allow-listed, REDUCE of anything but an allow-listed data constructor (a model
    class's constructor, a computed object), NEWOBJ of anything but an allow-listed class, any
    other opcode, and a malformed pickle.
    """
    seen: list[str] = []
    problems: list[str] = []

    def refuse(what: str) -> None:
        if what not in problems:
            problems.append(what)

    def pop() -> Any:
        if not stack:
            raise _Malformed
        return stack.pop()

    stack: list[Any] = []
    metastack: list[list[Any]] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                if (module, attr) in _compat_pickle.NAME_MAPPING:  # as torch reads protocol 2
                    module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
                elif module in _compat_pickle.IMPORT_MAPPING:
                    module = _compat_pickle.IMPORT_MAPPING[module]
                full = f"{module}.{attr}"
                if full not in seen:
                    seen.append(full)
                if _resolve(full) is None:
                    refuse(full)
                stack.append(_Global(full))
            elif name == "REDUCE":
                pop()
                func = pop()
                _check_callee(func, CALL, refuse)
                stack.append(_VALUE)
            elif name == "NEWOBJ":
                pop()
                _check_callee(pop(), CLASS, refuse)
                stack.append(_VALUE)
            elif name in ("BUILD", "APPEND"):
                pop()
                if not stack:
                    raise _Malformed
            elif name == "SETITEM":
                pop(), pop()
                if not stack:
                    raise _Malformed
            elif name == "MARK":
                metastack.append(stack)
                stack = []
            elif name in ("APPENDS", "SETITEMS", "TUPLE"):
                if not metastack:
                    raise _Malformed
                stack = metastack.pop()
                if name == "TUPLE":
                    stack.append(_VALUE)
                elif not stack:
                    raise _Malformed
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                for _ in range(int(name[-1])):
                    pop()
                stack.append(_VALUE)
            elif name in _PUSH_ONE:
                stack.append(_VALUE)
            elif name == "BINPERSID":  # torch only resolves ("storage", …) ids
                pop()
                stack.append(_VALUE)
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise _Malformed
                stack.append(memo[arg])
            elif name in ("BINPUT", "LONG_BINPUT"):
                if not stack:
                    raise _Malformed
                memo[arg] = stack[-1]
            elif name == "STOP":
                break
            elif name != "PROTO":
                refuse(f"pickle opcode {name} (not implemented by the safe loader)")
    except (_Malformed, ValueError, EOFError):
        refuse("a malformed pickle (stack or memo out of range, or truncated)")
    return PickleScan(tuple(seen), tuple(problems))


def _check_callee(item: Any, want: str, refuse) -> None:
    """``want="call"``: REDUCE may call only data constructors; ``"class"``: NEWOBJ may build
    only allow-listed classes (model classes or the data constructors that are types)."""
    if not isinstance(item, _Global):
        refuse(
            f"{'REDUCE' if want == CALL else 'NEWOBJ'} of a computed object (only named, "
            "allow-listed globals may be called or instantiated)"
        )
        return
    found = _resolve(item.name)
    if found is None:
        return  # already refused as a global
    obj, kind = found
    if want == CALL and kind == CLASS:
        refuse(
            f"{item.name}(…) (a call of the class's constructor with arguments from the file; "
            "model classes may only be rebuilt from their saved state)"
        )
    elif want == CALL and kind != CALL:
        refuse(f"{item.name}(…) (a call of a value)")
    elif want == CLASS and not (kind == CLASS or (kind == CALL and isinstance(obj, type))):
        refuse(f"{item.name}.__new__ (not a class the safe loader builds)")


def _torch_entries(names: tuple[str, ...]) -> list:
    """``safe_globals`` entries for the allow-listed names a file uses: ``(object, name)``
    pairs (legacy names included), plus numpy's dtype classes when ``numpy.dtype`` is used
    (BUILD checks the built dtype's class, which the pickle never names)."""
    entries = []
    for name in names:
        found = _resolve(name)
        if found is not None:
            entries.append((found[0], name))
    if "numpy.dtype" in names:
        import numpy as np

        classes = {np.dtype}
        for c in vars(getattr(np, "dtypes", types.SimpleNamespace())).values():  # numpy >= 1.25
            if isinstance(c, type) and issubclass(c, np.dtype):
                classes.add(c)
        entries += sorted(classes, key=lambda c: c.__name__)
    return entries


def _unreadable(path: Path, why: str) -> ModelError:
    return ModelError(
        f"cannot load {str(path)!r}: not a readable PyTorch checkpoint (it may be truncated or "
        f"corrupt, or not a .pt file at all): {why}. Re-download or re-export it."
    )


def _torchscript(path: Path) -> ModelError:
    return ModelError(
        f"{str(path)!r} is a TorchScript archive, not an ultralytics .pt checkpoint; "
        "give the original .pt weights"
    )


def _unpickle_safe(path: Path) -> Any:
    """Steps 1–3 of the module docstring; the unpickled object."""
    torch = require("torch", "torch", "Loading a YOLO .pt model")
    if not (
        hasattr(torch.serialization, "safe_globals")
        and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")  # torch >= 2.6
    ):
        raise MissingDependencyError(
            f"loading {str(path)!r} safely needs torch >= 2.6 (weights-only unpickling with "
            f"named allow-list entries), this is torch {torch.__version__}: upgrade it "
            f"(pip install -U 'trtwsi[torch]'), or {TRUST_HINT}"
        )
    data = path.read_bytes()
    if not data.startswith(b"PK\x03\x04"):
        raise _unreadable(
            path,
            "it is not the zip archive torch.save writes (torch >= 1.6); a file in the "
            "legacy torch format must be re-saved with torch.save, or loaded with trust_weights",
        )
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = reader.get_all_records()
        if "constants.pkl" in records or any(r.startswith("code/") for r in records):
            raise _torchscript(path)
        pkl = reader.get_record("data.pkl")
    except RuntimeError as e:
        raise _unreadable(path, f"{type(e).__name__}: {str(e).splitlines()[0]}") from e
    scan = scan_pickle(bytes(pkl))
    if scan.problems:
        shown = "; ".join(scan.problems[:5]) + (
            f"; … ({len(scan.problems)} in all)" if len(scan.problems) > 5 else ""
        )
        raise UnsafeWeightsError(
            f"refusing to load {str(path)!r}: its pickle would use {shown}. trtwsi loads only "
            "ultralytics/torch model classes rebuilt from their saved state and a few data "
            "constructors, because unpickling a .pt can run code (README: 'What a .pt can do'); "
            f"nothing from the file was run. {TRUST_HINT}.",
            path=path,
            offending=scan.problems,
        )
    with _LOCK:
        registered = set(torch.serialization.get_safe_globals())
        entries = [e for e in _torch_entries(scan.globals) if e not in registered]
        try:
            with torch.serialization.safe_globals(entries):
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeWeightsError(
                f"refusing to load {str(path)!r}: torch's weights-only unpickler refused it "
                f"({str(e).splitlines()[0]}); nothing from the file was run. {TRUST_HINT}.",
                path=path,
                offending=(str(e).splitlines()[0],),
            ) from e
        except Exception as e:
            raise _unreadable(path, f"{type(e).__name__}: {e}") from e


def _unpickle_trusted(path: Path) -> Any:
    """Full unpickling (``weights_only=False``): runs any code the file holds."""
    torch = require("torch", "torch", "Loading a YOLO .pt model")
    from ultralytics.nn.tasks import temporary_modules

    try:
        with temporary_modules(modules=_LEGACY_MODULES, attributes=_LEGACY_ATTRIBUTES):
            return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise ModelError(
            f"cannot load {str(path)!r}: the checkpoint needs the Python module {e.name!r}, which is "
            "not importable. A YOLOv5-era file (module 'models') is not an ultralytics 8.x model; "
            "re-export or retrain it with the installed ultralytics."
        ) from e
    except Exception as e:
        raise _unreadable(path, f"{type(e).__name__}: {e}") from e


def describe(obj: Any) -> str:
    """Short description of an unpickled object for error messages."""
    if isinstance(obj, Mapping):
        keys = list(obj)[:8]
        more = f" … ({len(obj)} keys)" if len(obj) > 8 else ""
        return f"a dict with keys {keys}{more}"
    return f"an object of type {type(obj).__module__}.{type(obj).__qualname__}"


def load_checkpoint(path: Path, *, trust_weights: bool = False) -> tuple[Any, dict]:
    """Load an ultralytics ``.pt`` offline; return ``(float32 module, checkpoint dict)``.

    ``trust_weights=False`` (default): the safe path of the module docstring; a file outside
    the allow-list raises :class:`~trtwsi.errors.UnsafeWeightsError` before anything from it
    runs. ``trust_weights=True``: full unpickling, which runs whatever code the file contains.
    Use it only for files you made yourself or whose source you trust.

    Unlike ``ultralytics.nn.tasks.load_checkpoint`` this never downloads a missing file and
    never pip-installs a module the file names; every failure is a
    :class:`~trtwsi.errors.ModelError`.
    """
    torch = require("torch", "torch", "Loading a YOLO .pt model")
    require("ultralytics", "torch", "Loading a YOLO .pt model")
    obj = _unpickle_trusted(path) if trust_weights else _unpickle_safe(path)

    if isinstance(obj, torch.jit.ScriptModule):
        raise _torchscript(path)
    ckpt = obj if isinstance(obj, dict) else {"model": obj}
    candidate = ckpt.get("ema") or ckpt.get("model")
    from ultralytics.engine.model import Model as UltralyticsModel

    if isinstance(candidate, UltralyticsModel):  # a YOLO(...) wrapper saved with torch.save
        candidate = candidate.model
    if not isinstance(candidate, torch.nn.Module) or not isinstance(
        getattr(candidate, "model", None), torch.nn.Sequential
    ):
        raise ModelError(
            f"{str(path)!r} is a torch file but not an ultralytics YOLO checkpoint: found "
            f"{describe(obj)} (expected a dict whose 'model' or 'ema' entry is an ultralytics model, "
            "as written by ultralytics training or YOLO.save)"
        )
    if ckpt.get("modelopt"):  # QAT checkpoint: re-apply its fake quantization, as ultralytics does
        if not trust_weights:
            raise UnsafeWeightsError(
                f"refusing to load {str(path)!r}: it is a quantization-aware-training checkpoint "
                "(key 'modelopt'), and restoring it runs nvidia-modelopt code driven by the file. "
                f"{TRUST_HINT}.",
                path=path,
                offending=("modelopt",),
            )
        if importlib.util.find_spec("modelopt") is None:  # ultralytics would pip-install it
            raise MissingDependencyError(
                f"{str(path)!r} is a quantization-aware-training checkpoint; restoring it needs "
                "nvidia-modelopt (pip install nvidia-modelopt)"
            )
        from ultralytics.utils.torch_utils import restore_qat

        restore_qat(candidate, ckpt["modelopt"])
    return candidate.float(), ckpt


def head_task(head: Any, fallback: str | None) -> str:
    """Name the task of a non-detect head for the error message."""
    from ultralytics.nn.modules import head as H

    kinds = [
        ("Segment", "segment"),
        ("Pose", "pose"),
        ("OBB", "obb"),
        ("Classify", "classify"),
        ("SemanticSegment", "semantic"),
        ("Depth", "depth"),
        ("RTDETRDecoder", "detect (RT-DETR)"),
        ("WorldDetect", "detect (open-vocabulary YOLO-World)"),
        ("YOLOEDetect", "detect (open-vocabulary YOLOE)"),
    ]
    for cls_name, task in kinds:
        cls = getattr(H, cls_name, None)
        if cls is not None and isinstance(head, cls):
            return task
    return fallback or "unknown"
