"""The batch manifest (``OUT/manifest.jsonl``) and the output-folder lock.

Record fields are listed in :mod:`trtwsi.batch.coordinator`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import glob
import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

from trtwsi.errors import BatchError, ManifestWriteError, OutputFolderError

MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = ".trtwsi-batch.lock"
MANIFEST_VERSION = 1


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """All records of a manifest, in order. Lines that are not a JSON object (a torn last line
    after a hard kill) are skipped. A missing file reads as no records."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def latest_slide_records(records: Iterable[Mapping]) -> dict[str, dict]:
    """``{slide name: its last slide record}``."""
    state: dict[str, dict] = {}
    for r in records:
        if r.get("record") == "slide" and isinstance(r.get("slide"), str):
            state[r["slide"]] = dict(r)
    return state


class Manifest:
    """Appends records to ``OUT/manifest.jsonl`` (one ``os.write`` + ``fsync`` each).

    Only one process writes (the coordinator; the output folder is locked). On open, a torn last
    line (a record a killed run or a full disk cut short) is truncated away, so the file holds
    whole records only. A record that cannot be written whole (disk full, file size limit, folder
    gone read-only) is truncated back off the file and :class:`~trtwsi.errors.ManifestWriteError`
    raised: the manifest never keeps half a record.
    """

    def __init__(self, path: str | os.PathLike, run_id: str):
        self.path = Path(path)
        self.run_id = run_id
        self._fd = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            self._repair()
        except OSError as e:
            self.close()
            raise self._error("open", e) from None

    def _repair(self) -> None:
        size = os.fstat(self._fd).st_size
        if not size or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        # cut back to just after the last newline (or to empty)
        keep, pos, chunk = 0, size, 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            data = os.pread(self._fd, pos - start, start)
            i = data.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)

    def _error(self, doing: str, e: OSError) -> ManifestWriteError:
        return ManifestWriteError(
            f"cannot {doing} the batch manifest {str(self.path)!r}: {e.strerror or e}"
            + (f" [errno {e.errno}]" if e.errno else "")
            + "; free disk space or make the --out folder writable, then rerun the same command "
            "(finished slides are kept and skipped)"
        )

    def append(self, record: Mapping) -> dict:
        rec = {"v": MANIFEST_VERSION, "run": self.run_id, "time": _now(), **record}
        data = (json.dumps(rec, separators=(",", ":"), default=str) + "\n").encode()
        if self._fd is None:
            raise ManifestWriteError(f"the batch manifest {str(self.path)!r} is closed")
        start = os.fstat(self._fd).st_size
        try:
            n = os.write(self._fd, data)
            while n < len(data):  # a short write (e.g. the disk filled up): finish or fail
                k = os.write(self._fd, data[n:])
                if k == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                n += k
            os.fsync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)
            raise self._error("write a record to", e) from None
        return rec

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _locked(out_dir: Path):
    """Hold an exclusive ``flock`` on ``OUT/.trtwsi-batch.lock`` (released when the process
    dies, however it dies)."""
    import fcntl

    try:
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OutputFolderError(
            f"--out {str(out_dir)!r}: cannot create the batch lock file ({e.strerror or e}); "
            "choose a writable output folder or fix its permissions"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise BatchError(
                f"another trtwsi batch is writing to {str(out_dir)!r} ({other or 'pid unknown'}); "
                "wait for it to finish, or choose another --out folder"
            ) from None
        with contextlib.suppress(OSError):  # who holds it: informative only (disk may be full)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _remove_stale_temporaries(out_dir: Path, names: Iterable[str], formats) -> int:
    n = 0
    for name in names:
        for f in formats:
            for tmp in glob.glob(str(out_dir / f".{glob.escape(name + f)}.*.tmp")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                    n += 1
    return n
