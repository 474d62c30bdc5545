"""Shim: this is :mod:`trtwsi.export.fp16` (see export/__init__.py)."""

import sys

from trtwsi.export import fp16 as _module

sys.modules[__name__] = _module
