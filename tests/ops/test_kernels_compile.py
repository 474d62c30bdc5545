"""Every CUDA kernel family compiles with NVRTC (no GPU needed: NVRTC emits PTX on the CPU).

Compiles exactly the source trtwsi.ops.cuda hands to ``cupy.RawModule`` (``kernel_source``),
with its options plus the ones CuPy adds, for Hopper (compute_90, the GPU test machine) and
Turing (compute_75, the oldest architecture CUDA 13 and TensorRT-RTX support), and checks that
every kernel the wrappers launch is in the PTX. Skipped when ``cuda.bindings.nvrtc`` (the
``cuda-bindings`` package) is not importable.
"""

from __future__ import annotations

import re

import pytest

from trtwsi.ops import cuda, nvrtc

pytest.importorskip(
    "cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) is not installed; cannot compile kernels"
)

#: What cupy.RawModule adds to the options for NVRTC (CuPy 13-15): -ftz=true, the default
#: execution space and the C++ standard; the -arch option is added per test.
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space", "-std=c++17")


def compile_ptx(source: str, name: str, options: tuple[str, ...]) -> tuple[str, str]:
    """(PTX, compiler log) of ``source`` (NVRTC in a child process, see trtwsi.ops.nvrtc);
    fails the test with the NVRTC log on error."""
    try:
        return nvrtc.compile_ptx(source, name, options)
    except nvrtc.NvrtcError as e:
        pytest.fail(str(e))


@pytest.mark.parametrize("arch", ["compute_90", "compute_75"])
@pytest.mark.parametrize("family", sorted(cuda.KERNEL_FAMILIES))
def test_kernel_family_compiles(family, arch):
    source = cuda.kernel_source(family)
    assert not re.search(r"^\s*#\s*include", source, re.MULTILINE)  # self-contained
    options = (*cuda.NVRTC_OPTIONS, *CUPY_OPTIONS, f"--gpu-architecture={arch}")
    ptx, log = compile_ptx(source, cuda.KERNEL_FAMILIES[family][0], options)
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert entries == set(cuda.KERNEL_FAMILIES[family][1]), entries
    # No warning is tolerated: a warning in a kernel is a bug until proven otherwise.
    assert "warning" not in log.lower(), log


def test_exact_fp32_ops_survive_fast_flags():
    """-ftz=true (added by CuPy) must not reach the inline-PTX fp32 ops the kernels rely on."""
    ptx, _ = compile_ptx(
        cuda.kernel_source("postprocess"),
        "postprocess.cu",
        (*cuda.NVRTC_OPTIONS, *CUPY_OPTIONS, "--gpu-architecture=compute_90"),
    )
    assert "div.rn.f32" in ptx and "setp.gt.f32" in ptx
    assert not re.search(r"\b(add|sub|mul|div)\.rn\.ftz\.f32\b", ptx)
    assert "fma.rn.f32" not in ptx
