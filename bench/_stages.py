"""Which resource bounds a GPU-pipeline slide, from its ``Results.timings`` (shared by bench/).

The pipeline overlaps four resources; each slide's timings say how long each was busy:

- ``gpu_compute``: the compute stream (``gpu_preprocess`` + ``gpu_infer*`` +
  ``gpu_postprocess*``, CUDA-event times);
- ``gpu_copy``: the copy stream (``gpu_h2d`` + ``gpu_place``);
- ``pipeline_thread``: the one Python thread that enqueues batches and sorts their rows
  (``launch`` + ``collect``; its waits, ``wait_read`` and ``wait_gpu``, are idle time);
- ``readers``: CPU decode, spread over the reader processes (``read`` / workers). ``read`` is
  the reader threads' wall time per chunk, queueing for a free process included, so this is an
  upper bound: it reads high whenever the host's cores are oversubscribed.

Around them run the serial parts: ``sections`` (the plan, before the first read) and ``merge``
(the seam merge left after the last batch); ``first_launch_at`` and ``after_last_return`` (when
timed) say how long the GPU had nothing of the slide at its start and end, and ``planned_at``,
``first_submit_at``, ``first_queued_at``, ``first_read_at`` and ``first_chunk_at`` where its
start went (plan done, first read submitted, its strips queued with the reader processes and
back from them, first chunk taken by the pipeline). The bound is the busiest resource; ``overlap`` is how
much of the wall time it and the serial parts explain (1.0: all of it; well under 1: the stages
wait on each other, e.g. a thread starved of the GIL, which no stage timer sees).
"""

from __future__ import annotations

__all__ = ["bound_of"]

_COPY = ("gpu_h2d", "gpu_place")


def bound_of(timings: dict, workers: int, seconds: float) -> dict:
    """Busy seconds per resource of one slide and the one that bounds it.

    Args:
        timings: ``Results.timings`` of a GPU-pipeline slide (seconds per stage).
        workers: reader processes (or threads) that shared ``read``.
        seconds: the slide's wall time.

    Returns:
        ``{"gpu_compute": s, "gpu_copy": s, "pipeline_thread": s, "readers": s,
        "serial": s, "bound": name, "overlap": fraction}`` (seconds rounded to 1 ms).
    """
    t = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    busy = {
        "gpu_compute": sum(v for k, v in t.items() if k.startswith("gpu_") and k not in _COPY),
        "gpu_copy": sum(t.get(k, 0.0) for k in _COPY),
        "pipeline_thread": t.get("launch", 0.0) + t.get("collect", 0.0),
        "readers": t.get("read", 0.0) / max(1, int(workers)),
    }
    serial = t.get("sections", 0.0) + t.get("merge", 0.0)
    bound = max(busy, key=busy.get)
    out = {k: round(v, 3) for k, v in busy.items()}
    out["serial"] = round(serial, 3)
    out["bound"] = bound
    out["overlap"] = round((busy[bound] + serial) / seconds, 2) if seconds > 0 else None
    # the slide's timeline: planned, first read submitted, first chunk taken, first batch
    for k in (
        "planned_at", "first_submit_at", "first_queued_at", "first_read_at", "first_chunk_at",
        "first_launch_at",
    ):  # fmt: skip
        if k in t:
            out[k] = round(t[k], 3)
    if "last_return_at" in t:
        out["after_last_return"] = round(seconds - t["last_return_at"], 3)
    return out
