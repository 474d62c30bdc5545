"""``trtwsi doctor``: what this machine can run, what does not fit, and how to fix it.

Reports GPU, driver, CUDA runtime, torch, CuPy, TensorRT / TensorRT-RTX versions and whether
they fit together; whether the CUDA kernel sources and the models it points to are there (and,
with ``--check-kernels``, whether the kernels compile with NVRTC); every engine in the models
folder with "usable here" or why not; the pip commands that install what is missing. Works with no
GPU, no CuPy and no TensorRT (each probe is guarded; a failing probe is reported, never raised).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

__all__ = ["Report", "collect", "format_report"]

PIP = {
    "torch-cuda": "pip install torch torchvision --index-url https://download.pytorch.org/whl/cu130",
    "cupy": "pip install 'trtwsi[gpu]'   (cupy-cuda13x, cuda-python)",
    "tensorrt_rtx": "pip install 'trtwsi[tensorrt-rtx]'   "
    "(= pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings, from PyPI)",
    "tensorrt": "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu13   "
    "(full TensorRT from NVIDIA's package index; tensorrt-cu12 for CUDA 12 drivers/torch)",
    "export": "pip install 'trtwsi[export]'   (onnx, onnxruntime, onnxconverter-common, onnxslim)",
}


@dataclasses.dataclass
class Report:
    """Everything ``doctor`` found. ``items``: (label, value) rows; ``problems`` and ``fixes``:
    sentences; ``engines``: (path, "usable here" or the reason)."""

    items: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    fixes: list[str] = dataclasses.field(default_factory=list)
    engines: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.items.append((label, value))

    def fix(self, text: str) -> None:
        if text not in self.fixes:
            self.fixes.append(text)


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None


def _driver() -> tuple[str | None, str | None]:
    """(driver version, max CUDA version the driver supports) via NVML, else (None, None)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            drv = pynvml.nvmlSystemGetDriverVersion()
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        finally:
            pynvml.nvmlShutdown()
        drv = drv.decode() if isinstance(drv, bytes) else str(drv)
        return drv, f"{cuda // 1000}.{(cuda % 1000) // 10}"
    except Exception:
        return None, None


def _check_kernel_files(r: Report) -> bool:
    """The "kernels" row: every kernel source trtwsi.ops.cuda compiles is in the package."""
    from trtwsi._util.resources import kernels_dir
    from trtwsi.ops.cuda import KERNEL_FAMILIES

    folder = kernels_dir()
    names = [src for src, _ in KERNEL_FAMILIES.values()] + ["common.cuh"]
    missing = [n for n in names if not folder.joinpath(n).is_file()]
    if missing:
        r.add("kernels", f"{folder}: missing {', '.join(missing)}")
        r.problems.append(
            f"CUDA kernel sources {missing} are missing from {folder}: the GPU pipeline cannot "
            "run; reinstall trtwsi"
        )
        return False
    r.add("kernels", f"{folder} ({', '.join(names)})")
    return True


def _packages(r: Report) -> str:
    """Where compiled-model packages are kept and how many there are; a folder that cannot
    hold them is one of ``r``'s problems."""
    from trtwsi.engines.compiled import compiled_dir
    from trtwsi.errors import BackendError

    try:
        folder = compiled_dir()
    except (BackendError, OSError) as e:
        r.problems.append(f"--compile cannot keep its packages: {e}")
        return "no folder for them"
    n = len(list(folder.glob("*.pt2")))
    return f"{n} package{'s' if n != 1 else ''} in {folder}"


def _compile_kernels(r: Report, cc: str | None) -> None:
    """``--check-kernels``: compile every kernel family as trtwsi.ops.cuda does, with NVRTC
    (cuda-bindings, in a child process; no GPU needed), else with CuPy on the GPU."""
    from trtwsi.ops import nvrtc
    from trtwsi.ops.cuda import KERNEL_FAMILIES, NVRTC_OPTIONS, kernel_source

    families = sorted(KERNEL_FAMILIES)
    try:
        if nvrtc.available():
            arch = f"compute_{cc.replace('.', '')}" if cc else "compute_75"
            options = (*NVRTC_OPTIONS, "-std=c++17", f"--gpu-architecture={arch}")
            for fam in families:
                nvrtc.compile_ptx(kernel_source(fam), KERNEL_FAMILIES[fam][0], options)
            r.add("kernel compile", f"{', '.join(families)} compiled (NVRTC, {arch})")
        elif _version("cupy") is not None and cc:
            import cupy

            for fam in families:
                cupy.RawModule(code=kernel_source(fam), options=NVRTC_OPTIONS).compile()
            r.add("kernel compile", f"{', '.join(families)} compiled (CuPy, sm {cc})")
        else:
            r.add(
                "kernel compile",
                "skipped: needs cuda-bindings (NVRTC) or CuPy with a GPU "
                "(pip install 'trtwsi[gpu]')",
            )
    except Exception as e:
        r.add("kernel compile", f"FAILED: {type(e).__name__}")
        r.problems.append(f"the CUDA kernels do not compile here: {e}")


