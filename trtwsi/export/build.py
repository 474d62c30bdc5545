"""``python -m trtwsi.export.build``: ultralytics ``.pt`` → ONNX → TensorRT engine + JSON sidecar.

::

    python -m trtwsi.export.build --fp16 --model trtwsi/models/demo-yolo11n.pt   # one model
    python -m trtwsi.export.build --fp16 --models-dir my-models/         # every .pt there
    python -m trtwsi.export.build --fp16 --model m.pt --batch-size 32 --min-batch 1 --opt-batch 16 \\
        --imgsz 640 --workspace 4 --timing-cache ~/.cache/trtwsi/timing.cache --validate
    python -m trtwsi.export.build --no-half --model m.pt                         # fp32 (old tool's flag)
    python -m trtwsi.export.build --fp16 --model m.pt --flavour tensorrt_rtx --compute-capability 8.6

Steps: load the ``.pt`` offline (:class:`trtwsi.engines.model.Model`); export a float32 ONNX with a
dynamic batch (:mod:`trtwsi.engines.onnx_export`); for FP16 convert it to the mixed FP16 graph
(:mod:`trtwsi.export.fp16`: fp32 I/O and box-decode tail) and check it with onnxruntime against the
``.pt`` on sample tiles — a failed check stops the build; parse it with TensorRT's ONNX parser
into a strongly typed network (TensorRT 11 and TensorRT-RTX have no ``BuilderFlag.FP16``;
``--builder-fp16`` keeps TensorRT 10's weakly typed flag path on the fp32 ONNX); one
optimization profile min/opt/max over the batch; the timing cache loaded and saved back;
progress shown while TensorRT builds; the plan written as a plain file (``trtexec`` and
Polygraphy load it) plus its ``.engine.json`` sidecar (:mod:`trtwsi.engines.sidecar`). The
engine name says what it fits, so several can sit next to one ``.pt``.

Target GPU: full TensorRT builds for the GPU it runs on. TensorRT-RTX builds for the GPU present
(``--compute-capability`` to name others, repeatable), and on a machine without a GPU it needs
``--compute-capability`` (its builder runs on the CPU; CI builds the demo engines that way).

Exit codes: 0 built (or up to date), 1 an error (message printed), 2 bad arguments,
3 ``--validate`` ran and failed or could not run here.

Over 500 lines: the command line, its checks and the build steps of one export; the TensorRT
network and profile code is here because it is only used by this command.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from trtwsi.errors import (
    BackendError,
    EngineBuildError,
    MissingDependencyError,
    ModelNotFoundError,
    TrtwsiError,
    UsageError,
)

__all__ = ["BuildOptions", "build_engine", "build_model", "main"]

DEFAULT_BATCH = 32


class BuildOptions(argparse.Namespace):
    """Build settings (the CLI flags); see :func:`parse_args`."""

    fp16: bool = True
    batch_size: int = DEFAULT_BATCH
    min_batch: int = 1
    opt_batch: int | None = None
    imgsz: int | None = None
    head: str | None = None
    max_det: int = 300
    workspace: float | None = None
    timing_cache: str | None = None
    flavour: str | None = None
    compute_capability: list[str] | None = None
    builder_fp16: bool = False
    opt_level: int | None = None
    validate: bool = False
    force: bool = False
    keep_onnx: bool = False
    out_dir: str | None = None
    progress: bool = True
    check_tiles: int = 8


# ------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------
class _Progress:
    """Prints TensorRT's build phases (``IProgressMonitor``) and a heartbeat with the elapsed
    time, on one rewritten line on a terminal and as plain lines otherwise."""

    def __init__(self, trt, stream=sys.stderr, enabled: bool = True):
        self.stream, self.enabled = stream, enabled
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()
        self.phases: dict[str, list] = {}  # name -> [parent, steps, done]
        self.lock = threading.Lock()
        self.last = ""
        self.monitor = None
        if enabled and hasattr(trt, "IProgressMonitor"):
            outer = self

            class Monitor(trt.IProgressMonitor):
                def __init__(self):
                    trt.IProgressMonitor.__init__(self)

                def phase_start(self, phase_name, parent_phase, num_steps):
                    with outer.lock:
                        outer.phases[phase_name] = [parent_phase, num_steps, 0]
                    outer.show()

                def step_complete(self, phase_name, step):
                    with outer.lock:
                        if phase_name in outer.phases:
                            outer.phases[phase_name][2] = step + 1
                    outer.show()
                    return True  # keep building

                def phase_finish(self, phase_name):
                    with outer.lock:
                        outer.phases.pop(phase_name, None)
                    outer.show()

            self.monitor = Monitor()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def line(self) -> str:
        with self.lock:
            parts = [f"{n} {d}/{s}" for n, (_, s, d) in self.phases.items()]
        return f"[{time.perf_counter() - self.t0:6.1f} s] building: " + (" > ".join(parts) or "…")

    def show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            self.stream.write("\r" + text[:150].ljust(150))
            self.stream.flush()
        else:  # a log: only the two outer levels of phases, without step counts
            with self.lock:
                outer = [n for n, (parent, _, _) in self.phases.items() if self._depth(n) < 2]
            key = " > ".join(outer)
            if force or (key and key != self.last):
                self.last = key
                print(
                    text if force else f"[{time.perf_counter() - self.t0:6.1f} s] {key or '…'}",
                    file=self.stream,
                    flush=True,
                )

    def _depth(self, name: str) -> int:
        d, parent = 0, self.phases.get(name, [None])[0]
        while parent is not None and d < 16:
            d, parent = d + 1, self.phases.get(parent, [None])[0]
        return d

    def _beat(self) -> None:
        while not self._stop.wait(10.0):
            self.show(force=True)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled and self.tty:
            self.stream.write("\n")


def _log(msg: str) -> None:
    print(f"trtwsi.export.build: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# TensorRT build
# ------------------------------------------------------------------------------------------
def _ok(value, what: str):
    if value is False or value is None:
        raise BackendError(f"TensorRT: {what} failed (see the TensorRT log above)")
    return value


def _targets(mod, opts: BuildOptions, gpu_cc: str | None) -> list[str]:
    """Compute capabilities to build for (``"8.6"`` strings)."""
    from trtwsi.engines.tensorrt import RTX_COMPUTE_CAPABILITIES

    want = [str(c) for c in opts.compute_capability or []]
    if mod.flavour == "tensorrt":
        if want and want != [gpu_cc]:
            raise EngineBuildError(
                f"--compute-capability {want}: full TensorRT builds only for the GPU it runs on "
                f"({gpu_cc or 'none here'}); drop the flag, or use --flavour tensorrt_rtx"
            )
        if gpu_cc is None:
            raise EngineBuildError(
                "full TensorRT needs a CUDA GPU to build on and none is visible; build on the "
                "target machine, or use --flavour tensorrt_rtx --compute-capability X.Y"
            )
        return [gpu_cc]
    targets = want or ([gpu_cc] if gpu_cc else [])
    if not targets:
        raise EngineBuildError(
            "no CUDA GPU here, so name the GPU(s) to build for: --compute-capability X.Y "
            f"(TensorRT-RTX supports {', '.join(RTX_COMPUTE_CAPABILITIES)}; e.g. 8.6 for RTX "
            "30xx / A10 / A40, 8.9 for RTX 40xx / L4 / L40S, 12.0 for RTX 50xx)"
        )
    bad = [c for c in targets if c not in RTX_COMPUTE_CAPABILITIES]
    if bad:
        raise EngineBuildError(
            f"TensorRT-RTX cannot build for compute capability {bad} (it supports "
            f"{', '.join(RTX_COMPUTE_CAPABILITIES)}; Hopper 9.0 and datacentre Blackwell 10.x need "
            "full TensorRT)"
        )
    return targets


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    mod,
    strongly_typed: bool,
    fp16_flag: bool,
    batch: tuple[int, int, int],
    imgsz: int,
    targets: list[str],
    workspace_gib: float | None = None,
    timing_cache: Path | None = None,
    opt_level: int | None = None,
    progress: bool = True,
) -> float:
    """Parse ``onnx_path`` and build a serialized engine into ``plan_path``; return seconds.

    ``batch``: (min, opt, max) of the optimization profile over the input's batch dimension.
    ``targets``: compute capabilities for TensorRT-RTX (ignored by full TensorRT).
    Every boolean TensorRT returns is checked; failures raise :class:`BackendError`.
    """
    trt = mod.trt
    logger = mod.logger("WARNING")
    builder = _ok(trt.Builder(logger), "creating the Builder")
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = _ok(builder.create_network(flags), "create_network")
    parser = _ok(trt.OnnxParser(network, logger), "creating the ONNX parser")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    inp = network.get_input(0)
    config = _ok(builder.create_builder_config(), "create_builder_config")
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16_flag:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise UsageError(
                f"--builder-fp16: {mod.label} has no BuilderFlag.FP16 (strongly typed only); drop "
                "the flag, the FP16 ONNX path is used"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    if mod.flavour == "tensorrt_rtx":
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            enum = getattr(trt.ComputeCapability, "SM" + cc.replace(".", ""))
            _ok(config.set_compute_capability(enum, i), f"set_compute_capability({cc}, {i})")
    profile = _ok(builder.create_optimization_profile(), "create_optimization_profile")
    lo, opt, hi = batch
    shapes = [(b, 3, imgsz, imgsz) for b in (lo, opt, hi)]
    profile.set_shape(inp.name, *shapes)  # returns None in Python: verify by reading back
    got = [tuple(d) for d in profile.get_shape(inp.name)]
    if got != shapes:
        raise BackendError(f"TensorRT: profile.set_shape({inp.name!r}, {shapes}) gave {got}")
    _ok(config.add_optimization_profile(profile) >= 0, "add_optimization_profile")
    cache = None
    if timing_cache is not None and mod.flavour == "tensorrt_rtx":
        _log(
            "--timing-cache: TensorRT-RTX has no build-time timing cache (it compiles kernels "
            "at run time); ignored"
        )
    elif timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = _ok(config.create_timing_cache(blob), "create_timing_cache")
        _ok(config.set_timing_cache(cache, False), f"set_timing_cache({timing_cache})")
    prog = _Progress(trt, enabled=progress)
    if prog.monitor is not None:
        config.progress_monitor = prog.monitor
    t0 = time.perf_counter()
    with prog:
        plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise BackendError(
            f"TensorRT ({mod.label}) failed to build the engine from {onnx_path.name}; see its log "
            "above (a larger --workspace may help)"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(plan_path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    tmp.replace(plan_path)
    if cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return seconds


# ------------------------------------------------------------------------------------------
# one model
# ------------------------------------------------------------------------------------------
def _batch_range(opts: BuildOptions) -> tuple[int, int, int]:
    lo, hi = int(opts.min_batch), int(opts.batch_size)
    opt = int(opts.opt_batch) if opts.opt_batch else hi
    if not 1 <= lo <= opt <= hi:
        raise UsageError(
            f"need 1 ≤ --min-batch ≤ --opt-batch ≤ --batch-size, got {lo}, {opt}, {hi}"
        )
    return lo, opt, hi


def build_model(weights: str | Path, opts: BuildOptions) -> tuple[Path, Any]:
    """Build (or find up to date) the engine for one ``.pt``; return ``(engine path, EngineMeta)``.

    Raises:
        UsageError: bad options. EngineBuildError: no builder for that GPU here, or the FP16
            ONNX check failed. TrtwsiError (other subclasses): TensorRT failed, or a dependency
            is missing (the message names the fix).
    """
    import trtwsi
    from trtwsi.app.compare import sample_tiles
    from trtwsi.engines.model import Model
    from trtwsi.engines.onnx_export import DEFAULT_OPSET, detect_prefix, export_onnx
    from trtwsi.engines.sidecar import EngineMeta, engine_filename, find_engines, sidecar_path
    from trtwsi.engines.tensorrt import cuda_device_info, load_module
    from trtwsi.export.fp16 import check_numerics, convert_fp16

    weights = Path(weights)
    model = Model(weights, imgsz=opts.imgsz, head=opts.head, max_det=opts.max_det)
    mod = load_module(opts.flavour)
    gpu_cc, gpu_name = cuda_device_info()
    targets = _targets(mod, opts, gpu_cc)
    lo, opt, hi = _batch_range(opts)
    precision = "fp16" if opts.fp16 else "fp32"
    meta = EngineMeta(
        weights=weights.name,
        weights_sha256=model.sha256,
        names=list(model.names),
        imgsz=model.imgsz,
        stride=model.stride,
        head=model.head,
        max_det=model.max_det,
        precision=precision,
        batch_min=lo,
        batch_opt=opt,
        batch_max=hi,
        flavour=mod.flavour,
        trt_version=mod.version,
        compute_capabilities=targets,
        gpu_name=gpu_name,
        onnx_opset=DEFAULT_OPSET,
        trtwsi_version=trtwsi.__version__,
    )
    out_dir = Path(opts.out_dir) if opts.out_dir else weights.parent
    plan_path = out_dir / engine_filename(weights, meta)
    if plan_path.is_file() and not opts.force:
        for p, old in find_engines(out_dir / weights.name):
            fresh = not isinstance(old, Exception) and old.weights_sha256 == model.sha256
            if p == plan_path and fresh:
                _log(f"{plan_path} is up to date (pass --force to rebuild)")
                return plan_path, old

    _log(
        f"{weights.name}: {model.head} head, imgsz {model.imgsz}, {precision}, batch "
        f"{lo}/{opt}/{hi}, {mod.label}, compute capability {', '.join(targets)}"
        + (f" ({gpu_name})" if gpu_name else "")
    )
    with tempfile.TemporaryDirectory(prefix="trtwsi-export-") as tmp:
        work = out_dir if opts.keep_onnx else Path(tmp)
        stem = plan_path.name.removesuffix(".engine")
        onnx32 = export_onnx(model, work / f"{stem}.fp32.onnx")
        _log(f"exported ONNX (dynamic batch) {onnx32.name}")
        onnx_path = onnx32
        strongly_typed = not opts.builder_fp16
        if opts.fp16 and not opts.builder_fp16:
            onnx_path = convert_fp16(onnx32, work / f"{stem}.onnx", detect_prefix(model))
            tiles = sample_tiles(model.imgsz, opts.check_tiles)
            check = check_numerics(onnx_path, model, tiles)
            meta.fp16_check = {"tiles": len(tiles), **check.to_dict()}
            _log(f"FP16 ONNX vs .pt (onnxruntime, CPU, {len(tiles)} tiles): {check.summary()}")
            if not check.passed:
                raise EngineBuildError(
                    f"the FP16 ONNX of {weights.name} does not agree with the .pt "
                    f"({'; '.join(check.reasons)}); build fp32 with --no-half, or report it"
                )
        cache = Path(opts.timing_cache).expanduser() if opts.timing_cache else None
        started = datetime.datetime.now(datetime.timezone.utc)
        seconds = build_engine(
            onnx_path,
            plan_path,
            mod=mod,
            strongly_typed=strongly_typed,
            fp16_flag=opts.fp16 and opts.builder_fp16,
            batch=(lo, opt, hi),
            imgsz=model.imgsz,
            targets=targets,
            workspace_gib=opts.workspace,
            timing_cache=cache,
            opt_level=opts.opt_level,
            progress=opts.progress,
        )
    meta.built_at = started.isoformat(timespec="seconds")
    meta.build_seconds = round(seconds, 1)
    meta.output_shape = _output_shape(model)
    sidecar_path(plan_path).write_text(meta.to_json() + "\n")
    size = plan_path.stat().st_size / 2**20
    _log(f"wrote {plan_path} ({size:.1f} MiB, built in {seconds:.0f} s) and its sidecar")
    return plan_path, meta


def _output_shape(model) -> list[int]:
    """``[-1, 4 + nc, N]`` or ``[-1, K, 6]`` (``-1``: the batch)."""
    s = model.imgsz
    n = sum((s // int(st)) ** 2 for st in model.module.model[-1].stride)
    if model.head == "end2end":
        return [-1, min(model.max_det, n), 6]
    return [-1, 4 + model.nc, n]


def validate(plan_path: Path, weights: Path, opts: BuildOptions) -> bool:
    """``--validate``: run the engine here and compare with the ``.pt``; False when it failed
    or cannot run here (the reason is printed)."""
    from trtwsi.app.compare import compare_engines
    from trtwsi.engines.model import Model
    from trtwsi.engines.tensorrt import TensorRTEngine

    model = Model(weights, imgsz=opts.imgsz, head=opts.head, max_det=opts.max_det)
    try:
        engine = TensorRTEngine(plan_path, "cuda", batch_size=None)
    except TrtwsiError as e:
        _log(f"--validate: cannot run {plan_path.name} here: {e}")
        return False
    result = compare_engines(model, engine, n=opts.check_tiles)
    _log(f"--validate {plan_path.name} vs {weights.name}: {result.summary()}")
    return result.passed


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------
def parse_args(argv=None) -> BuildOptions:
    ap = argparse.ArgumentParser(
        prog="python -m trtwsi.export.build",
        description="Build TensorRT engines (plan + JSON sidecar) from ultralytics .pt detectors.",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", action="append", help=".pt weights (repeatable)")
    src.add_argument(
        "--models-dir",
        help="build every .pt in this folder (default: the bundled demo models, or $TRTWSI_MODELS)",
    )
    prec = ap.add_mutually_exclusive_group()
    prec.add_argument(
        "--fp16", dest="fp16", action="store_true", default=True, help="FP16 engine (default)"
    )
    prec.add_argument("--fp32", "--no-half", dest="fp16", action="store_false", help="FP32 engine")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"largest batch of the profile (default {DEFAULT_BATCH})",
    )
    ap.add_argument("--min-batch", type=int, default=1, help="smallest batch (default 1)")
    ap.add_argument(
        "--opt-batch",
        type=int,
        default=None,
        help="batch TensorRT tunes for (default: --batch-size)",
    )
    ap.add_argument("--imgsz", type=int, default=None, help="input side (default: the model's)")
    ap.add_argument(
        "--head",
        choices=["nms", "end2end"],
        default=None,
        help="head of YOLO26/YOLOv10 models (default: the model's own)",
    )
    ap.add_argument("--max-det", type=int, default=300, help="end-to-end head top-K (300)")
    ap.add_argument("--workspace", type=float, default=None, help="builder workspace limit, GiB")
    ap.add_argument(
        "--timing-cache", default=None, help="timing cache file, read if present and written back"
    )
    ap.add_argument(
        "--flavour",
        choices=["tensorrt", "tensorrt_rtx"],
        default=None,
        help="TensorRT flavour (default: full TensorRT if importable, else RTX)",
    )
    ap.add_argument(
        "--compute-capability",
        action="append",
        default=None,
        metavar="X.Y",
        help="TensorRT-RTX target GPU(s), repeatable (default: this GPU)",
    )
    ap.add_argument(
        "--builder-fp16",
        action="store_true",
        help="TensorRT 10: weakly typed fp32 ONNX + BuilderFlag.FP16",
    )
    ap.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0-5")
    ap.add_argument("--out-dir", default=None, help="write engines here (default: next to the .pt)")
    ap.add_argument("--keep-onnx", action="store_true", help="keep the ONNX files next to it")
    ap.add_argument(
        "--check-tiles",
        type=int,
        default=8,
        help="sample tiles for the FP16 check and --validate (default 8)",
    )
    ap.add_argument(
        "--validate",
        action="store_true",
        help="run the engine here and compare its boxes with the .pt's",
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap.parse_args(argv, namespace=BuildOptions())


def _weights_list(opts: BuildOptions) -> list[Path]:
    if opts.model:
        return [Path(m) for m in opts.model]
    from trtwsi._util.resources import bundled_models_dir

    folder = Path(opts.models_dir) if opts.models_dir else bundled_models_dir()
    found = sorted(folder.glob("*.pt"))
    if not found:
        raise ModelNotFoundError(f"no .pt files in {str(folder)!r}; pass --model PATH.pt")
    return found


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        failed = False
        for w in _weights_list(opts):
            plan, _ = build_model(w, opts)
            if opts.validate and not validate(plan, w, opts):
                failed = True
        return 3 if failed else 0
    except MissingDependencyError as e:
        print(f"trtwsi.export.build: error: {e}", file=sys.stderr)
        return 1
    except TrtwsiError as e:
        print(f"trtwsi.export.build: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
