"""How many failed tiles a slide may have before its results are refused (``--max-tile-errors``).

A *failed tile* is a file tile (or strip) of the slide that could not be decoded; the run goes
on with it filled white and records it in :attr:`Results.errors`. The limit is a fraction of the
model tiles run (``0.05``: more errors than 5 % of the tiles fails the slide), a count (``3``:
more than 3 fails it) or None (``none``: never).
"""

from __future__ import annotations

from trtwsi.errors import TooManyTileErrorsError, UsageError

__all__ = ["DEFAULT_TILE_ERROR_LIMIT", "check_tile_errors", "parse_tile_error_limit"]

#: default ``--max-tile-errors``: 5 % of the tiles
DEFAULT_TILE_ERROR_LIMIT = 0.05


def parse_tile_error_limit(value) -> float | int | None:
    """``"none"``/None → None; ``"0.05"``/0.05 (in [0, 1)) → a fraction; ``"3"``/3 → a count.

    Raises UsageError for anything else (negative, NaN, text)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, bool):
        raise UsageError(f"--max-tile-errors {value!r}: give a fraction, a count or 'none'")
    v = value
    if isinstance(value, str):
        s = value.strip()
        try:
            v = int(s)
        except ValueError:
            try:
                v = float(s)
            except ValueError:
                v = None
    if isinstance(v, float) and v.is_integer() and v >= 1:
        v = int(v)
    if isinstance(v, int) and v >= 0:
        return v
    if isinstance(v, float) and 0.0 <= v < 1.0:
        return v
    raise UsageError(
        f"--max-tile-errors {value!r} is not a limit: give a fraction of the tiles in [0, 1) "
        "(0.05 = 5 %), a count (3), or 'none' to accept any number of failed tiles"
    )


def describe_limit(limit) -> str:
    if limit is None:
        return "none"
    if isinstance(limit, float):
        return f"{limit:g} of the tiles"
    return f"{limit} tile(s)"


def check_tile_errors(results, limit, what: str = "slide") -> None:
    """Raise TooManyTileErrorsError when ``results`` has more failed tiles than ``limit``."""
    if limit is None:
        return
    n_err, n = len(results.errors), int(results.n_tiles)
    allowed = limit * n if isinstance(limit, float) else limit
    if n_err > allowed:
        raise TooManyTileErrorsError(
            f"{what}: {n_err} tile(s) could not be decoded ({n} tiles run; --max-tile-errors "
            f"{describe_limit(limit)}): its detections are not trustworthy, so none were written. "
            "Re-export or re-scan the slide, or pass --max-tile-errors none to accept the gaps "
            "(filled white)"
        )
