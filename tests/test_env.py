"""TRTWSI_* settings from the environment (trtwsi/_util/env.py): a bad export is a UsageError
naming the variable, its value and what it takes, raised before a Runtime loads any model."""

from __future__ import annotations

import pytest

from trtwsi._util.env import SETTINGS, env_report, env_setting
from trtwsi.errors import UsageError


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("TRTWSI_TISSUE", "gpu", "GPU"),
        ("TRTWSI_DECODE", "cpu", "nvjpeg"),
        ("TRTWSI_SEAM_MERGE", "process", "processes"),
        ("TRTWSI_LAUNCH_GRAPHS", "0", "off"),
        ("TRTWSI_READ_STRIPS", "4", "0"),
        ("TRTWSI_READ_STRIPS", "adaptive", "-1"),
        ("TRTWSI_READ_STRIPS", "12", "²"),
    ],
)
def test_each_setting_takes_its_values_and_names_itself_when_wrong(monkeypatch, name, good, bad):
    assert env_setting(name) is None
    monkeypatch.setenv(name, "")
    assert env_setting(name) is None  # empty counts as unset
    monkeypatch.setenv(name, good)
    assert env_setting(name) == good
    monkeypatch.setenv(name, bad)
    with pytest.raises(UsageError, match=rf"{name}={bad!r} \(.*\) takes .*unset {name}"):
        env_setting(name)


def test_the_report_lists_what_is_set_with_its_problem(monkeypatch):
    assert env_report() == []
    monkeypatch.setenv("TRTWSI_DECODE", "cpu")
    monkeypatch.setenv("TRTWSI_SEAM_MERGE", "both")
    got = {name: (value, problem) for name, value, problem in env_report()}
    assert got["TRTWSI_DECODE"] == ("cpu", None)
    assert got["TRTWSI_SEAM_MERGE"][0] == "both"
    assert "'thread' or 'process'" in got["TRTWSI_SEAM_MERGE"][1]


def test_a_runtime_refuses_a_bad_export_before_loading_models(monkeypatch, tmp_path):
    from trtwsi.runtime import Runtime

    monkeypatch.setenv("TRTWSI_LAUNCH_GRAPHS", "yes")
    missing = tmp_path / "no-such-model.pt"  # never opened: the setting is checked first
    with pytest.raises(UsageError, match="TRTWSI_LAUNCH_GRAPHS='yes'"):
        Runtime([missing], device="cpu")
    monkeypatch.delenv("TRTWSI_LAUNCH_GRAPHS")
    monkeypatch.setenv("TRTWSI_TISSUE", "opencv")
    with pytest.raises(UsageError, match=r"TRTWSI_TISSUE='opencv'.*'auto' or 'gpu' or 'cpu'"):
        Runtime([missing], device="cpu")
