"""TensorRT engine metadata: the JSON sidecar, engine file names, and "does it fit here?".

A TensorRT plan file says nothing trtwsi can read without deserializing it, and deserializing an
engine built for another GPU or TensorRT version fails with a terse log line (or worse). So
``python -m trtwsi.export.build`` writes next to every ``.engine`` a ``.engine.json`` sidecar
(:class:`EngineMeta`), and resolution and ``trtwsi doctor`` decide from the sidecar alone, before
touching the plan, whether the engine can run here (:func:`check_fit`), with a reason and the
command that fixes it.

Engine file names say what they fit, so several engines can sit next to one ``.pt``::

    <weights stem>.<imgsz>.<head>.b<min>-<max>.<precision>.<flavour>-<version>.<targets>.engine
    demo-yolo11n.640.nms.b1-32.fp16.trtrtx-1.7.1.116.sm86.engine

``targets`` is ``sm86`` (one compute capability), ``sm75-80-86`` (several, TensorRT-RTX) or
``sm80plus`` (TensorRT's Ampere-and-later hardware compatibility).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trtwsi.engines.sidecar_check import check_sidecar, load_sidecar_json
from trtwsi.errors import EngineMismatchError

__all__ = [
    "FLAVOURS",
    "SIDECAR_VERSION",
    "EngineMeta",
    "RuntimeInfo",
    "build_command",
    "check_fit",
    "engine_filename",
    "find_engines",
    "read_sidecar",
    "sidecar_path",
]

SIDECAR_VERSION = 1
#: Python module of each TensorRT flavour (``tensorrt_rtx`` also installs as
#: ``tensorrt_rtx_bindings`` from the PyPI wheels).
FLAVOURS = {"tensorrt": "TensorRT", "tensorrt_rtx": "TensorRT-RTX"}
_FLAVOUR_TAG = {"tensorrt": "trt", "tensorrt_rtx": "trtrtx"}
ENGINE_SUFFIX = ".engine"


@dataclasses.dataclass
class EngineMeta:
    """What an engine was built from and for (the ``.engine.json`` sidecar).

    Shapes: input ``images`` ``(B, 3, imgsz, imgsz)`` of ``input_dtype`` (RGB in [0, 1]);
    output ``output0`` float32, ``(B, 4 + nc, N)`` for ``head="nms"`` or ``(B, max_det, 6)`` for
    ``head="end2end"`` (see :mod:`trtwsi.engines.model`), with ``B`` in ``[batch_min, batch_max]``.

    ``compute_capabilities``: the GPU architectures the plan runs on, as ``"8.6"`` strings;
    ``hardware_compatibility`` ``"ampere_plus"`` means any GPU of compute capability ≥ 8.0 (full
    TensorRT only). ``gpu_name`` is the GPU the build ran on, None for a TensorRT-RTX build on a
    machine without one (the targets were named explicitly).
    """

    weights: str
    weights_sha256: str
    names: list[str]
    imgsz: int
    stride: int
    head: str
    max_det: int
    precision: str
    batch_min: int
    batch_opt: int
    batch_max: int
    flavour: str
    trt_version: str
    compute_capabilities: list[str]
    hardware_compatibility: str = "none"
    gpu_name: str | None = None
    input_name: str = "images"
    input_dtype: str = "float32"
    output_name: str = "output0"
    output_shape: list[int] = dataclasses.field(default_factory=list)
    onnx_opset: int | None = None
    built_at: str = ""
    build_seconds: float | None = None
    trtwsi_version: str = ""
    fp16_check: dict | None = None
    sidecar_version: int = SIDECAR_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "sidecar") -> EngineMeta:
        """Parse a sidecar dict; unknown keys are ignored (newer writers), missing ones raise."""
        if not isinstance(data, dict):
            raise EngineMismatchError(
                f"{source}: expected a JSON object, got {type(data).__name__}"
            )
        version = data.get("sidecar_version")
        if version != SIDECAR_VERSION:
            raise EngineMismatchError(
                f"{source}: sidecar_version {version!r} is not {SIDECAR_VERSION} (written by "
                "another trtwsi version); rebuild the engine with python -m trtwsi.export.build"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise EngineMismatchError(
                f"{source}: missing keys {missing}; rebuild the engine with python -m trtwsi.export.build"
            )
        check_sidecar(data, source)
        return cls(**{k: v for k, v in data.items() if k in fields})

    @property
    def targets(self) -> str:
        """File-name token of the GPUs the engine runs on (``sm86``, ``sm75-86``, ``sm80plus``)."""
        if self.hardware_compatibility == "ampere_plus":
            return "sm80plus"
        ccs = [cc.replace(".", "") for cc in self.compute_capabilities]
        return "sm" + "-".join(ccs) if ccs else "smany"


def sidecar_path(engine: str | os.PathLike) -> Path:
    """``x.engine`` → ``x.engine.json``."""
    return Path(str(engine) + ".json")


def engine_filename(weights: str | os.PathLike, meta: EngineMeta) -> str:
    """The engine file name for ``meta`` (see the module docstring), next to ``weights``."""
    stem = Path(weights).stem
    tag = _FLAVOUR_TAG.get(meta.flavour, meta.flavour)
    return (
        f"{stem}.{meta.imgsz}.{meta.head}.b{meta.batch_min}-{meta.batch_max}.{meta.precision}."
        f"{tag}-{meta.trt_version}.{meta.targets}{ENGINE_SUFFIX}"
    )


def read_sidecar(engine: str | os.PathLike) -> EngineMeta:
    """Read the sidecar of ``engine``.

    Raises:
        EngineMismatchError: no sidecar, unreadable JSON, or a sidecar of another schema version.
    """
    path = sidecar_path(engine)
    if not path.is_file():
        raise EngineMismatchError(
            f"engine {str(engine)!r} has no sidecar {path.name!r} (trtwsi needs it to check the "
            "engine fits before loading it); rebuild it with python -m trtwsi.export.build"
        )
    data = load_sidecar_json(path)
    return EngineMeta.from_dict(data, source=f"sidecar {str(path)!r}")


def find_engines(weights: str | os.PathLike) -> list[tuple[Path, EngineMeta | EngineMismatchError]]:
    """Engines next to ``weights`` (``<stem>.*.engine``), each with its sidecar or the error
    reading it, newest first."""
    weights = Path(weights)
    found = []
    pattern = f"{glob_escape(weights.stem)}.*{ENGINE_SUFFIX}"
    paths = sorted(weights.parent.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in paths:
        try:
            found.append((p, read_sidecar(p)))
        except EngineMismatchError as e:
            found.append((p, e))
    return found


def glob_escape(s: str) -> str:
    """Escape glob metacharacters in a literal file-name part."""
    return re.sub(r"([*?\[])", r"[\1]", s)


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    """What can run engines here: the TensorRT flavour importable (None: none), its version,
    and the target GPU's compute capability as ``"9.0"`` (None: no CUDA GPU)."""

    flavour: str | None
    trt_version: str | None
    compute_capability: str | None
    gpu_name: str | None = None