#: Packages every worker process imports at start, whose bytecode the bytecode row checks.
BYTECODE_PACKAGES = ("torch", "ultralytics", "cupy", "trtwsi")


def _check_bytecode(r: Report, packages=BYTECODE_PACKAGES) -> None:
    """The "bytecode" row: packages a worker imports that have no compiled bytecode next to
    (or, with ``sys.pycache_prefix``, for) their ``__init__.py`` and will not get any: Python
    may not write it (``PYTHONDONTWRITEBYTECODE`` / ``-B``) or cannot (a read-only folder).
    Then every process compiles them from source at import: on a GPU host whose image was
    built that way a fresh ``import torch`` took 7.1 s instead of 1.2–1.4 s, paid by every
    batch worker's start. Imports nothing it checks (``find_spec`` only)."""
    import importlib.util
    import sys

    uncompiled = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        pyc = Path(importlib.util.cache_from_source(spec.origin))
        if pyc.is_file():
            continue
        folder = Path(spec.origin).parent
        cache_dir = pyc.parent if pyc.parent.exists() else folder
        if sys.dont_write_bytecode or not os.access(cache_dir, os.W_OK):
            uncompiled.append((name, folder))
    if not uncompiled:
        r.add("bytecode", "compiled, or written on first import")
        return
    names = ", ".join(n for n, _ in uncompiled)
    why = (
        "PYTHONDONTWRITEBYTECODE / -B is set"
        if sys.dont_write_bytecode
        else "their folders are read-only"
    )
    r.add("bytecode", f"missing for {names}, and {why}: every process compiles them")
    have = "has" if len(uncompiled) == 1 else "have"
    r.problems.append(
        f"{names} {have} no compiled bytecode and Python will not write it ({why}): every "
        "process, every batch worker included, compiles them from source at import (up to "
        "seconds per start: `import torch` took 7.1 s instead of 1.2-1.4 s on a GPU host "
        "whose image had no bytecode, trtwsi's runtime modules 0.08 s instead of 0.02 s)"
    )
    r.fix("python -m compileall -q " + " ".join(str(f) for _, f in uncompiled))


def _check_models(r: Report, models_dir: Path, *, default: bool) -> None:
    """The "models" row: the folder, its models.toml and every weights file that names."""
    from trtwsi.engines.config import read_toml

    if not models_dir.is_dir():
        r.add("models", f"{models_dir}: no such folder")
        r.problems.append(f"the models folder {models_dir} does not exist")
        return
    cfg = models_dir / "models.toml"
    pts = sorted(p.name for p in models_dir.glob("*.pt"))
    if not cfg.is_file():
        r.add("models", f"{models_dir} ({len(pts)} .pt, no models.toml)")
        if default:
            r.problems.append(
                f"{cfg} is missing: `trtwsi demo` and `trtwsi predict` without --model cannot "
                "run; reinstall trtwsi or fix TRTWSI_MODELS"
            )
        return
    try:
        entries = read_toml(cfg).get("model", [])
        weights = [str(e.get("weights", "")) for e in entries if isinstance(e, dict)]
    except Exception as e:
        r.add("models", f"{models_dir} (models.toml unreadable: {type(e).__name__})")
        r.problems.append(f"{cfg} cannot be read: {e}")
        return
    missing = [w for w in weights if not (models_dir / w).expanduser().is_file()]
    if missing:
        r.add("models", f"{models_dir} (models.toml names missing weights: {', '.join(missing)})")
        r.problems.append(f"{cfg} names weights that are not there: {', '.join(missing)}")
    else:
        r.add("models", f"{models_dir} (models.toml: {', '.join(weights)}, all present)")


