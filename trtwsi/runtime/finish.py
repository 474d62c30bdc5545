"""The end of one slide: merge its tiles' detections across seams and build its Results.

Rows in: per model, ``(M, 8)`` float64 ``x1 y1 x2 y2 score class section tile`` in level-0 px
(``tile``: the slide-wide tile id of :class:`~trtwsi.plan.SlidePlan`). Boxes of one tile were
already de-duplicated by the model's own NMS, so the merge compares only boxes of different
tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trtwsi.merge import combine_merges, merge_detections
from trtwsi.results import Detections, Results

__all__ = ["describe_model", "finish_slide", "merge_rows", "merge_section"]

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


def merge_section(per_model: Sequence[Sequence[np.ndarray]], section: int, merge_opts: dict):
    """The seam merge of one section whose tiles are all back, per model: a list of
    :class:`~trtwsi.merge.MergeResult` over that section's rows in arrival order (the order
    they have in the slide's concatenated rows). Safe while other sections' rows arrive."""
    out = []
    for rows in per_model:
        sel = [r[r[:, 6] == section] for r in list(rows) if len(r)]
        d = np.concatenate(sel) if sel else np.empty((0, 8))
        out.append(_merge(d, merge_opts, groups=False))
    return out


def merge_rows(
    per_model: Sequence[Sequence[np.ndarray]], models, merge_opts: dict, early: dict | None = None
) -> Detections:
    """Merge duplicates across tile seams, per model; returns Detections.

    ``early``: section → future of :func:`merge_section` for sections merged while the slide
    ran; the other sections are merged here, and :func:`~trtwsi.merge.combine_merges` makes
    the same result as one merge of all rows.
    """
    parts = []
    for mi, rows in enumerate(per_model):
        rows = [r for r in rows if len(r)]
        if not rows:
            continue
        d = np.concatenate(rows)
        if not early:
            merged = _merge(d, merge_opts, groups=True)
        else:
            sec = d[:, 6].astype(np.int64)
            pieces = []
            for s in np.unique(sec).tolist():
                idx = np.flatnonzero(sec == s)
                fut = early.get(s)
                res = fut.result()[mi] if fut is not None else _merge(d[idx], merge_opts, False)
                if len(res.cluster) != len(idx):
                    raise RuntimeError(
                        f"section {s} was merged early over {len(res.cluster)} rows but has "
                        f"{len(idx)} (pipeline bookkeeping bug)"
                    )
                pieces.append((idx, res))
            merged = combine_merges(len(d), pieces)
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
