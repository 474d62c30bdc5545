"""Model spec: an ultralytics YOLO detector's weights, classes and thresholds, and backend choice.

A :class:`Model` is what users hand to the predictor, one per detector::

    Model("best.pt", classes=["nucleus", "metaphase"], min_conf=0.25, iou=0.45)

It loads the local ``.pt`` checkpoint offline (never downloads, never installs) and safely
(nothing from the file runs unless ``trust_weights=True``: see :mod:`trtwsi.engines.checkpoint`),
checks that it is a *detection* model, and exposes what the pipeline needs: class names, stride,
input size, head kind, and the prepared ``torch.nn.Module``. Models can also come from a TOML file
(:func:`load_models_config`, see :mod:`trtwsi.engines.config`).

Head kinds (``Model.head``):

* ``"nms"`` — YOLOv8/YOLO11-style one-to-many head. Eval forward returns ``(B, 4 + nc, N)``
  float: box centre x, y, width, height in input px, then the ``nc`` class scores after the
  sigmoid; ``N`` anchors (8400 at 640). Needs NMS.
* ``"end2end"`` — YOLOv10/YOLO26 one-to-one head. Eval forward returns ``(B, K, 6)`` float:
  ``(x1, y1, x2, y2, score, class_id)`` in input px, the head's top ``K = max_det`` by score.
  Needs no NMS. These checkpoints also carry a one-to-many branch; ``head="nms"`` selects it
  instead (that is what ``ultralytics`` 8.4 ``predict`` uses by default, ``nms=False`` selects
  the end-to-end one).

Backends: ``resolve_backend`` decides between TensorRT and PyTorch and says why: an engine built
by ``python -m trtwsi.export.build`` next to the ``.pt`` whose sidecar fits this GPU, TensorRT version,
weights, imgsz, head and batch → ``"tensorrt"``; else ``"torch"`` with the reason and the command
that builds a fitting engine (an error with ``fallback_to_pt=False`` or ``backend="tensorrt"``).
``backend="onnxruntime"`` / ``"openvino"`` run the model's graph with ONNX Runtime / OpenVINO
on the CPU (:mod:`~trtwsi.engines.onnxrt`, :mod:`~trtwsi.engines.openvino`; on CUDA devices
the other backends are used). ``backend="auto"`` on the CPU is OpenVINO when it is installed
(:func:`cpu_graph_backend`), PyTorch otherwise.

Over 500 lines (525) on purpose: one class whose parts are the checks of a user's model (classes,
thresholds, head, input size) and the backend decision that must explain itself (the engine's
sidecar checks, the reasons, the commands); split, each half would need the other's state.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtwsi.engines.checkpoint import head_task, load_checkpoint
from trtwsi.engines.config import (
    BACKENDS,
    CONFIG_KEYS,
    DEFAULT_IMGSZ,
    DEFAULT_MAX_DET,
    GRAPH_BACKENDS,
    HEAD_KINDS,
    check_imgsz,
    check_model_args,
)
from trtwsi.engines.config import load_models_config as _load_models_config
from trtwsi.errors import BackendError, ModelError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

    from trtwsi.engines.base import Engine

__all__ = ["BACKENDS", "HEAD_KINDS", "Model", "ModelNotFoundError", "load_models_config"]


def _as_imgsz(value: Any) -> int:
    """Checkpoint ``imgsz`` (an int or an ``[h, w]`` list) → one int side (the larger one)."""
    if isinstance(value, (list, tuple)) and value:
        return int(max(value))
    return int(value)


def cpu_graph_backend() -> str | None:
    """The graph backend ``backend="auto"`` uses on the CPU: ``"openvino"`` when OpenVINO and
    onnx are importable (``pip install 'trtwsi[openvino]'``), else None (PyTorch).

    Only OpenVINO: it ran the forward at least as fast as PyTorch at every thread count
    measured (1.2–1.4× on 1, 4 and 8 threads of a 16-core Xeon, 1.37× on 2 EPYC cores), and
    matched ultralytics within 1.2e-4 px and 7e-6 in score on a scene tile. ONNX Runtime, often
    installed for engine export, was slower than PyTorch at 4–8 threads there, so it stays
    opt-in (``bench/results/cpu-forward-*.json``).
    """
    import importlib.util

    try:
        ok = all(importlib.util.find_spec(m) is not None for m in ("openvino", "onnx"))
    except (ImportError, ValueError):
        ok = False
    return "openvino" if ok else None


class Model:
    """An ultralytics YOLO detection model, loaded from a local ``.pt``, and how to run it.

    Args:
        weights: path to the ultralytics ``.pt`` checkpoint (a training ``best.pt``, or
            ``YOLO.save``). Loaded on the CPU in float32, offline.
        classes: class names by id — a list of ``nc`` names or a dict ``{id: name}`` with ids
            ``0..nc-1`` (TOML string keys ``"0"`` are accepted). None: the checkpoint's names.
        min_conf: score threshold; detections with score ``> min_conf`` are kept.
        iou: NMS IoU threshold; a box is suppressed by a higher-scored box of its class with
            IoU ``> iou`` (``"nms"`` heads only).
        backend: ``"auto"`` (TensorRT when a matching engine exists; on the CPU OpenVINO when
            it is installed, falling back to PyTorch with a warning if it cannot run the model;
            else the .pt with PyTorch),
            ``"torch"``, ``"tensorrt"``, ``"onnxruntime"`` or ``"openvino"`` (on the CPU: the
            model's graph in ONNX Runtime / OpenVINO, faster per tile than PyTorch on x86; needs
            ``pip install 'trtwsi[onnxruntime]'`` / ``'trtwsi[openvino]'``; on a GPU they act
            as ``"auto"``).
        fallback_to_pt: with ``backend="auto"``, allow running the .pt with PyTorch when no
            TensorRT engine (on the CPU: OpenVINO) can be used; False makes that an error
            (:class:`BackendError`, or OpenVINO's own).
        imgsz: model input side in px (square). None: the checkpoint's training ``imgsz``, else
            640. Must be a multiple of the model's stride, in ``[32, 4096]`` (the checkpoint's
            too).
        name: a label for results and logs; default the weights file's stem.
        head: ``None`` (the checkpoint's native head: ``"end2end"`` when it has a one-to-one
            branch, as YOLOv10/YOLO26, else ``"nms"``), or force ``"nms"`` / ``"end2end"``.
        max_det: most detections kept per tile (after NMS; ``K`` of end-to-end heads), in
            ``[1, 10000]``.
        trust_weights: False (default): load the ``.pt`` safely, refusing any file whose
            pickle names something outside an allow-list of ultralytics/torch classes
            (:class:`UnsafeWeightsError`, nothing from the file runs). True: unpickle it fully.
            **A pickle can run any code when it loads**: pass True only for files you made
            yourself or whose source you trust.

    Attributes:
        weights (Path), name (str), names (list[str], by class id), nc (int), stride (int, the
        largest), imgsz (int), head (``"nms"`` | ``"end2end"``), min_conf, iou, max_det,
        backend, fallback_to_pt, trust_weights, sha256 (hex digest of the weights file,
        computed on first use), module (the prepared ``torch.nn.Module``, built on first use).

    Raises:
        ModelNotFoundError: (a ModelError and FileNotFoundError) the weights file is missing.
        UnsafeWeightsError: (a ModelError) the file's pickle would call or build something
            outside the allow-list (``trust_weights=False``); nothing from it ran.
        ModelConfigError: (a ModelError) an argument, or the checkpoint's ``imgsz``, has the
            wrong type or is out of range (e.g. ``imgsz`` not a multiple of the stride).
        ModelError: the file is not a loadable ultralytics checkpoint, not a detection model,
            or the classes do not match ``nc``.
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        classes: Sequence[str] | Mapping[int | str, str] | None = None,
        min_conf: float = 0.25,
        iou: float = 0.45,
        backend: str = "auto",
        fallback_to_pt: bool = True,
        imgsz: int | None = None,
        name: str | None = None,
        *,
        head: str | None = None,
        max_det: int = DEFAULT_MAX_DET,
        trust_weights: bool = False,
    ):
        self.weights = Path(weights).expanduser()
        self.name = name or self.weights.stem
        args = {"min_conf": min_conf, "iou": iou, "backend": backend, "max_det": max_det}
        args.update(fallback_to_pt=fallback_to_pt, trust_weights=trust_weights)
        check_model_args(args if head is None else {**args, "head": head}, f"model {self.name!r}")
        self.min_conf, self.iou, self.max_det = float(min_conf), float(iou), int(max_det)
        self.backend, self.fallback_to_pt = backend, fallback_to_pt
        self.trust_weights = trust_weights

        if not self.weights.exists():
            raise ModelNotFoundError(
                f"model weights not found: {str(self.weights)!r} (check the path)"
            )
        if not self.weights.is_file():
            raise ModelError(f"model weights {str(self.weights)!r} is not a file")

        net, ckpt = load_checkpoint(self.weights, trust_weights=trust_weights)
        detect = net.model[-1]
        train_args = ckpt.get("train_args") or {}
        model_args = getattr(net, "args", None)
        model_args = model_args if isinstance(model_args, dict) else {}
        ckpt_task = train_args.get("task") or getattr(net, "task", None) or model_args.get("task")

        from ultralytics.nn.modules.head import Detect, v10Detect

        if type(detect) not in (Detect, v10Detect) or ckpt_task not in (None, "detect"):
            task = head_task(detect, ckpt_task)
            raise ModelError(
                f"{str(self.weights)!r} is a {task!r} model (head {type(detect).__name__}, checkpoint "
                f"task {ckpt_task!r}); trtwsi needs a detect model (an ultralytics Detect head, e.g. "
                "trained from yolo11n.pt or yolo26n.pt)"
            )

        self.nc = int(detect.nc)
        self.names = self._resolve_names(classes, getattr(net, "names", None))
        self.stride = int(net.stride.max())

        has_o2o = getattr(detect, "one2one_cv2", None) is not None
        has_o2m = getattr(detect, "cv2", None) is not None
        self._default_head = "end2end" if has_o2o else "nms"
        self.head = head or self._default_head
        if self.head == "end2end" and not has_o2o:
            raise ModelError(
                f"{str(self.weights)!r} has no end-to-end (one-to-one) head; use head='nms' or None"
            )
        if self.head == "nms" and not has_o2m:
            raise ModelError(
                f"{str(self.weights)!r} keeps only its end-to-end head (it was fused); use "
                "head='end2end' or None"
            )

        if imgsz is None:
            raw = train_args.get("imgsz", model_args.get("imgsz", DEFAULT_IMGSZ))
            try:
                imgsz = _as_imgsz(raw)
            except (TypeError, ValueError, OverflowError):
                imgsz = DEFAULT_IMGSZ
            where = f"the checkpoint's imgsz (in {str(self.weights)!r})"
        else:
            where = "imgsz"
        self.imgsz = check_imgsz(imgsz, stride=self.stride, where=where)

        self._raw_module = net
        self._module = None
        self._lock = threading.Lock()

    # --- construction helpers -----------------------------------------------------------
    def _resolve_names(self, classes: Any, ckpt_names: Any) -> list[str]:
        """Class names by id: the override, else the checkpoint's, else ``class0..``."""
        source = "classes" if classes is not None else "the checkpoint's names"
        names = classes if classes is not None else ckpt_names
        if names is None:
            return [f"class{i}" for i in range(self.nc)]
        if isinstance(names, Mapping):
            try:
                by_id = {int(k): str(v) for k, v in names.items()}
            except (TypeError, ValueError) as e:
                raise ModelError(
                    f"{source} keys must be class ids 0..{self.nc - 1}, got {list(names)}"
                ) from e
            if sorted(by_id) != list(range(len(by_id))) or len(by_id) != self.nc:
                raise ModelError(
                    f"{source} has {len(by_id)} classes (ids {sorted(by_id)[:10]}) but the model "
                    f"predicts {self.nc} classes (ids 0..{self.nc - 1}); give exactly one name per class"
                )
            return [by_id[i] for i in range(self.nc)]
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ModelError(
                f"{source} must be a list of names or a dict {{id: name}}, got {names!r}"
            )
        if len(names) != self.nc:
            raise ModelError(
                f"{source} has {len(names)} classes but the model predicts {self.nc} classes; "
                "give exactly one name per class"
            )
        return [str(n) for n in names]

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], base_dir: str | os.PathLike | None = None
    ) -> Model:
        """Build a Model from a mapping of constructor arguments (a ``[[model]]`` TOML table).

        ``weights`` is required; a relative path is taken relative to ``base_dir`` (the TOML
        file's folder) when given. Unknown keys raise :class:`ModelError` (catches typos).
        """
        if not isinstance(config, Mapping):
            raise ModelError(f"a model config must be a table/dict, got {config!r}")
        unknown = sorted(set(config) - set(CONFIG_KEYS))
        if unknown:
            raise ModelError(
                f"unknown model config key(s) {unknown}; known keys: {list(CONFIG_KEYS)}"
            )
        if "weights" not in config:
            raise ModelError(f"model config {dict(config)!r} has no 'weights' (path to the .pt)")
        kwargs = dict(config)
        weights = Path(str(kwargs.pop("weights"))).expanduser()
        if base_dir is not None and not weights.is_absolute():
            weights = Path(base_dir) / weights
        return cls(weights, **kwargs)

    # --- lazily built state -------------------------------------------------------------
    @functools.cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the weights file (ties TensorRT engines to their source weights)."""
        return self.file_sha256(self.weights)

    @staticmethod
    def file_sha256(path: str | os.PathLike) -> str:
        """Hex SHA-256 of a file, read in 1 MiB blocks."""
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    @property
    def module(self) -> torch.nn.Module:
        """The prepared ``torch.nn.Module`` (CPU, float32, eval, fused, no grads).

        Its eval forward on ``(B, 3, imgsz, imgsz)`` returns ``(y, extras)`` where ``y`` is the
        raw head output described in the module docstring (``(B, 4 + nc, N)`` for ``"nms"``,
        ``(B, max_det, 6)`` for ``"end2end"``); engines take ``y``. Built on first access,
        thread-safe; shared, so engines that change device or dtype work on a copy.
        """
        if self._module is None:
            with self._lock:
                if self._module is None:
                    self._module = self._prepare(self._raw_module)
                    self._raw_module = None
        return self._module

    def _prepare(self, net: torch.nn.Module) -> torch.nn.Module:
        import torch

        detect = net.model[-1]
        if getattr(detect, "one2one_cv2", None) is not None:
            # Select the branch before fusing: fuse() drops the branch not selected.
            net.end2end = self.head == "end2end"
        detect.max_det = self.max_det  # K of the end-to-end top-k; unused by "nms" heads
        detect.agnostic_nms = False  # class-aware top-k, as ultralytics predict by default
        net = net.fuse(verbose=False).eval()
        for m in net.modules():  # same module fix-ups as ultralytics' load_checkpoint
            if hasattr(m, "inplace"):
                m.inplace = True
            elif isinstance(m, torch.nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
                m.recompute_scale_factor = None
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    # --- backends -----------------------------------------------------------------------
    def engine_needs(self) -> dict:
        """What an engine must match to stand in for this model (:func:`check_fit` keywords)."""
        return {
            "weights_sha256": self.sha256,
            "imgsz": self.imgsz,
            "head": self.head,
            "max_det": self.max_det,
        }

    def _tensorrt_engine(
        self, device: torch.device, batch_size: int | None = None
    ) -> tuple[Path | None, str]:
        """``(engine path, "")`` when an engine next to the ``.pt`` fits ``device`` (GPU compute
        capability, TensorRT flavour and version, weights, imgsz, head, ``batch_size``), else
        ``(None, reason)``; the reason names the closest engine's mismatch and the command
        that builds a fitting one."""
        from trtwsi.engines.sidecar import build_command, check_fit, find_engines
        from trtwsi.engines.tensorrt import INSTALL_HINT, runtime_info

        head = self.head if self.head != self._default_head else None
        fix = build_command(self.weights, batch=batch_size, imgsz=self.imgsz, head=head)
        if self.head == "end2end" and self.max_det != DEFAULT_MAX_DET:
            fix += f" --max-det {self.max_det}"
        if device.type != "cuda":
            return None, (
                f"device {str(device)!r} is not a CUDA GPU and TensorRT engines run only on NVIDIA "
                "GPUs"
            )
        engines = find_engines(self.weights)
        if not engines:
            return None, f"no TensorRT engine next to {self.weights.name} (build one: {fix})"
        rt = runtime_info(device)
        if rt.flavour is None:
            hints = " or ".join(INSTALL_HINT.values())
            return None, (
                f"no TensorRT Python module is importable, so the {len(engines)} engine(s) next to "
                f"{self.weights.name} cannot run (install: {hints})"
            )
        reasons = []
        for path, meta in engines:
            if isinstance(meta, Exception):
                reasons.append(f"{path.name}: {meta}")
                continue
            why = check_fit(
                meta, runtime_info(device, meta.flavour), batch=batch_size, **self.engine_needs()
            )
            if why is None:
                return path, ""
            reasons.append(f"{path.name}: {why}")
        more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
        return None, f"no engine fits here: {reasons[0]}{more}; build one with: {fix}"

    def resolve_backend(
        self, device: str | torch.device = "cpu", batch_size: int | None = None
    ) -> tuple[str, str]:
        """Decide how this model runs on ``device``: ``(kind, reason)``.

        ``kind`` is ``"tensorrt"`` when a matching engine sits next to the ``.pt`` (see
        :meth:`_tensorrt_engine`); on the CPU with ``backend="auto"``, ``"openvino"`` when
        OpenVINO is installed (:func:`cpu_graph_backend`); else ``"torch"``. ``reason`` is a
        sentence for logs/warnings saying why (for a fallback: the mismatch and the command that
        fixes it).

        Raises:
            BackendError: ``backend="tensorrt"`` and no engine fits, or ``backend="auto"`` with
                ``fallback_to_pt=False`` and no engine fits.
        """
        import torch

        device = torch.device(device)
        if self.backend in GRAPH_BACKENDS and device.type == "cpu":
            label = GRAPH_BACKENDS[self.backend]
            return self.backend, f"backend={self.backend!r}: {self.weights.name}'s graph in {label}"
        if self.backend == "torch":
            return (
                "torch",
                f"backend='torch' was requested: running {self.weights.name} with PyTorch",
            )
        if self.backend == "auto" and device.type == "cpu" and cpu_graph_backend() is not None:
            return "openvino", (
                f"backend='auto' on the CPU: {self.weights.name}'s graph in OpenVINO (installed; "
                "faster per tile than PyTorch; backend='torch' to opt out)"
            )
        engine, why = self._tensorrt_engine(device, batch_size)
        if engine is not None:
            return "tensorrt", f"matching TensorRT engine {engine.name}"
        if self.backend == "tensorrt":
            raise BackendError(
                f"model {self.name!r}: backend='tensorrt' but {why}; or use backend='auto' to "
                f"fall back to PyTorch"
            )
        if not self.fallback_to_pt:
            raise BackendError(
                f"model {self.name!r}: no usable TensorRT engine ({why}) and fallback_to_pt=False "
                f"forbids running {self.weights.name} with PyTorch; pass fallback_to_pt=True or "
                "backend='torch'"
            )
        return "torch", f"{why}; running {self.weights.name} with PyTorch"

    def load_engine(
        self,
        device: str | torch.device = "cpu",
        *,
        half: bool | None = None,
        batch_size: int | None = None,
        cuda_graph: bool | None = None,
        shape_batch: int | None = None,
        compile: bool = False,
    ) -> Engine:
        """Resolve the backend and build its :class:`~trtwsi.engines.base.Engine`.

        ``half``: fp16 inference for the torch backend (default: True on CUDA, False on the CPU;
        a TensorRT engine has the precision it was built with). ``batch_size``: fixed batch size
        (None: any; for TensorRT any batch in the engine's profile). With ``backend="auto"`` on a
        CUDA device, falling back to PyTorch issues one warning that names the reason and the
        command that fixes it. ``cuda_graph``: capture one forward/enqueue as a CUDA graph and
        replay it (needs a fixed ``batch_size`` on CUDA). None: on for the torch backend
        (verified on an H100), off for TensorRT (its capture has not run on a GPU yet).
        ``shape_batch``: with ``batch_size`` None, the batch the caller will mostly run (the
        runtime's); OpenVINO compiles that static shape (less memory than a dynamic one) and
        pads or splits other batches. Other backends ignore it. ``compile``: the torch backend
        on CUDA compiles its forward with ``torch.compile`` (see
        :class:`~trtwsi.engines.torch.TorchEngine`); TensorRT engines are compiled already and
        ignore it.
        """
        import torch

        device = torch.device(device)
        kind, reason = self.resolve_backend(device, batch_size)  # raises when none is allowed
        if kind == "onnxruntime":
            from trtwsi.engines.onnxrt import OnnxRuntimeEngine

            return OnnxRuntimeEngine(self, batch_size=batch_size)
        if kind == "openvino":
            from trtwsi.engines.openvino import OpenVinoEngine

            ov_args = dict(batch_size=batch_size, shape_batch=shape_batch)
            if self.backend == "openvino" or not self.fallback_to_pt:
                return OpenVinoEngine(self, **ov_args)
            try:  # chosen by "auto": PyTorch still runs this model if OpenVINO cannot
                return OpenVinoEngine(self, **ov_args)
            except Exception as e:
                warnings.warn(
                    f"model {self.name!r}: OpenVINO could not run it ({type(e).__name__}: "
                    f"{str(e)[:300]}); running {self.weights.name} with PyTorch",
                    stacklevel=2,
                )
        if kind == "tensorrt":
            from trtwsi.engines.tensorrt import TensorRTEngine

            path, _ = self._tensorrt_engine(device, batch_size)
            return TensorRTEngine(
                path, device, batch_size, cuda_graph=bool(cuda_graph), expect=self.engine_needs()
            )
        if (self.backend == "auto" or self.backend in GRAPH_BACKENDS) and device.type == "cuda":
            warnings.warn(f"model {self.name!r}: {reason}", stacklevel=2)
        from trtwsi.engines.torch import TorchEngine

        half = device.type == "cuda" if half is None else half
        return TorchEngine(
            self,
            device=device,
            half=half,
            batch_size=batch_size,
            cuda_graph=True if cuda_graph is None else cuda_graph,
            compile=compile,
        )

    def __repr__(self) -> str:
        return (
            f"Model(name={self.name!r}, weights={str(self.weights)!r}, head={self.head!r}, "
            f"nc={self.nc}, imgsz={self.imgsz}, min_conf={self.min_conf}, iou={self.iou})"
        )


def load_models_config(path: str | os.PathLike, *, trust_weights: bool = False) -> list[Model]:
    """Read a TOML file of ``[[model]]`` tables into Models (format and checks:
    :mod:`trtwsi.engines.config`).

    Each table holds :class:`Model` arguments (``weights`` required, relative to the TOML file's
    folder)::

        [[model]]
        name = "demo"
        weights = "demo-yolo11n.pt"
        min_conf = 0.25
        iou = 0.45
        classes = ["nucleus", "metaphase"]   # optional
        # trust_weights = true               # only for a .pt you made yourself

    ``trust_weights=True`` (``trtwsi predict --trust-weights``) trusts every entry's weights.

    Raises:
        ModelNotFoundError: the TOML file (or a weights file) does not exist.
        ModelConfigError: not UTF-8, invalid TOML, no ``[[model]]`` tables, an unknown key, a
            value of the wrong type or out of range, or two models with the same name (the
            message names the file, the entry, the key, the value and what is allowed).
        ModelError: a model cannot be built (the message names the file and the entry).
    """
    return _load_models_config(path, Model, trust_weights=trust_weights)
