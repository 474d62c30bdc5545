"""Shim: this is :mod:`trtwsi.export.onnx_export` (see export/__init__.py)."""

import sys

from trtwsi.export import onnx_export as _module

sys.modules[__name__] = _module
