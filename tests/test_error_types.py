"""Error policy (issue 10): every public error type lives in ``trtwsi/errors.py`` and derives
from ``TrtwsiError``, and nothing raises the bare base class (callers catch by kind)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import trtwsi
from trtwsi import errors

PKG = Path(trtwsi.__file__).resolve().parent


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_bare_trtwsi_error_is_raised():
    bare = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                f = node.exc.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)
                if name == "TrtwsiError":
                    bare.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not bare, f"raise a specific subclass from trtwsi/errors.py instead: {bare}"


def test_public_exception_classes_live_in_errors_py():
    strays = []
    for path, tree in _modules():
        if path.name == "errors.py" and path.parent == PKG:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {
                    b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
                }
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    strays.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}")
    assert not strays, f"move these to trtwsi/errors.py: {strays}"


def test_every_error_type_is_a_trtwsi_error_with_a_docstring():
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert len(classes) > 20
    for c in classes:
        assert issubclass(c, errors.TrtwsiError), c
        assert (c.__doc__ or "").strip(), f"{c.__name__} needs a docstring saying when it is raised"