def collect(models_dir: str | os.PathLike | None = None, *, check_kernels: bool = False) -> Report:
    """Probe the machine, the kernel sources and models trtwsi uses, and the engines in
    ``models_dir`` (default: the bundled models). ``check_kernels``: also compile the kernels."""
    from trtwsi.engines.sidecar import FLAVOURS, check_fit, find_engines
    from trtwsi.engines.tensorrt import (
        RTX_COMPUTE_CAPABILITIES,
        TrtModule,
        available_modules,
        cuda_device_info,
        runtime_info,
    )

    r = Report()
    # --- torch, GPU, driver ---
    torch_v = _version("torch")
    torch_cuda = None
    if torch_v is None:
        r.add("torch", "not installed")
        r.problems.append("torch is not installed: nothing can run (pip install 'trtwsi[torch]')")
        r.fix("pip install 'trtwsi[torch]'")
    else:
        import torch

        torch_cuda = torch.version.cuda
        r.add("torch", f"{torch_v} (CUDA runtime {torch_cuda or 'none: a CPU build'})")
    cc, gpu = cuda_device_info()
    drv, drv_cuda = _driver()
    r.add("GPU", f"{gpu} (compute capability {cc})" if gpu else "none visible to torch")
    r.add("NVIDIA driver", f"{drv} (supports CUDA ≤ {drv_cuda})" if drv else "not found (no NVML)")
    if gpu is None:
        if drv:
            r.problems.append(
                "the driver is there but torch sees no GPU"
                + (" (torch is a CPU build)" if torch_v and not torch_cuda else "")
            )
            r.fix(PIP["torch-cuda"])
        else:
            r.problems.append("no NVIDIA GPU/driver: trtwsi runs on the CPU (torch backend)")
    if torch_cuda and drv_cuda and _ver(torch_cuda)[:1] > _ver(drv_cuda)[:1]:
        r.problems.append(
            f"torch was built for CUDA {torch_cuda} but the driver supports only CUDA {drv_cuda}: "
            "update the driver or install a torch build for an older CUDA"
        )
    # --- CuPy ---
    cupy_v = _version("cupy")
    if cupy_v is None:
        r.add("CuPy", "not installed (the GPU tile pipeline needs it)")
        if gpu:
            r.fix(PIP["cupy"])
    else:
        try:
            import cupy

            rt = cupy.cuda.runtime.runtimeGetVersion()
            r.add("CuPy", f"{cupy_v} (CUDA runtime {rt // 1000}.{(rt % 1000) // 10})")
        except Exception as e:
            r.add("CuPy", f"{cupy_v} (CUDA runtime not usable: {type(e).__name__}: {e})")
    # --- JPEG decode on the GPU (torchvision's nvJPEG) ---
    tv = _version("torchvision")
    if tv is None:
        r.add("JPEG on GPU", "off: torchvision is not installed (pip install 'trtwsi[torch]')")
    elif not gpu:
        r.add("JPEG on GPU", f"off: no GPU (torchvision {tv})")
    else:
        from trtwsi.read.jpeg_batch import jpeg_batch_unavailable

        why = jpeg_batch_unavailable("cuda")
        r.add(
            "JPEG on GPU",
            f"nvJPEG via torchvision {tv}: works (JPEG tiles are split between it and the CPU "
            "readers while CPU decode is behind)"
            if why is None
            else f"off: {why}",
        )
    # --- torch.compile (--compile): Triton kernels, on a GPU ---
    triton_v = _version("triton")
    if not gpu:
        r.add("torch.compile", "off: no GPU (--compile compiles for a CUDA GPU)")
    elif triton_v is None:
        r.add("torch.compile", "off: Triton is not installed (it comes with torch's CUDA wheels)")
    else:
        r.add(
            "torch.compile",
            f"Triton {triton_v}: --compile runs the model about 1.9x faster after a compile "
            "in each run (seconds with a warm cache); TRTWSI_COMPILE_PACKAGE=1 (experimental: "
            "loading one crashed most runs on an H100 with torch 2.11) keeps it as a package "
            f"that later runs load ({_packages(r)})",
        )
    # --- TRTWSI_* settings from the environment ---
    from trtwsi._util.env import env_report

    for name, value, problem in env_report():
        r.add(name, f"{value!r}" + (" (not valid)" if problem else " (from the environment)"))
        if problem:
            r.problems.append(problem)
            r.fix(f"unset {name}   (or set it to a value it takes)")
    # --- TensorRT flavours ---
    mods = available_modules()
    for flavour, mod in mods.items():
        label = FLAVOURS[flavour]
        if isinstance(mod, TrtModule):
            note = ""
            if flavour == "tensorrt_rtx" and cc and cc not in RTX_COMPUTE_CAPABILITIES:
                note = (
                    f"; cannot run engines on this GPU (compute capability {cc}; TensorRT-RTX "
                    f"runs on {', '.join(RTX_COMPUTE_CAPABILITIES)}), builds for those GPUs only"
                )
                r.fix(PIP["tensorrt"] + "  — to run engines on this GPU")
            r.add(label, f"{mod.version} (module {mod.trt.__name__}){note}")
        else:
            r.add(label, f"not importable ({mod})")
    if not any(isinstance(m, TrtModule) for m in mods.values()):
        r.problems.append("no TensorRT flavour is installed: models run with PyTorch")
        if cc and cc in RTX_COMPUTE_CAPABILITIES:
            r.fix(PIP["tensorrt_rtx"])
        r.fix(PIP["tensorrt"])
        if not cc:
            r.fix(PIP["tensorrt_rtx"] + "  — enough to build engines for RTX GPUs on a CPU")
    for m in ("onnx", "onnxruntime", "onnxconverter_common"):
        if _version(m) is None:
            r.add("export", f"{m} missing: python -m trtwsi.export.build will not run")
            r.fix(PIP["export"])
            break
    else:
        r.add("export", "onnx, onnxruntime, onnxconverter-common installed")
    ort_v = _version("onnxruntime")
    r.add(
        "ONNX Runtime",
        f"{ort_v}: backend='onnxruntime' can run models on the CPU"
        if ort_v is not None and _version("onnx") is not None
        else "not installed: backend='onnxruntime' (faster CPU tiles) needs "
        "pip install 'trtwsi[onnxruntime]'",
    )
    ov_v = _version("openvino")
    r.add(
        "OpenVINO",
        f"{ov_v}: models run on the CPU with it (backend='auto' or 'openvino'; "
        "backend='torch' opts out)"
        if ov_v is not None and _version("onnx") is not None
        else "not installed: the CPU runs models with PyTorch; pip install 'trtwsi[openvino]' "
        "for faster CPU tiles",
    )
    _check_bytecode(r)
    # --- kernel sources, models ---
    if _check_kernel_files(r) and check_kernels:
        _compile_kernels(r, cc)
    elif check_kernels:
        r.add("kernel compile", "skipped: kernel sources missing")
    default = models_dir is None
    if models_dir is None:
        from trtwsi._util.resources import bundled_models_dir

        models_dir = bundled_models_dir()
    models_dir = Path(models_dir)
    _check_models(r, models_dir, default=default)
    # --- engines ---
    for pt in sorted(models_dir.glob("*.pt")):
        engines = find_engines(pt)
        if not engines:
            r.engines.append(
                (pt.name, f"no engine (python -m trtwsi.export.build --fp16 --model {pt})")
            )
        sha = None
        for path, meta in engines:
            if isinstance(meta, Exception):
                r.engines.append((path.name, f"unusable: {meta}"))
                continue
            if sha is None:
                from trtwsi.engines.model import Model

                try:
                    sha = Model.file_sha256(pt)
                except OSError:
                    sha = ""
            why = check_fit(meta, runtime_info("cuda", meta.flavour), weights_sha256=sha or None)
            r.engines.append((path.name, "usable here" if why is None else f"not usable: {why}"))
    return r


def _ver(v: str) -> tuple[int, ...]:
    out = []
    for part in str(v).split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def format_report(r: Report) -> str:
    width = max((len(k) for k, _ in r.items), default=8) + 2
    lines = [f"{k:<{width}}{v}" for k, v in r.items]
    lines.append("")
    lines.append("engines:" if r.engines else "engines: none found")
    lines += [f"  {name}: {status}" for name, status in r.engines]
    if r.problems:
        lines.append("")
        lines.append("problems:")
        lines += [f"  - {p}" for p in r.problems]
    if r.fixes:
        lines.append("")
        lines.append("to install what is missing:")
        lines += [f"  {f}" for f in r.fixes]
    return "\n".join(lines)
