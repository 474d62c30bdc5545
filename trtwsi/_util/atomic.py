"""Atomic, no-clobber file writes.

:func:`atomic_write` writes into a temporary file in the target's directory, flushes and fsyncs
it, then moves it onto the target in one step, so a reader never sees a half-written file and a
failure (an exception in the serializer, Ctrl-C, a full disk) leaves the target untouched and no
temporary file behind (a hard kill -9 or power loss can leave a ``.NAME.*.tmp`` file; never a
partial target).

- Existing target: refused with :class:`~trtwsi.errors.OutputExistsError` unless
  ``overwrite=True``. The refusal is checked before writing (fail fast) and again at the final
  step: without ``overwrite`` the temporary file is hard-linked to the target name, which fails if
  a file appeared there meanwhile, so a concurrent writer is never clobbered either (on file
  systems without hard links the final check is a plain existence test).
- Missing parent directories are created (like ``mkdir -p``).
- The written file gets the usual ``0o666 & ~umask`` permissions (not the 0600 of a temp file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from trtwsi.errors import OutputExistsError

__all__ = ["atomic_write", "check_output_path", "write_bytes_atomic", "write_text_atomic"]


def _umask() -> int:
    try:  # Linux: read it without changing it (no race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{path} already exists; refusing to overwrite it. Pass overwrite=True (CLI: --overwrite) "
        "to replace it, or choose another output path."
    )


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise OutputExistsError if ``path`` exists and ``overwrite`` is False; return it as Path.

    A directory at ``path`` is always refused (IsADirectoryError), whatever ``overwrite`` says.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"{path} is a directory; give a file path to write to", str(path)
        )
    if path.exists() and not overwrite:
        raise _exists_error(path)
    return path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _commit(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic no-clobber: fails if the name exists
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError:  # no hard links here (FAT, some network or container file systems)
        if path.exists():
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "w",
    *,
    overwrite: bool = False,
    encoding: str | None = "utf-8",
    newline: str | None = None,
) -> Iterator[IO]:
    """Context manager yielding a file object whose content replaces ``path`` on success.

    ``mode``: ``"w"`` (text, ``encoding``/``newline`` apply) or ``"wb"``. On any exception inside
    the ``with`` block (or while committing), the temporary file is removed, ``path`` is left as
    it was, and the exception propagates.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        kw = {} if mode == "wb" else {"encoding": encoding, "newline": newline}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        _commit(tmp, path, overwrite)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`); return the path."""
    with atomic_write(path, "wb", overwrite=overwrite) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(
    path: str | os.PathLike, text: str, *, overwrite: bool = False, encoding: str = "utf-8"
) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); return the path."""
    with atomic_write(path, "w", overwrite=overwrite, encoding=encoding) as f:
        f.write(text)
    return Path(path)
