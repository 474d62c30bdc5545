"""Per-slide work of a batch worker (a local worker process or a Ray actor)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from trtwsi.batch.jobs import BatchParams, SlideJob, _error_dict
from trtwsi.errors import BatchError


class SlideRunner:
    """Loads the models once for ``device`` and runs slides one by one; each model's engine is
    loaded by the first slide's Predictor and reused by the next ones (``engine_cache``).

    Args:
        specs: :func:`model_spec` dicts plus ``"sha256"`` (checked against the file).
        params: the batch's :class:`BatchParams`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        threads: torch intra-op threads (None: leave torch's default).

    Calling it with a :class:`SlideJob` returns the slide record (``status`` ``done`` or
    ``failed``, see the module docstring; ``run``/``time``/``v`` are added by the coordinator).
    Exceptions of the slide become a ``failed`` record; KeyboardInterrupt/SystemExit remove the
    outputs this attempt wrote and propagate.
    """

    def __init__(self, specs: Sequence[Mapping], params: BatchParams, device: str, threads=None):
        import torch

        from trtwsi.engines.model import Model

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
        self.engine_cache: dict = {}

    def __call__(self, job: SlideJob) -> dict:
        from trtwsi._util.atomic import check_output_path
        from trtwsi.predictor import Predictor
        from trtwsi.slide import open_slide

        p = self.params
        t0 = time.perf_counter()
        base = job.record(host=socket.gethostname(), pid=os.getpid())
        outputs = job.outputs(p.formats)
        written: list[Path] = []
        try:
            if not job.overwrite:
                for o in outputs:
                    check_output_path(o, overwrite=False)
            slide = open_slide(job.path, mpp=p.slide_mpp, threads=p.workers or self.threads)
            try:
                pred = Predictor(
                    slide,
                    self.models,
                    engine_cache=self.engine_cache,
                    overlap=p.overlap,
                    mpp=p.mpp,
                    batch=p.batch,
                    workers=p.workers or self.threads,
                    device=self.device,
                    progress=False,
                )
                try:
                    res = pred.run(section=p.section, region=p.region)
                finally:
                    pred.close()  # the GPU pipeline's reader processes and buffers
                for o in outputs:
                    written.append(res.save(o, overwrite=job.overwrite, slide=slide))
            finally:
                slide.close()
        except Exception as e:
            _remove(written)
            return {**base, "status": "failed", "error": _error_dict(e)}
        except BaseException:  # interrupted: leave no outputs of an unfinished slide
            _remove(written)
            raise
        det = res.detections
        return {
            **base,
            "status": "done",
            "outputs": [o.name for o in outputs],
            "n_detections": len(det),
            "counts": det.counts(),
            "n_tiles": res.n_tiles,
            "pixels": int(res.slide.get("width", 0)) * int(res.slide.get("height", 0)),
            "seconds": round(time.perf_counter() - t0, 4),
            "timings": res.timings,
            "tile_errors": len(res.errors),
        }


def _remove(paths: Iterable[Path]) -> None:
    for w in paths:
        with contextlib.suppress(OSError):
            os.unlink(w)
