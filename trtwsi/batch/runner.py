"""Per-slide work of a batch worker (a local worker process or a Ray actor)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from trtwsi.batch.jobs import BatchParams, SlideJob, _error_dict
from trtwsi.errors import BatchError
from trtwsi.plan.slide_plan import SlideOptions

#: Planner threads per worker: opening a slide and finding its tissue (~0.4 s of CPU for a
#: 0.3 Gpx slide) runs this many slides ahead of the device.
PLANNERS = 4


class SlideRunner:
    """One :class:`~trtwsi.runtime.Runtime` for ``device``, held for the worker's whole life;
    slides stream through it (:meth:`stream`), or run one at a time (calling it with a job).

    Args:
        specs: :func:`model_spec` dicts plus ``"sha256"`` (checked against the file).
        params: the batch's :class:`BatchParams`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        threads: torch intra-op threads (None: leave torch's default).

    Each job yields its slide record (``status`` ``done`` or ``failed``, see
    :mod:`trtwsi.batch.coordinator`; ``run``/``time``/``v`` are added by the coordinator).
    Exceptions of a slide become a ``failed`` record; KeyboardInterrupt/SystemExit remove the
    outputs being written and propagate.
    """

    def __init__(self, specs: Sequence[Mapping], params: BatchParams, device: str, threads=None):
        t0 = time.perf_counter()
        import torch

        from trtwsi.engines.model import Model
        from trtwsi.runtime import Runtime

        t_import = time.perf_counter() - t0
        if threads:
            torch.set_num_threads(int(threads))
        self.params = params
        self.device = device
        self.threads = threads
        self.models = []
        for s in specs:
            kw = {k: v for k, v in s.items() if k != "sha256"}
            m = Model(**kw)
            if s.get("sha256") and m.sha256 != s["sha256"]:
                raise BatchError(
                    f"model {m.name!r}: weights {kw['weights']!r} changed since the batch started "
                    f"(sha256 {m.sha256[:12]}…, expected {s['sha256'][:12]}…); rerun the batch"
                )
            self.models.append(m)
        self.runtime = Runtime(
            self.models,
            device=device,
            batch=params.batch,
            workers=params.workers or threads,
            planners=PLANNERS,
            decode=params.decode,
            compile=params.compile,
        )
        #: seconds to import torch, load the models and start the runtime (engines, rings,
        #: reader processes), and their parts (``boot``: the worker process's own start,
        #: before this, where the pool knows it)
        self.start_seconds = round(time.perf_counter() - t0, 3)
        self._t_import = round(t_import, 3)
        #: seconds from the worker process's spawn to its imports (set by the pool that knows)
        self.boot: float | None = None
        self.options = SlideOptions(
            overlap=params.overlap, mpp=params.mpp, section=params.section, region=params.region
        )

    @property
    def start_timings(self) -> dict:
        """``import`` (torch, trtwsi), the runtime's :attr:`~trtwsi.runtime.Runtime.start_timings`
        (its ``warm_up`` runs in the background, overlapping the first slides) and ``boot``."""
        out = {"import": self._t_import, **self.runtime.start_timings}
        if self.boot is not None:
            out["boot"] = self.boot
        return out

    def close(self) -> None:
        self.runtime.close()

    def __call__(self, job: SlideJob) -> dict:
        (rec,) = list(self.stream([job]))
        return rec

    def stream(self, jobs: Iterable[SlideJob]) -> Iterator[dict]:
        """Records of ``jobs``, in order; the runtime plans the next slides while the current
        one runs."""
        from trtwsi._util.atomic import check_output_path
        from trtwsi.runtime import SlideRequest

        p = self.params
        early: dict[int, dict] = {}  # jobs refused before running (outputs exist)

        def requests():
            for job in jobs:
                base = job.record(host=socket.gethostname(), pid=os.getpid())
                try:
                    if not job.overwrite:
                        for o in job.outputs(p.formats):
                            check_output_path(o, overwrite=False)
                except Exception as e:
                    early[id(job)] = {**base, "status": "failed", "error": _error_dict(e)}
                    yield SlideRequest(None, tag=(job, base))
                    continue
                yield SlideRequest(job.path, slide_mpp=p.slide_mpp, tag=(job, base))

        for out in self.runtime.stream(requests(), self.options):
            job, base = out.tag
            if id(job) in early:
                yield early.pop(id(job))
                continue
            if out.error is not None:
                yield {**base, "status": "failed", "error": _error_dict(out.error)}
                continue
            yield self._write(job, base, out)

    def _write(self, job: SlideJob, base: dict, out) -> dict:
        from trtwsi.results.tile_errors import check_tile_errors

        res = out.results
        t_write = time.perf_counter()
        outputs = job.outputs(self.params.formats)
        written: list[Path] = []
        try:
            check_tile_errors(res, self.params.max_tile_errors, f"slide {job.name}")
        except Exception as e:
            return {**base, "status": "failed", "error": _error_dict(e), "n_tiles": res.n_tiles,
                    "tile_errors": len(res.errors)}  # fmt: skip
        try:
            slide = None
            if any(o.suffix.lower() in (".png", ".jpg", ".jpeg") for o in outputs):
                from trtwsi.slide import open_slide  # the overlay draws on a thumbnail

                slide = open_slide(job.path, mpp=self.params.slide_mpp)
            try:
                for o in outputs:
                    written.append(res.save(o, overwrite=job.overwrite, slide=slide))
            finally:
                if slide is not None:
                    slide.close()
        except Exception as e:
            _remove(written)
            return {**base, "status": "failed", "error": _error_dict(e)}
        except BaseException:  # interrupted: leave no outputs of an unfinished slide
            _remove(written)
            raise
        det = res.detections
        write_s = time.perf_counter() - t_write
        return {
            **base,
            "status": "done",
            "outputs": [o.name for o in outputs],
            "n_detections": len(det),
            "counts": det.counts(),
            "n_tiles": res.n_tiles,
            "pixels": int(res.slide.get("width", 0)) * int(res.slide.get("height", 0)),
            "seconds": round(out.seconds + write_s, 4),
            "timings": {**res.timings, "write": round(write_s, 6)},
            "tile_errors": len(res.errors),
            "worker_start_s": self.start_seconds,
            "worker_start": self.start_timings,
        }


def _remove(paths: Iterable[Path]) -> None:
    for w in paths:
        with contextlib.suppress(OSError):
            os.unlink(w)
