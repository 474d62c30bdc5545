"""The ``TRTWSI_*`` environment variables that change how a run goes, checked in one place.

Each setting has a meaning and the values it takes. :func:`env_setting` reads one (a bad
value is a :class:`~trtwsi.errors.UsageError` that names the variable, its value and what it
takes, so a stray export in a lab's shell profile is found at once); :func:`env_report` lists
the ones set, for ``trtwsi doctor``. ``TRTWSI_MODELS`` (a folder) is read by
:mod:`trtwsi._util.resources`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from trtwsi.errors import UsageError

__all__ = ["SETTINGS", "env_report", "env_setting"]


def _positive_or_adaptive(value: str) -> bool:
    return value == "adaptive" or (value.isascii() and value.isdigit() and int(value) >= 1)


#: name → (what it sets, the values it takes: a tuple of words, or (a check, its description))
SETTINGS: dict[str, tuple[str, tuple]] = {
    "TRTWSI_TISSUE": ("where planner threads find tissue (tissue='auto')", ("auto", "gpu", "cpu")),
    "TRTWSI_DECODE": (
        "where JPEG tiles are decoded on the GPU pipeline (decode='auto')",
        ("auto", "gpu", "cpu"),
    ),
    "TRTWSI_SEAM_MERGE": (
        "where seams merge while a slide's tiles come back (seam_merge=None)",
        ("thread", "process"),
    ),
    "TRTWSI_LAUNCH_GRAPHS": (
        "1: replay each batch's launches around the engine as CUDA graphs (default), 0: off",
        ("1", "0"),
    ),
    "TRTWSI_COMPILE_PACKAGE": (
        "1: compile=True keeps the compiled model as a package on disk, loaded by later runs "
        "(experimental), 0: torch.compile in every process (default)",
        ("1", "0"),
    ),
    "TRTWSI_READ_STRIPS": (
        "strips a reader-process read is cut into",
        (_positive_or_adaptive, "'adaptive' (default) or a positive integer"),
    ),
}


def _accepts(values: tuple) -> tuple[Callable[[str], bool], str]:
    if values and callable(values[0]):
        return values[0], values[1]
    return (lambda v: v in values), " or ".join(repr(v) for v in values)


def env_setting(name: str) -> str | None:
    """The value of ``$name`` (one of :data:`SETTINGS`), None when unset or empty.

    Raises:
        UsageError: the value is not one the setting takes (the message names both).
    """
    value = os.environ.get(name, "")
    if not value:
        return None
    what, values = SETTINGS[name]
    ok, described = _accepts(values)
    if not ok(value):
        raise UsageError(
            f"environment variable {name}={value!r} ({what}) takes {described}: "
            f"fix it, or unset it (unset {name}) for the default"
        )
    return value


def env_report() -> list[tuple[str, str, str | None]]:
    """``(name, value, problem or None)`` of every :data:`SETTINGS` variable that is set."""
    out = []
    for name in SETTINGS:
        if not os.environ.get(name):
            continue
        try:
            env_setting(name)
            out.append((name, os.environ[name], None))
        except UsageError as e:
            out.append((name, os.environ[name], str(e)))
    return out
