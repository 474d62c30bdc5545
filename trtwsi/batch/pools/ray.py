"""Batch runs on a Ray cluster: the same per-slide work as the local pool, as Ray actors.

:class:`RayPool` is the Ray twin of :class:`trtwsi.batch.pools.local.LocalPool` and has the same
``run(jobs, specs, params, emit, ...)`` contract, so :func:`trtwsi.batch.run_batch` keeps the
manifest, skips and retries the same way whichever runs the slides. Scheduling, placement and
node management are Ray's; this module only keeps one slide in flight per actor.

- One actor per device entry; an actor loads the models and engines once
  (:class:`trtwsi.batch.SlideRunner`) and runs slides one at a time. GPU actors ask for
  ``num_gpus=1`` (Ray sets ``CUDA_VISIBLE_DEVICES``; the actor runs on ``cuda``), CPU actors ask
  for ``num_cpus = threads`` (``BatchParams.threads``, default 1).
- Actors write the slide's outputs themselves, so the output folder must be shared by every
  node (NFS, Lustre, …) at the same path; the coordinator (the driver) writes the manifest.
- An actor that dies on a slide (``RayActorError``: process killed, node lost) is replaced and
  its slide retried, up to ``max_retries`` times, exactly as in the local pool.
- ``address``: None / ``"local"`` starts a private local Ray instance (no dashboard) for the
  run, unless this process already called ``ray.init`` (then that session is used and left
  running); any other value is passed to ``ray.init(address=...)``: ``"auto"`` (a cluster
  started with ``ray start`` on this node), ``"HOST:6379"``, or ``"ray://HOST:10001"`` (Ray
  Client; needs ``ray[client]``). trtwsi and the models must be installed/readable on every node.
- Ray's usage statistics are turned off (``RAY_USAGE_STATS_ENABLED=0``) unless the environment
  says otherwise: nothing reaches the network beyond the cluster.
- Ctrl-C kills the actors (``ray.kill``); whole output files are never torn (atomic writes),
  but a killed actor can leave a ``.NAME.EXT.*.tmp`` file, which the next run removes.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
from collections.abc import Callable, Sequence

from trtwsi.batch.jobs import _error_dict
from trtwsi.batch.runner import SlideRunner
from trtwsi.errors import BatchError, WorkerError, require

__all__ = ["RayPool"]


class _SlideActor:
    """Ray actor body: a :class:`~trtwsi.batch.SlideRunner` for one device."""

    def __init__(self, specs, params, device: str, threads):

        self.error = None
        self.runner = None
        try:
            self.runner = SlideRunner(specs, params, device, threads)
        except Exception as e:  # reported by ready(), so the driver can say why
            self.error = _error_dict(e)

    def ready(self) -> dict:
        return {"error": self.error, "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, job) -> dict:
        return self.runner(job)


class RayPool:
    """Slides as Ray actors (see the module docstring).

    ``devices``: None / ``"all"`` (one GPU actor per GPU of the cluster), a comma string or list
    of entries where each ``cpu`` is a CPU actor and each GPU entry (``0``, ``cuda:1``, …) a GPU
    actor (the index is not used: Ray chooses the GPU). ``max_restarts``: replacement actors per
    slot after deaths in a row.
    """

    def __init__(self, address: str | None = None, devices=None, max_restarts: int = 3):
        self.address = None if address in (None, "", "local") else address
        self.spec = devices
        self.max_restarts = max_restarts
        self._kinds: list[str] | None = None

    def describe(self) -> list[str]:
        where = self.address or "local"
        if self._kinds is None:
            return [f"ray:{where}:{self.spec or 'all'}"]
        return [f"ray:{where}:{k}" for k in self._kinds]

    def _actor_kinds(self, ray) -> list[str]:
        res = ray.cluster_resources()
        n_gpu, n_cpu = int(res.get("GPU", 0)), int(res.get("CPU", 0))
        spec = self.spec
        items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else spec
        if items is None or list(items) == ["all"]:
            if not n_gpu:
                raise BatchError(
                    f"the Ray cluster has no GPU (resources: {n_cpu} CPU, 0 GPU); pass --devices "
                    "cpu,cpu,… for one CPU actor per entry, or join a cluster with GPUs"
                )
            return ["cuda"] * n_gpu
        kinds = []
        for it in items:
            s = str(it).strip().lower()
            if s == "cpu":
                kinds.append("cpu")
            elif s.removeprefix("cuda").removeprefix(":").isdigit() or s == "cuda":
                kinds.append("cuda")
            else:
                raise BatchError(
                    f"--devices entry {it!r} is not a device: with --ray use 'all', GPU entries "
                    "(0,1 or cuda:N; Ray picks the GPU), or 'cpu' per CPU actor"
                )
        if kinds.count("cuda") > n_gpu:
            raise BatchError(
                f"--devices asks for {kinds.count('cuda')} GPU actor(s) but the Ray cluster has "
                f"{n_gpu} GPU(s); ask for at most {n_gpu}"
            )
        return kinds

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
        """Same contract as :meth:`trtwsi.batch.pools.local.LocalPool.run`."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray = require("ray", "ray", "trtwsi predict --ray")
        from ray.exceptions import RayActorError, RayError

        started_here = not ray.is_initialized()
        if started_here:
            if self.address is None:
                ray.init(include_dashboard=False, configure_logging=False)
            else:
                ray.init(address=self.address, configure_logging=False)
        actors: list = []
        try:
            kinds = self._actor_kinds(ray)[: len(jobs)]
            self._kinds = kinds
            n_cpu = int(ray.cluster_resources().get("CPU", 0))
            need = kinds.count("cpu") * (params.threads or 1) + kinds.count("cuda")
            if need > n_cpu:
                raise BatchError(
                    f"{kinds.count('cpu')} CPU actor(s) × {params.threads or 1} thread(s) and "
                    f"{kinds.count('cuda')} GPU actor(s) need {need} CPUs but the Ray cluster has "
                    f"{n_cpu}; they would wait forever. Ask for fewer actors or --threads"
                )
            remote = ray.remote(_SlideActor)

            def new_actor(kind: str):
                threads = params.threads or (1 if kind == "cpu" else None)
                opts = (
                    {"num_cpus": threads, "num_gpus": 0}
                    if kind == "cpu"
                    else {"num_cpus": 1, "num_gpus": 1}
                )
                return remote.options(max_restarts=0, **opts).remote(specs, params, kind, threads)

            actors = [new_actor(k) for k in kinds]
            where: list[dict | None] = [None] * len(actors)
            init_errors: list[str] = []
            restarts = [0] * len(actors)

            def check_ready(i: int) -> bool:
                try:
                    info = ray.get(actors[i].ready.remote())
                except RayError as e:
                    init_errors.append(f"actor {i} ({kinds[i]}): {type(e).__name__}: {e}")
                    actors[i] = None
                    return False
                if info["error"]:
                    init_errors.append(
                        f"actor {i} ({kinds[i]}): {info['error']['type']}: "
                        f"{info['error']['message']}"
                    )
                    with contextlib.suppress(Exception):
                        ray.kill(actors[i])
                    actors[i] = None
                    return False
                where[i] = info
                return True

            for i in range(len(actors)):
                check_ready(i)
            pending = collections.deque(jobs)
            inflight: dict = {}

            def give(i: int) -> None:
                if not pending or actors[i] is None:
                    return
                job = pending.popleft()
                emit(
                    job.record(
                        status="running",
                        worker=f"ray:{kinds[i]}",
                        slot=i,
                        host=where[i]["host"],
                        pid=where[i]["pid"],
                    )
                )
                inflight[actors[i].run.remote(job)] = (i, job)

            for i in range(len(actors)):
                give(i)
            while inflight or pending:
                if not inflight:
                    idle = [i for i, a in enumerate(actors) if a is not None]
                    if not idle:
                        raise WorkerError(
                            f"no Ray actor is left to run {len(pending)} slide(s): "
                            + "; ".join(init_errors or ["actors kept dying"])
                        )
                    for i in idle:
                        give(i)
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1)
                ref = ready[0]
                i, job = inflight.pop(ref)
                try:
                    rec = ray.get(ref)
                except (RayActorError, RayError) as e:
                    retry = job.attempt <= max_retries
                    emit(
                        job.record(
                            status="crashed" if retry else "failed",
                            worker=f"ray:{kinds[i]}",
                            slot=i,
                            host=where[i]["host"],
                            pid=where[i]["pid"],
                            retry=retry,
                            error={
                                "type": "WorkerCrash",
                                "message": f"the Ray actor on {kinds[i]} died "
                                f"({type(e).__name__}) while running this slide "
                                f"(attempt {job.attempt} of {max_retries + 1})",
                            },
                        )
                    )
                    if retry:
                        job.attempt += 1
                        pending.appendleft(job)
                    with contextlib.suppress(Exception):
                        ray.kill(actors[i])
                    actors[i] = None
                    restarts[i] += 1
                    if restarts[i] <= self.max_restarts and pending:
                        actors[i] = new_actor(kinds[i])
                        check_ready(i)
                    give(i)
                    continue
                restarts[i] = 0
                emit({**rec, "worker": f"ray:{kinds[i]}", "slot": i})
                give(i)
        finally:
            for a in actors:
                if a is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(a)
            if started_here:
                ray.shutdown()
