"""Checks on a slide path before any byte of it is read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from trtwsi.errors import NotARegularFileError, SlideNotFoundError


def check_regular_file(path: str | os.PathLike) -> Path:
    """Return ``Path(path)`` if it names a regular file (symlinks followed), else raise.

    Uses one ``os.stat`` (never opens the file, so a FIFO cannot block). Raises
    :class:`SlideNotFoundError` when nothing is there and :class:`NotARegularFileError` for a
    directory, named pipe (FIFO), socket, or character/block device.
    """
    p = Path(path)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError as e:
        raise SlideNotFoundError(f"slide file not found: {str(p)!r} (check the path)") from e
    except OSError as e:
        raise SlideNotFoundError(f"slide file {str(p)!r} cannot be examined: {e}") from e
    if stat.S_ISREG(mode):
        return p
    if stat.S_ISDIR(mode):
        kind = "a directory; give the slide file itself (for .mrxs, the .mrxs file)"
    elif stat.S_ISFIFO(mode):
        kind = "a named pipe (FIFO); reading it could block forever — copy the slide to a file"
    elif stat.S_ISSOCK(mode):
        kind = "a socket, not a slide file"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device, not a slide file; copy the slide to a regular file"
    else:
        kind = f"not a regular file (mode {oct(mode)})"
    raise NotARegularFileError(f"{str(p)!r} is {kind}")
