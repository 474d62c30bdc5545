"""``.pt`` → ONNX → TensorRT engine + sidecar: ``python -m trtwsi.export.build`` (or
``trtwsi export …``). Modules: :mod:`~trtwsi.export.build` (the command),
:mod:`~trtwsi.export.onnx_export`, :mod:`~trtwsi.export.fp16`.

The repository's top-level ``export/`` folder is a shim that forwards here, so
``python -m export.build`` keeps working from a source checkout; the wheel installs only
``trtwsi``.
"""
