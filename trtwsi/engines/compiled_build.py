"""The child process that builds a compiled package (:func:`trtwsi.engines.compiled.obtain`
starts it, so that a compiler or loader crash, hang or minute of held GIL costs the run nothing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trtwsi.engines.compiled import _build, _load, package_key, package_path
from trtwsi.engines.model import Model
from trtwsi.engines.torch import TorchEngine

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m trtwsi.engines.compiled_build SPEC_JSON`` (see :func:`obtain`).

    Loads the model as the parent did, prepares its module as a TorchEngine does, runs the
    eager forward on a fixed random batch, builds the package, loads it and compares its
    output with the eager one; a package whose output differs by more than fp16 rounding
    explains is deleted (exit 3). The key is recomputed here: weights changed on disk since
    the parent hashed them give another path (exit 4), and nothing is kept.
    """
    spec = json.loads((argv or sys.argv[1:])[0])
    path = Path(spec["path"])
    model = Model(
        spec["weights"],
        imgsz=spec["imgsz"],
        name=spec["name"],
        head=spec["head"],
        max_det=spec["max_det"],
        trust_weights=spec["trust_weights"],
    )
    eng = TorchEngine(
        model,
        spec["device"],
        half=spec["half"],
        batch_size=spec["batch"],
        cuda_graph=False,
        channels_last=spec["channels_last"],
    )
    key = package_key(model, eng.device, eng.dtype, spec["batch"], spec["channels_last"])
    if package_path(model, key) != path:
        print(f"the weights of {model.name} changed on disk during the run", file=sys.stderr)
        return 4
    g = torch.Generator().manual_seed(0)
    x = torch.rand((spec["batch"], 3, model.imgsz, model.imgsz), generator=g)
    x = x.to(eng.device, eng.dtype).contiguous(memory_format=eng._layout)
    with torch.inference_mode():
        want = eng._eager(x).float()
    _build(eng.module, x, path, key)
    with torch.inference_mode():
        got = _load(path, eng.device)(x).float()
    # fp16 kernels that sum in another order: box px and scores move by rounding, not more
    tol = (0.05 if spec["half"] else 1e-3) * max(float(want.abs().max()), 1.0)
    err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if err > tol:
        path.unlink(missing_ok=True)
        print(
            f"the compiled package of {model.name} gave outputs up to {err:.4g} off the eager "
            f"forward's (tolerance {tol:.4g}); not kept",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
