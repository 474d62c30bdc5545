"""Mixed-precision FP16 ONNX for strongly typed TensorRT builds, and its numerics check.

TensorRT 11 and TensorRT-RTX build only strongly typed networks (no ``BuilderFlag.FP16``): the
precision of every tensor comes from the ONNX. :func:`convert_fp16` makes that graph with
onnxconverter-common's ``convert_float_to_float16``:

* the backbone, neck and the head's conv branches in float16;
* the input ``images`` and the output ``output0`` stay float32 (one Cast after the input);
* the box-decode tail stays float32: every node of the Detect head outside its conv branches
  (DFL softmax, anchor arithmetic, sigmoid, concatenation, the end-to-end top-k), because box
  corners near 640 px have a float16 step of 0.5 px and class ids must stay exact.

:func:`check_numerics` runs the converted ONNX with onnxruntime on the CPU and compares its
detections with the ``.pt``'s (see :mod:`trtwsi.app.compare`) before any engine is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from trtwsi.errors import require

if TYPE_CHECKING:
    import numpy as np

    from trtwsi.app.compare import Agreement
    from trtwsi.engines.model import Model

__all__ = ["HEAD_BRANCHES", "check_numerics", "convert_fp16", "decode_tail_nodes"]

#: Conv branches of the Detect head that run in float16 (everything else of the head is the tail).
HEAD_BRANCHES = ("cv2", "cv3", "one2one_cv2", "one2one_cv3")


def decode_tail_nodes(proto, prefix: str) -> list[str]:
    """Names of the nodes under the Detect head ``prefix`` that are not in its conv branches."""
    out = []
    for node in proto.graph.node:
        if not node.name.startswith(prefix):
            continue
        first = node.name[len(prefix) :].split("/", 1)[0]
        if first.split(".")[0] not in HEAD_BRANCHES:
            out.append(node.name)
    return out


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike, prefix: str) -> Path:
    """Convert the float32 ONNX ``src`` into the mixed FP16 graph described above at ``dst``.

    ``prefix``: the Detect head's node-name prefix (:func:`trtwsi.engines.onnx_export.detect_prefix`).

    Raises:
        MissingDependencyError: onnx / onnxconverter-common missing (``trtwsi[export]``).
        ValueError: the graph is not the one :func:`trtwsi.engines.onnx_export.export_onnx` writes.
    """
    onnx = require("onnx", "export", "FP16 ONNX conversion")
    float16 = require("onnxconverter_common.float16", "export", "FP16 ONNX conversion")
    from onnx import TensorProto, helper

    proto = onnx.load(str(src))
    tail = decode_tail_nodes(proto, prefix)
    if not tail:
        raise ValueError(
            f"no Detect-head nodes under {prefix!r} in {src}; not an export_onnx graph"
        )
    # keep_io_types=True trips onnxconverter-common 1.16 ("The downstream node of the second cast
    # node should be graph output") when a blocked node feeds the output, so convert with float16
    # I/O and restore float32 I/O here.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated" notes
        half = float16.convert_float_to_float16(proto, keep_io_types=False, node_block_list=tail)
    g = half.graph
    # the converter leaves stale float32 value_info behind Casts it inserts (ORT then rejects
    # the graph): drop it all, it is optional and re-inferred by every consumer
    del g.value_info[:]
    if len(g.input) != 1 or len(g.output) != 1:
        raise ValueError(
            f"expected one input and one output, got {len(g.input)} and {len(g.output)}"
        )
    # input: float32 graph input → Cast → the float16 tensor the first conv reads
    inp = g.input[0]
    cast_out = inp.name + "_fp16"
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == inp.name:
                node.input[i] = cast_out
    inp.type.tensor_type.elem_type = TensorProto.FLOAT
    g.node.insert(
        0,
        helper.make_node(
            "Cast", [inp.name], [cast_out], to=TensorProto.FLOAT16, name="images_to_fp16"
        ),
    )
    # output: the tail is float32 and the converter appended Cast(to float16): drop that Cast
    out = g.output[0]
    producer = next(n for n in g.node if out.name in n.output)
    if producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT16:
        upstream = producer.input[0]
        g.node.remove(producer)
        for node in g.node:
            for i, name in enumerate(node.output):
                if name == upstream:
                    node.output[i] = out.name
            for i, name in enumerate(node.input):
                if name == upstream:
                    node.input[i] = out.name
    out.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(half)
    onnx.save(half, str(dst))
    return Path(dst)


def run_onnx(path: str | os.PathLike, x: np.ndarray) -> np.ndarray:
    """Run an exported ONNX with onnxruntime on the CPU: ``(B, 3, S, S)`` float32 → output0."""
    ort = require("onnxruntime", "export", "Checking an ONNX export")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def check_numerics(
    onnx_path: str | os.PathLike, model: Model, tiles: np.ndarray, **thresholds
) -> Agreement:
    """Detections of ``onnx_path`` (onnxruntime, CPU) vs the ``.pt`` (torch, CPU, float32).

    Args:
        tiles: ``(B, 3, S, S)`` float32 model inputs in [0, 1] (:func:`trtwsi.app.compare.sample_tiles`).
        thresholds: :func:`trtwsi.app.compare.agreement` thresholds.

    Returns:
        the :class:`~trtwsi.app.compare.Agreement` (``.passed`` says whether it met the thresholds).
    """
    import torch

    from trtwsi.app.compare import agreement, raw_to_detections

    with torch.inference_mode():
        ref = model.module(torch.from_numpy(tiles))[0]
    got = torch.from_numpy(run_onnx(onnx_path, tiles))
    return agreement(raw_to_detections(ref, model), raw_to_detections(got, model), **thresholds)
