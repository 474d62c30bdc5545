"""The compiled forward kept on disk: AOTInductor packages, built once per model, GPU and torch.

``torch.compile`` pays its compile in every process (2–8 s warm, 13–21 s cold on an H100 for
the demo yolo11n). An AOTInductor package (``torch.export`` + ``aoti_compile_and_package``) is
the same Inductor code compiled ahead of time into a ``.pt2`` file holding a shared library,
its Triton kernels and the weights; loading it took 0.01-0.05 s on a 2-core CPU (a scratch probe,
not a bench; not measured on a GPU). :func:`obtain` loads the
package for a key from the cache, or builds it there first.

A package is native code: loading one runs it. So only packages this user built are loaded,
from a private folder (:func:`compiled_dir`: ``$XDG_CACHE_HOME/trtwsi/compiled``, mode 0700,
owned by this user, refused otherwise, as the Inductor cache is), and a file handed in by a
user is never loaded. The file name is a digest of everything the code depends on
(:func:`package_key`): the weights' SHA-256, head, input size, batch, dtype, memory layout,
torch, CUDA, the GPU's name and compute capability, trtwsi's version and this module's format
number. A package built for another GPU or torch is never looked up, so it cannot mismatch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trtwsi.errors import BackendError, PackageBuildError

if TYPE_CHECKING:
    from trtwsi.engines.model import Model

__all__ = [
    "compiled_dir",
    "first_output",
    "obtain",
    "package_key",
    "package_path",
    "private_dir",
    "user_cache",
]

#: bump when what goes into a package changes (the forward wrapper, the export options)
FORMAT = 1


def user_cache(name: str) -> Path:
    """``$XDG_CACHE_HOME/trtwsi/NAME`` (``~/.cache/trtwsi/NAME`` when it is unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trtwsi" / name


def _not_only_ours(st: os.stat_result) -> bool:
    """Another user owns it, or group/others may write it: code in it is not only ours."""
    return st.st_uid != os.getuid() or bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def private_dir(path: Path, what: str, env: str) -> Path:
    """``path``, made if missing (mode 0700), and checked to be this user's alone: another
    owner, or a group/other write bit, is a :class:`~trtwsi.errors.BackendError` naming
    ``what`` is kept there, the fix, and ``env`` (the variable that picks another folder)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if _not_only_ours(st):
        raise BackendError(
            f"the {what} {str(path)!r} is owned by uid {st.st_uid} or writable by others "
            f"(mode {stat.filemode(st.st_mode)}); compiled code from it would run here. Remove "
            f"it, or `chmod 700` it if it is yours, or set {env} to a private folder"
        )
    return path


def compiled_dir() -> Path:
    """The private folder of compiled packages: ``$TRTWSI_COMPILED_DIR`` when set (checked the
    same way), else ``$XDG_CACHE_HOME/trtwsi/compiled`` (``~/.cache/trtwsi/compiled``)."""
    given = os.environ.get("TRTWSI_COMPILED_DIR")
    path = Path(given) if given else user_cache("compiled")
    return private_dir(path, "compiled-model folder", "TRTWSI_COMPILED_DIR")


def package_key(
    model: Model, device: torch.device, dtype: torch.dtype, batch_size: int, channels_last: bool
) -> dict:
    """Everything a package's code depends on, as a JSON-able dict (its digest names the file)."""
    from trtwsi import __version__

    key = {
        "format": FORMAT,
        "trtwsi": __version__,
        "torch": torch.__version__,
        "weights_sha256": model.sha256,
        "head": model.head,
        "imgsz": model.imgsz,
        "max_det": model.max_det,
        "nc": model.nc,
        "batch": batch_size,
        "dtype": str(dtype).removeprefix("torch."),
        "channels_last": bool(channels_last),
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        key["gpu"] = props.name
        key["compute_capability"] = f"{props.major}.{props.minor}"
        key["cuda"] = torch.version.cuda
    return key


def package_path(model: Model, key: dict) -> Path:
    """Where the package for ``key`` lives: ``compiled_dir()/<model name>-<digest>.pt2``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name)[:64]
    return compiled_dir() / f"{safe}-{digest}.pt2"


def first_output(y):
    """An ultralytics module's result → its detections tensor (heads return ``(y, extras)``)."""
    return y[0] if isinstance(y, (tuple, list)) else y


class _FirstOutput(torch.nn.Module):
    """The ultralytics module's forward, its first output: ``(B, 3, S, S)`` → ``(B, 4+nc, N)``
    (``nms`` heads) or ``(B, K, 6)`` (``end2end``), in the module's dtype."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.module(x))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path.lock`` (two workers needing the same package: one
    builds it, the other waits and then loads it)."""
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _build(module: torch.nn.Module, example: torch.Tensor, path: Path, key: dict) -> None:
    """Export ``module`` on ``example`` (static shape, dtype and strides) and compile it into
    ``path`` (written under a temporary name, then renamed: never half a package), with the
    key beside it as ``path.json`` for people."""
    from trtwsi._util.atomic import write_text_atomic

    wrapper = _FirstOutput(module).eval()
    with torch.inference_mode(False), torch.no_grad():
        x = example.detach().clone()  # a normal tensor: export refuses inference tensors
        program = torch.export.export(wrapper, (x,), strict=False)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # AOTI wants .pt2
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    write_text_atomic(
        path.with_name(path.name + ".json"), json.dumps(key, indent=1), overwrite=True
    )


def _load(path: Path, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The package at ``path`` as a callable ``x → first output`` (checked: this user's file,
    not writable by others, in the private folder)."""
    st = path.stat()
    if _not_only_ours(st):
        raise BackendError(
            f"compiled package {str(path)!r} is not this user's alone (mode "
            f"{stat.filemode(st.st_mode)}, uid {st.st_uid}); it is not loaded. Remove it"
        )
    index = device.index if device.type == "cuda" and device.index is not None else -1
    # run_single_threaded: no locking around each run, which a CUDA graph capture would record
    runner = torch._inductor.aoti_load_package(
        str(path), run_single_threaded=True, device_index=index
    )

    return lambda x: first_output(runner(x))


#: seconds a package build may take (a cold build on an H100: tens of seconds)
BUILD_TIMEOUT = 1800


def _child_command(spec: dict) -> list[str]:
    # faulthandler: a crash prints its Python stack to stderr, which the error message quotes
    return [
        sys.executable,
        "-X",
        "faulthandler",
        "-m",
        "trtwsi.engines.compiled_build",
        json.dumps(spec),
    ]


def _build_in_child(model: Model, spec: dict, path: Path) -> None:
    """Run the build in a child process (:mod:`trtwsi.engines.compiled_build`): a compiler or loader that crashes
    (a segfault kills only the child), hangs or holds the GIL for a minute costs this process
    nothing, and the child checks the package against the eager forward before keeping it.

    Raises:
        PackageBuildError: the child exited non-zero or was killed (its output's tail, the
            signal's name).
    """
    try:
        r = subprocess.run(
            _child_command(spec), capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        raise PackageBuildError(
            f"building the compiled package of {model.name} took more than {BUILD_TIMEOUT} s"
        ) from e
    if r.returncode != 0 or not path.exists():
        how = (
            f"was killed by {signal.Signals(-r.returncode).name}"
            if r.returncode < 0
            else f"exited with {r.returncode}"
        )
        said = (r.stderr or r.stdout or "").strip()
        at = said.find("Fatal Python error")  # a crash: its innermost frames come first
        tail = said[at : at + 1500] if at >= 0 else said[-800:]
        raise PackageBuildError(
            f"the process building the compiled package of {model.name} {how}: {tail}"
        )


def obtain(
    model: Model, device: torch.device, dtype: torch.dtype, batch_size: int, channels_last: bool
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str, Path]:
    """The compiled forward of ``model`` for inputs ``(batch_size, 3, imgsz, imgsz)`` of
    ``dtype`` on ``device`` (channels_last memory when ``channels_last``), as
    :class:`~trtwsi.engines.torch.TorchEngine` prepares the module: loaded from the cache, or
    built there first by a child process (:func:`_build_in_child`).

    Returns:
        ``(forward, how, path)``: ``how`` is ``"loaded"`` or ``"built"``.

    Raises:
        BackendError: the cache folder or the package is not private.
        PackageBuildError: the build failed (the caller falls back); the package's loader
            may raise too (a package from another torch would have another key).
    """
    key = package_key(model, device, dtype, batch_size, channels_last)
    path = package_path(model, key)
    how = "loaded"
    if not path.exists():
        with _locked(path):
            if not path.exists():  # another process may have built it while we waited
                spec = {
                    "weights": str(model.weights),
                    "name": model.name,
                    "imgsz": model.imgsz,
                    "head": model.head,
                    "max_det": model.max_det,
                    "trust_weights": model.trust_weights,
                    "device": str(device),
                    "half": dtype == torch.float16,
                    "batch": batch_size,
                    "channels_last": channels_last,
                    "path": str(path),
                }
                _build_in_child(model, spec, path)
                how = "built"
    return _load(path, device), how, path
