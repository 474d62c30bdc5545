"""Model settings and models.toml (trtwsi.engines.config): every value is checked for type and
range before any model loads, and the error names the file, the entry, the key, the value and
what is allowed. Values a checkpoint carries (its imgsz) get the same range check."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines.config import (
    CONFIG_KEYS,
    MAX_CONFIG_BYTES,
    RULES,
    check_imgsz,
    check_model_args,
)
from trtwsi.engines.model import Model, load_models_config
from trtwsi.errors import ModelConfigError, ModelError, ModelNotFoundError


@pytest.fixture(scope="module")
def v11(yolo_pt):
    return yolo_pt("yolo11n.yaml")


def write(tmp_path, text: str | bytes):
    cfg = tmp_path / "models.toml"
    (cfg.write_bytes if isinstance(text, bytes) else cfg.write_text)(text)
    return cfg


# --- models.toml: values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "seen", "allowed"),
    [
        ('fallback_to_pt = "no"', "'no' (str)", "a boolean: true or false"),
        ("fallback_to_pt = 0", "0 (int)", "a boolean"),
        ('trust_weights = "false"', "'false' (str)", "a boolean"),
        ("min_conf = true", "True (bool)", r"a number in \[0, 1\] \(not a boolean\)"),
        ("min_conf = 1.5", "1.5 (float)", r"a number in \[0, 1\]"),
        ("iou = nan", "nan (float)", r"a number in \[0, 1\]"),
        ('iou = "0.5"', "'0.5' (str)", r"a number in \[0, 1\]"),
        ("imgsz = 32000", "32000 (int)", r"an integer multiple of 32 in \[32, 4096\]"),
        ("imgsz = 100", "100 (int)", "multiple of 32"),
        ("imgsz = 640.0", "640.0 (float)", "an integer multiple of 32"),
        ("imgsz = 0", "0 (int)", r"\[32, 4096\]"),
        ("max_det = 0", "0 (int)", r"an integer in \[1, 10000\]"),
        ("max_det = 1000000", "1000000 (int)", r"\[1, 10000\]"),
        ("max_det = true", "True (bool)", r"\[1, 10000\]"),
        (
            'backend = "onnx"',
            "'onnx' (str)",
            r"one of \['auto', 'torch', 'tensorrt', 'onnxruntime', 'openvino'\]",
        ),
        ('head = "yolo"', "'yolo' (str)", r"one of \['nms', 'end2end'\]"),
        ('classes = "a,b"', "'a,b' (str)", "a non-empty list of class names"),
        ("classes = [1, 2]", "[1, 2] (list)", "a non-empty list of class names"),
        ('classes = {a = "x"}', "{'a': 'x'} (dict)", "a table of names by class id"),
        ('name = ""', "'' (str)", "a non-empty string"),
    ],
)
def test_bad_values_name_file_entry_key_value_and_range(tmp_path, line, seen, allowed):
    key = line.split(" = ")[0]
    name = "" if key == "name" else 'name = "m"\n'
    cfg = write(tmp_path, f'[[model]]\n{name}weights = "missing.pt"\n{line}\n')
    with pytest.raises(ModelConfigError) as e:  # raised before any weights are looked for
        load_models_config(cfg)
    msg = str(e.value)
    assert msg.startswith(f"models config {str(cfg)!r}, model #1")
    assert f": {key} = " in msg
    assert seen in msg and re.search(allowed, msg), msg


def test_unknown_keys_are_named_with_the_valid_ones(tmp_path):
    cfg = write(tmp_path, '[[model]]\nname = "m"\nweights = "w.pt"\nmin_confidence = 0.3\n')
    with pytest.raises(ModelConfigError, match=r"model #1 'm': unknown model config key\(s\) "
                       r"\['min_confidence'\]; valid keys: \['name', 'weights'"):  # fmt: skip
        load_models_config(cfg)


def test_not_utf8_is_a_typed_error_naming_the_file(tmp_path):
    cfg = write(tmp_path, b'[[model]]\nname = "caf\xe9"\nweights = "w.pt"\n')  # latin-1
    with pytest.raises(ModelConfigError, match=r"models\.toml' is not UTF-8 text \(byte 0xe9 at "
                       r"offset 21\).*save it with UTF-8"):  # fmt: skip
        load_models_config(cfg)


def test_utf8_byte_order_mark_is_accepted(tmp_path, v11):
    shutil.copy(v11, tmp_path / "w.pt")
    cfg = write(tmp_path, '\ufeff[[model]]\nname = "café"\nweights = "w.pt"\n'.encode())
    (m,) = load_models_config(cfg)
    assert m.name == "café"


@pytest.mark.parametrize(
    ("text", "dup", "entries"),
    [
        ('[[model]]\nname = "a"\nweights = "x.pt"\n[[model]]\nname = "a"\nweights = "y.pt"', "a", "#1 and model #2"),
        ('[[model]]\nweights = "x/m.pt"\n[[model]]\nname = "b"\nweights = "b.pt"\n[[model]]\nweights = "y/m.pt"', "m", "#1 and model #3"),
    ],
)  # fmt: skip
def test_duplicate_names_are_refused(tmp_path, text, dup, entries):
    with pytest.raises(ModelConfigError, match=rf"model {entries} are both named '{dup}'"):
        load_models_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[[models]]\nweights = 'w.pt'", r"has no \[\[model\]\] tables \(top-level keys: \['models'\]\)"),
        ("title = 'x'\n[[model]]\nweights = 'w.pt'", r"unknown top-level key\(s\) \['title'\]"),
        ("model = [1, 2]", r"model #1: a \[\[model\]\] entry must be a table, got 1"),
        ("model = 'w.pt'", r"no \[\[model\]\] tables"),
        ("[[model]]\nname = 'm'", "model #1 'm': no 'weights'"),
    ],
)  # fmt: skip
def test_bad_file_structure(tmp_path, text, match):
    with pytest.raises(ModelConfigError, match=match):
        load_models_config(write(tmp_path, text))


def test_oversized_file_is_refused_before_parsing(tmp_path):
    cfg = write(tmp_path, "# x\n" * (MAX_CONFIG_BYTES // 4 + 1))
    with pytest.raises(ModelConfigError, match=r"is \d+ bytes; a models TOML file is a few kB"):
        load_models_config(cfg)


def test_valid_file_loads_with_trust_per_entry_and_from_the_cli_flag(tmp_path, v11):
    shutil.copy(v11, tmp_path / "a.pt")
    shutil.copy(v11, tmp_path / "b.pt")
    cfg = write(
        tmp_path,
        '[[model]]\nweights = "a.pt"\nfallback_to_pt = false\nmax_det = 100\nimgsz = 320\n'
        '[[model]]\nweights = "b.pt"\ntrust_weights = true\nclasses = {0 = "x", 1 = "y", 2 = "z"}\n',
    )
    a, b = load_models_config(cfg)
    assert (a.name, a.fallback_to_pt, a.max_det, a.imgsz, a.trust_weights) == (
        "a",
        False,
        100,
        320,
        False,
    )
    assert (b.name, b.trust_weights, b.names) == ("b", True, ["x", "y", "z"])
    assert all(m.trust_weights for m in load_models_config(cfg, trust_weights=True))


def test_bundled_models_toml_loads_safely():
    models = load_models_config(bundled_models_dir() / "models.toml")
    assert [(m.name, m.head, m.trust_weights) for m in models] == [
        ("demo", "nms", False),
        ("demo-e2e", "end2end", False),
    ]


def test_errors_from_a_model_name_the_file_and_entry(tmp_path):
    cfg = write(tmp_path, '[[model]]\nname = "m1"\nweights = "missing.pt"\n')
    with pytest.raises(ModelNotFoundError, match=r"models\.toml', model #1 'm1': model weights"):
        load_models_config(cfg)


# --- Model arguments and checkpoint values -----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_conf": True}, r"min_conf = True \(bool\)"),
        ({"iou": float("nan")}, r"iou = nan"),
        ({"fallback_to_pt": "no"}, r"fallback_to_pt = 'no' \(str\)"),
        ({"trust_weights": "false"}, r"trust_weights = 'false' \(str\)"),
        ({"trust_weights": 1}, r"trust_weights = 1 \(int\)"),
        ({"max_det": 10**6}, r"max_det = 1000000 \(int\).*\[1, 10000\]"),
        ({"imgsz": 32000}, r"imgsz=32000 is outside the allowed \[32, 4096\]"),
        ({"imgsz": 4128}, r"imgsz=4128 is outside"),
    ],
)
def test_model_arguments(v11, kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        Model(v11, **kwargs)


@pytest.mark.parametrize("imgsz", [32000, [32000, 32000]])
def test_checkpoint_imgsz_out_of_range_is_refused_naming_the_file(tmp_path, v11, imgsz):
    ckpt = torch.load(v11, weights_only=False)  # made by this test suite
    ckpt["train_args"] = {"task": "detect", "imgsz": imgsz}
    path = tmp_path / "huge.pt"
    torch.save(ckpt, path)
    with pytest.raises(
        ModelConfigError,
        match=r"the checkpoint's imgsz \(in '.*huge\.pt'\)=32000 is outside the allowed "
        r"\[32, 4096\] px.*pass imgsz=",
    ):
        Model(path)
    assert Model(path, imgsz=640).imgsz == 640  # the fix the message names


def test_check_helpers():
    assert check_imgsz(4096, stride=64, where="x") == 4096
    with pytest.raises(
        ModelConfigError, match=r"x=96 is not a multiple of the model stride 64.*e\.g\. 128"
    ):
        check_imgsz(96, stride=64, where="x")  # fmt: skip
    with pytest.raises(ModelConfigError, match="positive int"):
        check_imgsz(True, stride=32, where="x")
    check_model_args({"min_conf": 0, "iou": 1, "max_det": 1, "head": "nms"}, "w")
    with pytest.raises(ModelConfigError, match=r"w: unknown model config key\(s\) \['nope'\]"):
        check_model_args({"nope": 1}, "w")
    assert set(RULES) == set(CONFIG_KEYS)
    assert issubclass(ModelConfigError, ModelError) and issubclass(ModelConfigError, ValueError)
