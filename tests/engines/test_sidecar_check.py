"""Engine sidecars read as data (trtwsi.engines.sidecar_check): strict bounded JSON, every field
type- and range-checked, typed errors naming the file, the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from trtwsi.engines import sidecar
from trtwsi.engines.sidecar import EngineMeta
from trtwsi.engines.sidecar_check import (
    MAX_SIDECAR_BYTES,
    SIDECAR_FIELDS,
    check_sidecar,
    load_sidecar_json,
)
from trtwsi.errors import EngineMismatchError


def good() -> dict:
    meta = EngineMeta(
        weights="demo-yolo11n.pt",
        weights_sha256="ab" * 32,
        names=["nucleus", "metaphase"],
        imgsz=640,
        stride=32,
        head="nms",
        max_det=300,
        precision="fp16",
        batch_min=1,
        batch_opt=8,
        batch_max=32,
        flavour="tensorrt_rtx",
        trt_version="1.7.1.116",
        compute_capabilities=["8.6", "8.9"],
        output_shape=[-1, 6, 8400],
        built_at="2026-01-01T00:00:00",
        build_seconds=12.5,
        fp16_check={"tiles": 8},
    )
    return json.loads(meta.to_json())


def test_a_written_sidecar_passes_and_every_field_has_a_rule():
    check_sidecar(good())
    assert set(SIDECAR_FIELDS) == {f.name for f in dataclasses.fields(EngineMeta)}


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("batch_min", "x", "an integer in [1, 4096]"),
        ("batch_max", 10**9, "an integer in [1, 4096]"),
        ("batch_opt", 8.0, "an integer in [1, 4096]"),
        ("batch_min", True, "an integer in [1, 4096]"),
        ("imgsz", 1e9, "an integer in [32, 4096]"),
        ("imgsz", 32000, "an integer in [32, 4096]"),
        ("max_det", -1, "an integer in [1, 10000]"),
        ("names", "nucleus", "a list of class-name strings"),
        ("names", [1, 2], "a list of class-name strings"),
        ("head", "yolo", "one of ['nms', 'end2end']"),
        ("precision", "int4", "'fp16' or 'fp32'"),
        ("weights_sha256", "../../etc/passwd", "a SHA-256 hex digest"),
        ("compute_capabilities", "8.6", 'a list of compute capabilities like "8.6"'),
        ("compute_capabilities", ["sm86"], 'a list of compute capabilities like "8.6"'),
        ("output_shape", [1] * 9, "a list of at most 8 integers"),
        ("gpu_name", {"a": 1}, "a string or null"),
        ("fp16_check", [], "an object or null"),
        ("build_seconds", "fast", "a number of seconds or null"),
    ],
)
def test_bad_field(key, value, allowed):
    data = {**good(), key: value}
    with pytest.raises(EngineMismatchError) as e:
        check_sidecar(data, source="sidecar 'x.engine.json'")
    msg = str(e.value)
    assert msg.startswith("sidecar 'x.engine.json': ") and f"{key} = " in msg
    assert allowed in msg and "python -m trtwsi.export.build" in msg


def test_batch_order():
    with pytest.raises(EngineMismatchError, match=r"batch range \[8, 4, 32\] is not batch_min"):
        check_sidecar({**good(), "batch_min": 8, "batch_opt": 4})


@pytest.mark.parametrize("data", [[1, 2], "text", 3, None])
def test_not_an_object(data):
    with pytest.raises(EngineMismatchError, match="expected a JSON object"):
        check_sidecar(data)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"imgsz": NaN}', "NaN is not a JSON number"),
        ('{"build_seconds": Infinity}', "Infinity is not a JSON number"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("{not json", "is not readable JSON"),
        (b"\xff\xfe{", "is not readable JSON"),
    ],
    ids=["NaN", "Infinity", "deep nesting", "syntax", "not UTF-8"],
)
def test_load_sidecar_json_refuses(tmp_path, text, match):
    path = tmp_path / "e.engine.json"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    with pytest.raises(EngineMismatchError, match=match):
        load_sidecar_json(path)


def test_load_sidecar_json_size_limit(tmp_path):
    path = tmp_path / "e.engine.json"
    path.write_text(json.dumps({"pad": "x" * MAX_SIDECAR_BYTES}))
    with pytest.raises(EngineMismatchError, match="over the 1048576-byte limit"):
        load_sidecar_json(path)
    path.write_text(json.dumps(good()))
    assert load_sidecar_json(path) == good()


@pytest.mark.parametrize(
    "text",
    [json.dumps({**good(), "batch_min": "x"}), json.dumps({**good(), "batch_max": 10**9}), "[" * 100_000],
    ids=["batch_min str", "batch_max 1e9", "deep nesting"],
)  # fmt: skip
def test_read_sidecar_uses_the_checks(tmp_path, text):
    engine = tmp_path / "m.640.nms.b1-32.fp16.trtrtx-1.7.1.116.sm86.engine"
    sidecar.sidecar_path(engine).write_text(text)
    with pytest.raises(EngineMismatchError):
        sidecar.read_sidecar(engine)