def build_command(
    weights: str | os.PathLike,
    *,
    batch: int | None = None,
    imgsz: int | None = None,
    head: str | None = None,
) -> str:
    """The ``python -m trtwsi.export.build`` command line that builds an engine fitting these needs."""
    cmd = f"python -m trtwsi.export.build --fp16 --model {weights}"
    if batch is not None and batch > 32:
        cmd += f" --batch-size {batch}"
    if imgsz is not None and imgsz != 640:
        cmd += f" --imgsz {imgsz}"
    if head is not None:
        cmd += f" --head {head}"
    return cmd


def _cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def check_fit(
    meta: EngineMeta,
    runtime: RuntimeInfo,
    *,
    weights_sha256: str | None = None,
    imgsz: int | None = None,
    head: str | None = None,
    max_det: int | None = None,
    batch: int | None = None,
) -> str | None:
    """None when the engine described by ``meta`` can run here for these needs, else the reason.

    Checked in order: source weights (SHA-256), imgsz, head kind and its ``max_det``, batch
    size within ``[batch_min, batch_max]``, TensorRT flavour importable, TensorRT version equal
    (plans are not portable across versions), compute capability of the GPU. A None argument is
    not checked.
    """
    if weights_sha256 is not None and meta.weights_sha256 != weights_sha256:
        return (
            f"engine was built from other weights (sha256 {meta.weights_sha256[:12]}…, the .pt "
            f"now has {weights_sha256[:12]}…)"
        )
    if imgsz is not None and meta.imgsz != imgsz:
        return f"engine input is {meta.imgsz} px, the model runs at imgsz={imgsz}"
    if head is not None and meta.head != head:
        return f"engine has the {meta.head!r} head, the model uses head={head!r}"
    if head == "end2end" and max_det is not None and meta.max_det != max_det:
        return f"engine keeps the top {meta.max_det} boxes, the model asks max_det={max_det}"
    if batch is not None and not meta.batch_min <= batch <= meta.batch_max:
        return (
            f"batch size {batch} is outside the engine's profile "
            f"[{meta.batch_min}, {meta.batch_max}]"
        )
    want = FLAVOURS.get(meta.flavour, meta.flavour)
    if runtime.flavour is None:
        return f"no TensorRT Python module is importable (the engine needs {want})"
    if runtime.flavour != meta.flavour:
        have = FLAVOURS.get(runtime.flavour, runtime.flavour)
        return f"engine was built with {want}, but only {have} is importable here"
    if runtime.trt_version != meta.trt_version:
        return (
            f"engine was built with {want} {meta.trt_version}, this is {want} {runtime.trt_version}"
        )
    cc = runtime.compute_capability
    if cc is None:
        return "no CUDA GPU is visible (TensorRT engines run only on NVIDIA GPUs)"
    if meta.hardware_compatibility == "ampere_plus":
        if _cc_tuple(cc) < (8, 0):
            return f"engine needs compute capability ≥ 8.0 (Ampere+), this GPU is {cc}"
    elif cc not in {str(c) for c in meta.compute_capabilities}:
        built = ", ".join(meta.compute_capabilities) or "none"
        return f"engine was built for compute capability {built}, this GPU is {cc}"
    return None


def format_batch_range(values: Sequence[int]) -> str:
    """``[1, 8, 32]`` → ``"1..32 (opt 8)"``."""
    lo, opt, hi = values
    return f"{lo}..{hi} (opt {opt})"
