"""The end of one slide: merge its tiles' detections across seams and build its Results.

Rows in: per model, ``(M, 8)`` float64 ``x1 y1 x2 y2 score class section tile`` in level-0 px
(``tile``: the slide-wide tile id of :class:`~trtwsi.plan.SlidePlan`). Boxes of one tile were
already de-duplicated by the model's own NMS, so the merge compares only boxes of different
tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trtwsi.merge import merge_detections
from trtwsi.results import Detections, Results

__all__ = ["describe_model", "finish_slide", "merge_rows"]

#: Columns of the per-model rows the runners hand to :func:`finish_slide`.
ROW_COLUMNS = ("x1", "y1", "x2", "y2", "score", "class", "section", "tile")


def _merge(d: np.ndarray, merge_opts: dict, groups: bool):
    return merge_detections(
        d[:, :4],
        d[:, 4],
        d[:, 5].astype(np.int64),
        groups=d[:, 6].astype(np.int64) if groups else None,  # sections never merge together
        tiles=d[:, 7].astype(np.int64),
        **merge_opts,
    )


def merge_rows(
    per_model: Sequence[Sequence[np.ndarray]], models, merge_opts: dict, early=None
) -> Detections:
    """Merge duplicates across tile seams, per model; returns Detections.

    ``early``: the :class:`~trtwsi.runtime.seams.SeamMerger` that merged the slide's rows
    while its tiles came back; it gives the same result as one merge of all rows, and
    whatever it did not merge (or all of it, if it turned itself off) is merged here.
    """
    parts = []
    for mi, rows in enumerate(per_model):
        rows = [r for r in rows if len(r)]
        if not rows:
            continue
        d = np.concatenate(rows)
        merged = early.result(mi, len(d)) if early is not None else None
        if merged is None:
            merged = _merge(d, merge_opts, groups=True)
        parts.append((mi, merged, d[:, :7]))
    return Detections.from_merged(parts, models=models)


def describe_model(m, device: str) -> dict:
    """The JSON description of a model in Results (name, weights, classes, backend …)."""
    kind, reason = m.resolve_backend(device)
    return {
        "name": m.name,
        "weights": str(m.weights),
        "sha256": m.sha256,
        "classes": list(m.names),
        "head": m.head,
        "imgsz": m.imgsz,
        "min_conf": m.min_conf,
        "iou": m.iou,
        "backend": kind,
        "reason": reason,
    }


def read_error_records(slide) -> list[dict]:
    """The slide's recorded tile errors as JSON-ready dicts."""
    return [
        {
            "type": type(e).__name__,
            "message": str(e),
            "level": e.level,
            "tile": list(e.tile) if isinstance(e.tile, tuple) else e.tile,
            "region": list(e.region) if e.region is not None else None,
        }
        for e in slide.read_errors
    ]


def finish_slide(
    plan, per_model, models, *, timings: dict, params: dict, model_info: list[dict], early=None
) -> Results:
    """Merge ``per_model`` rows of ``plan``'s slide (``early``: see :func:`merge_rows`) and wrap
    everything in Results; ``timings["merge"]`` is the time spent here, after the slide's
    last batch."""
    import time

    t0 = time.perf_counter()
    detections = merge_rows(per_model, models, dict(plan.options.merge), early)
    timings = dict(timings)
    timings["merge"] = round(timings.get("merge", 0.0) + time.perf_counter() - t0, 6)
    return Results(
        detections=detections,
        timings=timings,
        errors=read_error_records(plan.slide),
        slide=plan.slide.info().__dict__,
        models=model_info,
        params={
            **params,
            "overlap": plan.options.overlap,
            "mpp": plan.options.mpp,
            "section": plan.options.section,
            "region": list(plan.options.region) if plan.options.region is not None else None,
            "merge": dict(plan.options.merge),
        },
        sections=plan.sections,
        n_tiles=plan.n_tiles,
    )
