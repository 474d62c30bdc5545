"""Shim: ``python -m export.build`` runs :mod:`trtwsi.export.build`; ``import export.build``
is that module (see export/__init__.py)."""

import sys

from trtwsi.export import build as _module

if __name__ == "__main__":
    raise SystemExit(_module.main())
sys.modules[__name__] = _module
