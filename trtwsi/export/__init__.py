"""``.pt`` → ONNX → TensorRT engine + sidecar: ``python -m trtwsi.export.build`` (or
``trtwsi export …``). Modules: :mod:`~trtwsi.export.build` (the command),
:mod:`~trtwsi.export.fp16`; the ONNX export itself is :mod:`trtwsi.engines.onnx_export`
(the ONNX Runtime CPU engine uses it too).

The repository's top-level ``export/`` folder is a shim that forwards here, so
``python -m export.build`` keeps working from a source checkout; the wheel installs only
``trtwsi``.
"""
