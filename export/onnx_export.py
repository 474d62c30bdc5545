"""Shim: this is :mod:`trtwsi.engines.onnx_export` (see export/__init__.py)."""

import sys

from trtwsi.engines import onnx_export as _module

sys.modules[__name__] = _module
