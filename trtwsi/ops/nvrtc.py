"""Compile CUDA sources to PTX with NVRTC (``cuda.bindings.nvrtc``), no GPU needed.

Used by ``trtwsi doctor --check-kernels``, the wheel check (``.ci/check-wheel``) and
``tests/ops/test_kernels_compile.py``. NVRTC runs in a child process (:func:`compile_ptx`):
in-process, compiling these sources once left the process's torch unable to ``torch.load`` a
checkpoint afterwards (NVRTC 13.0, torch 2.14.1, CPU machine; cause not pinned down).

Child protocol (``python -m trtwsi.ops.nvrtc``): reads ``{"source", "name", "options"}`` as
JSON on stdin, writes ``{"ptx", "log"}`` as JSON on stdout; on a compile error prints the NVRTC
log and exits 1.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from trtwsi.errors import NvrtcError

__all__ = ["NvrtcError", "available", "compile_ptx"]


def available() -> bool:
    """Whether ``cuda.bindings.nvrtc`` (the ``cuda-bindings`` package) can be imported."""
    try:
        return importlib.util.find_spec("cuda.bindings.nvrtc") is not None
    except (ImportError, ValueError):
        return False


def compile_ptx(
    source: str, name: str, options: tuple[str, ...] | list[str], *, timeout: float = 300
) -> tuple[str, str]:
    """(PTX, compiler log) of ``source``, compiled by NVRTC in a child process.

    Raises:
        NvrtcError: the compile failed (NVRTC's log in the message) or NVRTC is not usable.
    """
    r = subprocess.run(
        [sys.executable, "-m", "trtwsi.ops.nvrtc"],
        input=json.dumps({"source": source, "name": name, "options": list(options)}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        raise NvrtcError(f"NVRTC compile of {name} failed:\n{r.stdout}\n{r.stderr}".rstrip())
    out = json.loads(r.stdout)
    return out["ptx"], out["log"]


def _ok(nvrtc, result, what: str):
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what}: {err}")
    return result[1:] if isinstance(result, tuple) else ()


def _log(nvrtc, prog) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00 ")


def main() -> int:
    from cuda.bindings import nvrtc

    job = json.load(sys.stdin)
    (prog,) = _ok(
        nvrtc,
        nvrtc.nvrtcCreateProgram(job["source"].encode(), job["name"].encode(), 0, [], []),
        "create",
    )
    try:
        opts = [o.encode() for o in job["options"]]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if (err[0] if isinstance(err, tuple) else err) != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            print(f"{err}\n{_log(nvrtc, prog)}")
            return 1
        log = _log(nvrtc, prog)
        (size,) = _ok(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "PTX size")
        ptx = b" " * size
        _ok(nvrtc, nvrtc.nvrtcGetPTX(prog, ptx), "PTX")
        print(json.dumps({"ptx": ptx.decode().rstrip("\x00"), "log": log}))
        return 0
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


if __name__ == "__main__":
    sys.exit(main())
