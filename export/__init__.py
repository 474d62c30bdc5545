"""Source-checkout shim: the exporter lives in :mod:`trtwsi.export`.

``python -m export.build`` and ``import export.build`` keep working from a checkout (each module
here is the same module object as its ``trtwsi.export`` counterpart). Not installed by the wheel
(a top-level ``export`` package would shadow, or be shadowed by, a user's ``export.py``); use
``python -m trtwsi.export.build`` or ``trtwsi export``.
"""
