"""The batch manifest (``OUT/manifest.jsonl``) and the output-folder lock.

Record fields are listed in :mod:`trtwsi.batch.coordinator`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

from trtwsi.errors import BatchError

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
    """Appends records to ``OUT/manifest.jsonl`` (one ``write`` + ``fsync`` each).

    Only one process writes (the coordinator; the output folder is locked). If the file does not
    end with a newline (a torn record of a killed run), a newline is written first so the next
    record starts on its own line.
    """

    def __init__(self, path: str | os.PathLike, run_id: str):
        self.path = Path(path)
        self.run_id = run_id
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(self._fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def append(self, record: Mapping) -> dict:
        rec = {"v": MANIFEST_VERSION, "run": self.run_id, "time": _now(), **record}
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        os.write(self._fd, line.encode())
        os.fsync(self._fd)
        return rec

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _locked(out_dir: Path):
    """Hold an exclusive ``flock`` on ``OUT/.trtwsi-batch.lock`` (released when the process
    dies, however it dies)."""
    import fcntl

    fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise BatchError(
                f"another trtwsi batch is writing to {str(out_dir)!r} ({other or 'pid unknown'}); "
                "wait for it to finish, or choose another --out folder"
            ) from None
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
