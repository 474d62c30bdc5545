"""Local worker processes for batch runs: one per device, fed from one queue of slides.

:class:`LocalPool` starts one process per entry of ``devices`` with the ``spawn`` start method
(CUDA cannot be used in a forked child). Each worker pins itself to its GPU
(``CUDA_VISIBLE_DEVICES`` is set to that one GPU before torch is imported, so the worker sees it
as ``cuda``), loads the models and engines **once** (:class:`trtwsi.batch.SlideRunner`) and then
runs slides until the queue is empty. CPU entries (``cpu``, repeated for several workers) run the
same code on the CPU, which is how it is tested on machines without a GPU.

Queue protocol (race-free crash accounting): the queue lives in the coordinator. A worker sends
``ready`` after loading, the coordinator answers with the next :class:`~trtwsi.batch.SlideJob`
(or None: stop), the worker answers with the slide's record, and gets the next job in return. So
the coordinator always knows which slide each worker holds. It waits on the workers' pipes and
process sentinels together (:func:`multiprocessing.connection.wait`); a sentinel that fires while
a worker holds a slide is a crash: the slide is put back at the head of the queue (up to
``max_retries`` times, then recorded ``failed``) and a new worker is started on that device (up
to ``max_restarts`` times per device in a row). A worker that cannot load the models reports it
and is not restarted; when no worker is left, :class:`~trtwsi.errors.WorkerError` says why.

Workers ignore SIGINT (the coordinator decides) and turn SIGTERM into SystemExit, so an
interrupted slide's partial outputs are removed; on Linux they get SIGKILL when the coordinator
dies (``PR_SET_PDEATHSIG``), so a killed run leaves no orphan writing into the output folder.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

from trtwsi.batch.jobs import _error_dict
from trtwsi.batch.runner import SlideRunner
from trtwsi.errors import BatchError, SlideTimeoutError, WorkerError

__all__ = ["LocalPool", "parse_devices"]

#: Seconds a worker gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE = 15.0


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is needed to run anything anyway
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str | Sequence[str] | None, cuda_count: int | None = None) -> list[str]:
    """Worker devices from a ``--devices`` value: ``["cpu", "cpu"]``, ``["cuda:0", "cuda:1"]``.

    ``spec``: ``"all"`` (every visible CUDA GPU, or ``["cpu"]`` when there is none), a comma list
    of GPU indices (``"0,1"``), ``cuda:N``, ``cuda`` (= ``cuda:0``) and ``cpu`` entries (``cpu``
    repeated = several CPU workers), a list of such entries, or None (``cuda:0`` when a GPU is
    visible, else ``cpu``). ``cuda_count``: visible GPUs (default: ask torch).

    Raises:
        BatchError: an entry that is not a device, a GPU index beyond the GPUs visible, or the
            same GPU twice.
    """
    n = _cuda_count() if cuda_count is None else cuda_count
    if spec is None:
        return ["cuda:0"] if n else ["cpu"]
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if items == ["all"]:
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if items == ["auto"]:
        return parse_devices(None, n)
    out = []
    for it in items:
        s = str(it).strip().lower()
        if s == "cpu":
            out.append("cpu")
            continue
        idx = s.removeprefix("cuda").removeprefix(":") or "0"
        if not idx.isdigit():
            raise BatchError(
                f"--devices entry {it!r} is not a device: use GPU indices (0,1), cuda:N, 'all', "
                "or 'cpu' (repeat it for several CPU workers: cpu,cpu)"
            )
        if int(idx) >= n:
            raise BatchError(
                f"--devices asks for GPU {idx} but {n} CUDA GPU(s) are visible"
                + (f" (0..{n - 1})" if n else " (torch sees none)")
                + "; use --devices all, indices below that, or cpu"
            )
        out.append(f"cuda:{int(idx)}")
    dup = sorted({d for d in out if d != "cpu" and out.count(d) > 1})
    if dup:
        raise BatchError(f"--devices names {dup} more than once; give each GPU once")
    if not out:
        raise BatchError(f"--devices {spec!r} names no device")
    return out


#: Jobs handed to a worker at once: the one running and the next ones, which its runtime plans
#: (opens the slide, finds the tissue) meanwhile, in its planner threads.
PREFETCH = 6


def _default_threads(n_workers: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, n_workers))


# ------------------------------------------------------------------------------------------
# worker side
# ------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _worker_main(
    conn, device: str, specs, params, threads, parent_pid: int, spawned_at: float = 0.0
) -> None:
    booted = time.time() - spawned_at if spawned_at else None  # interpreter start + imports
    _die_with_parent()
    if os.getppid() != parent_pid:  # parent died before prctl took effect
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _sigterm)
    run_on = device
    if device.startswith("cuda:"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        idx = int(device.split(":", 1)[1])
        # an index into the coordinator's own visible list, when it has one
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[idx] if ids else str(idx)
        run_on = "cuda"

    try:
        runner = SlideRunner(specs, params, run_on, threads)
        if booted is not None:
            runner.boot = round(booted, 3)
    except Exception as e:
        conn.send(("init_failed", _error_dict(e)))
        return
    conn.send(("ready", os.getpid()))
    # Jobs arrive while earlier ones run: a reader thread queues them, and the runtime plans the
    # next slide while the current one is on the device (the coordinator keeps up to
    # PREFETCH jobs handed to each worker).
    jobs: queue.Queue = queue.Queue()

    def receive() -> None:
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):
                job = None
            jobs.put(job)
            if job is None:
                return

    threading.Thread(target=receive, name="trtwsi-jobs", daemon=True).start()

    def job_stream():
        while (job := jobs.get()) is not None:
            yield job

    try:
        for rec in runner.stream(job_stream()):
            conn.send(("result", rec))
    finally:
        runner.close()
    # Every output is written and the runtime is closed (reader processes joined, shared
    # memory unlinked). The interpreter's own teardown with torch loaded takes 0.8 s, which
    # the coordinator would wait for after the last slide: skip it.
    sys.stdout.flush()
    sys.stderr.flush()
    conn.close()
    os._exit(0)


# ------------------------------------------------------------------------------------------
# coordinator side
# ------------------------------------------------------------------------------------------
class _Slot:
    def __init__(self, index: int, device: str):
        self.index = index
        self.device = device
        self.proc = None
        self.conn = None
        self.pid = None
        self.jobs: collections.deque = collections.deque()  # handed over, in order
        self.restarts = 0
        self.retired = False
        self.stopping = False
        self.head_since: float | None = None  # when the worker became free for jobs[0]


class LocalPool:
    """Worker processes on this host, one per entry of ``devices`` (see :func:`parse_devices`).

    ``max_restarts``: new workers started on one device after crashes in a row before the device
    is given up. ``slide_timeout``: seconds a worker may spend on one slide (from the moment it
    is free for it: its models loaded and the slide before done); past that the worker is
    stopped, the slide recorded ``failed`` (``SlideTimeoutError``), the slides it held next put
    back in line, and a new worker started on the device.
    """

    def __init__(
        self, devices: Sequence[str], max_restarts: int = 3, slide_timeout: float | None = None
    ):
        if not devices:
            raise BatchError("LocalPool needs at least one device")
        self.devices = list(devices)
        self.max_restarts = max_restarts
        self.slide_timeout = slide_timeout

    def describe(self) -> list[str]:
        return list(self.devices)

    def run(
        self,
        jobs: Sequence,
        specs: Sequence[dict],
        params,
        emit: Callable[[dict], None],
        *,
        max_retries: int = 2,
        log: Callable[[str], None] = lambda s: None,
    ) -> None:
        """Run ``jobs`` (SlideJobs); ``emit`` gets every slide record (``running``, then ``done``
        / ``failed`` / ``crashed``) in the order they happen. Returns when every job has a final
        record; on any exception (KeyboardInterrupt included) the workers are stopped first."""
        ctx = mp.get_context("spawn")
        n_workers = min(len(self.devices), len(jobs))
        threads = params.threads or _default_threads(n_workers)
        slots = [_Slot(i, d) for i, d in enumerate(self.devices[:n_workers])]
        pending = collections.deque(jobs)
        init_errors: list[str] = []

        def start(slot: _Slot) -> None:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(child, slot.device, specs, params, threads, os.getpid(), time.time()),
                name=f"trtwsi-worker-{slot.index}-{slot.device}",
                # not a daemon: a worker may start reader processes of its own (GPU pipeline)
                daemon=False,
            )
            try:
                proc.start()
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            slot.proc, slot.conn, slot.pid = proc, parent, proc.pid
            slot.jobs.clear()
            slot.stopping = False
            slot.head_since = None  # until the new worker says it is ready

        def give(slot: _Slot) -> None:
            """Keep PREFETCH jobs handed to the worker; None once nothing is left."""
            while pending and len(slot.jobs) < PREFETCH:
                job = pending.popleft()
                slot.jobs.append(job)
                emit(
                    job.record(
                        status="running",
                        worker=slot.device,
                        slot=slot.index,
                        host=socket.gethostname(),
                        pid=slot.pid,
                    )
                )
                slot.conn.send(job)
            if not pending and not slot.jobs and not slot.stopping:
                slot.stopping = True
                with contextlib.suppress(OSError):
                    slot.conn.send(None)

        def handle(slot: _Slot, msg) -> None:
            kind, payload = msg
            if kind == "ready":
                slot.head_since = time.monotonic()
                give(slot)
            elif kind == "result":
                slot.jobs.popleft()
                slot.head_since = time.monotonic()
                slot.restarts = 0
                emit({**payload, "worker": slot.device, "slot": slot.index})
                give(slot)
            elif kind == "init_failed":
                slot.retired = True
                init_errors.append(f"{slot.device}: {payload['type']}: {payload['message']}")
                log(f"worker on {slot.device} could not start: {payload['message']}")

        def died(slot: _Slot) -> None:
            while slot.conn.poll():  # messages sent just before exiting
                try:
                    handle(slot, slot.conn.recv())
                except (EOFError, OSError):  # closed, or reset by a killed worker
                    break
            slot.proc.join()
            code = slot.proc.exitcode
            slot.conn.close()
            slot.proc = None
            if not slot.jobs:
                if not slot.stopping and not slot.retired:
                    slot.retired = True  # exited without being asked: do not loop on it
                    init_errors.append(f"{slot.device}: worker exited with code {code}")
                return
            # Every job handed to the worker was in its runtime (running, or being opened and
            # planned ahead): each gets a crash record and goes back in line, in order.
            lost = list(slot.jobs)
            slot.jobs.clear()
            why = (
                f"signal {signal.Signals(-code).name}"
                if code is not None and code < 0
                else f"exit code {code}"
            )
            for job in reversed(lost):
                retry = job.attempt <= max_retries
                emit(
                    job.record(
                        status="crashed" if retry else "failed",
                        worker=slot.device,
                        slot=slot.index,
                        host=socket.gethostname(),
                        pid=slot.pid,
                        retry=retry,
                        error={
                            "type": "WorkerCrash",
                            "message": f"the worker process on {slot.device} died ({why}) while "
                            f"this slide was in it (attempt {job.attempt} of {max_retries + 1})",
                        },
                    )
                )
                if retry:
                    job.attempt += 1
                    pending.appendleft(job)
            slot.restarts += 1
            if slot.restarts > self.max_restarts:
                slot.retired = True
                log(f"giving up device {slot.device}: its worker died {slot.restarts} times")
            elif pending:
                start(slot)

        limit = self.slide_timeout

        def expire(slot: _Slot) -> None:
            """The worker ran over ``limit`` on its current slide: stop it, fail the slide, put
            the slides it held next back in line, start a new worker."""
            _stop([slot], force=True)
            job, *rest = slot.jobs
            slot.jobs.clear()
            for j in reversed(rest):
                pending.appendleft(j)
            log(f"{job.name}: over --slide-timeout {limit:g} s on {slot.device}; worker restarted")
            emit(
                job.record(
                    status="failed",
                    worker=slot.device,
                    slot=slot.index,
                    host=socket.gethostname(),
                    pid=slot.pid,
                    error=_error_dict(
                        SlideTimeoutError(
                            f"slide {job.name} ran longer than --slide-timeout {limit:g} s on "
                            f"{slot.device}; its worker was stopped. Raise --slide-timeout, or "
                            "check the slide (huge, or a stuck read)"
                        )
                    ),
                )
            )
            if pending:
                start(slot)

        def next_deadline() -> float | None:
            if limit is None:
                return None
            ends = [
                s.head_since + limit
                for s in slots
                if s.proc is not None and s.jobs and s.head_since is not None
            ]
            return max(0.0, min(ends) - time.monotonic()) if ends else None

        try:
            for slot in slots:
                start(slot)
            while True:
                busy = [s for s in slots if s.jobs]
                live = [s for s in slots if s.proc is not None]
                if not pending and not busy:
                    break
                if not live:
                    if pending:
                        # devices whose worker died can come back for the remaining slides
                        idle = [s for s in slots if not s.retired]
                        if idle:
                            for s in idle:
                                start(s)
                            continue
                    raise WorkerError(
                        f"no batch worker is left to run {len(pending)} slide(s): "
                        + "; ".join(init_errors or ["workers kept crashing"])
                    )
                by_obj = {}
                for s in live:
                    by_obj[s.conn] = (s, s.proc)
                    by_obj[s.proc.sentinel] = (s, s.proc)
                for obj in wait(list(by_obj), timeout=next_deadline()):
                    s, proc = by_obj[obj]
                    if s.proc is not proc:  # that process was already handled in this round
                        continue
                    if obj is s.conn:
                        try:
                            msg = s.conn.recv()
                        except (EOFError, OSError):
                            # a worker killed with unread data on its socket resets it
                            # (ConnectionResetError) instead of closing it (EOFError)
                            died(s)
                            continue
                        handle(s, msg)
                    else:
                        died(s)
                if limit is not None:
                    now = time.monotonic()
                    for s in slots:
                        if (
                            s.proc is not None
                            and s.jobs
                            and s.head_since is not None
                            and now - s.head_since > limit
                        ):
                            expire(s)
        finally:
            _stop(slots)


def _stop(slots: Sequence[_Slot], force: bool = False) -> None:
    """Stop every worker still running: None to idle ones, SIGTERM to busy ones, then kill
    (``force``: SIGTERM to all, and kill after a short grace)."""
    live = [s for s in slots if s.proc is not None]
    for s in live:
        if not s.jobs and not force:
            with contextlib.suppress(OSError, ValueError):
                s.conn.send(None)
        else:
            with contextlib.suppress(OSError):
                s.proc.terminate()
    for s in live:
        s.proc.join(2.0 if force else TERMINATE_GRACE)
        if s.proc.exitcode is None:
            s.proc.kill()
            s.proc.join()
        with contextlib.suppress(OSError):
            s.conn.close()
        s.proc = None
