"""Files shipped inside the trtwsi package (wheel or checkout alike), found through one place.

* :func:`kernels_dir` / :func:`kernel_file_text` — the CUDA sources in ``trtwsi/ops/kernels/``
  (``*.cu`` kernel families and the ``common.cuh`` header they inline);
* :func:`bundled_models_dir` — the demo models in ``trtwsi/models/`` (``models.toml`` and the
  ``.pt`` files it names), or ``$TRTWSI_MODELS`` when set.

Read through :mod:`importlib.resources`, so a non-editable install (``pip install trtwsi-*.whl``)
finds the same files as a source checkout. The repository's top-level ``models/`` folder keeps
only the training script and logs.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = ["MODELS_ENV", "bundled_models_dir", "kernel_file_text", "kernels_dir"]

#: Environment variable naming another models folder (a ``models.toml`` and its ``.pt`` files).
MODELS_ENV = "TRTWSI_MODELS"


def _package() -> Traversable:
    return resources.files("trtwsi")


def kernels_dir() -> Traversable:
    """The folder of the CUDA kernel sources (``trtwsi/ops/kernels``)."""
    return _package().joinpath("ops", "kernels")


def kernel_file_text(name: str) -> str:
    """The text of one file of :func:`kernels_dir` (``"preprocess.cu"``, ``"common.cuh"``).

    Raises:
        FileNotFoundError: no such file (the package was installed without its kernels).
    """
    f = kernels_dir().joinpath(name)
    if not f.is_file():
        raise FileNotFoundError(f"CUDA kernel source {name!r} is missing from {kernels_dir()}")
    return f.read_text(encoding="utf-8")


def bundled_models_dir() -> Path:
    """The models folder: ``$TRTWSI_MODELS`` if set, else the demo models shipped in the package
    (``trtwsi/models``: ``models.toml``, ``demo-yolo11n.pt``, ``demo-yolo26n.pt``)."""
    env = os.environ.get(MODELS_ENV)
    if env:
        return Path(env)
    # Wheels install as plain files, so the package folder is a real directory.
    return Path(os.fspath(_package().joinpath("models")))
