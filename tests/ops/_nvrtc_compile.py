"""Compile one CUDA source with NVRTC to PTX; run as a child process by test_kernels_compile.

Reads ``{"source", "name", "options"}`` as JSON on stdin, writes ``{"ptx", "log"}`` as JSON on
stdout; on a compile error prints the NVRTC log and exits 1.
"""

import json
import sys

from cuda.bindings import nvrtc


def _ok(result, what: str):
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what}: {err}")
    return result[1:] if isinstance(result, tuple) else ()


def _log(prog) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00 ")


def main() -> int:
    job = json.load(sys.stdin)
    (prog,) = _ok(
        nvrtc.nvrtcCreateProgram(job["source"].encode(), job["name"].encode(), 0, [], []), "create"
    )
    try:
        opts = [o.encode() for o in job["options"]]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if (err[0] if isinstance(err, tuple) else err) != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            print(f"{err}\n{_log(prog)}")
            return 1
        log = _log(prog)
        (size,) = _ok(nvrtc.nvrtcGetPTXSize(prog), "PTX size")
        ptx = b" " * size
        _ok(nvrtc.nvrtcGetPTX(prog, ptx), "PTX")
        print(json.dumps({"ptx": ptx.decode().rstrip("\x00"), "log": log}))
        return 0
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


if __name__ == "__main__":
    sys.exit(main())
