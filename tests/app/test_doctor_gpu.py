"""``trtwsi doctor`` on a GPU host (the module beside this one describes a machine without one)."""

from __future__ import annotations

import pytest

from trtwsi.app.cli import main


@pytest.mark.gpu
def test_doctor_reports_gpu_jpeg_decode(capsys):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "nvJPEG via torchvision" in out and "works" in out, out
    assert "torch.compile  Triton " in out, out  # torch's CUDA wheels bring Triton
    assert "later runs load (" in out and "package" in out, out
