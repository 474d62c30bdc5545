"""Streaming writers of a Detections table: QuPath GeoJSON and CSV (level-0 px)."""

from __future__ import annotations

import csv
import json

import numpy as np

from trtwsi.errors import ExportError
from trtwsi.results.detections import Detections, _float32_text
from trtwsi.results.overlay import _color_of, class_colors

__all__ = ["CSV_COLUMNS", "write_csv", "write_geojson"]

#: Header of the CSV export (``model`` is the model's name there, not its index).
CSV_COLUMNS = (
    "x1",
    "y1",
    "x2",
    "y2",
    "width",
    "height",
    "score",
    "class_id",
    "class_name",
    "model",
    "section",
)


def write_geojson(det: Detections, f) -> None:
    """Write ``det`` to the text stream ``f`` as a QuPath-compatible GeoJSON FeatureCollection.

    Each detection is a Feature whose geometry is a Polygon: the closed ring ``(x1, y1), (x2,
    y1), (x2, y2), (x1, y2), (x1, y1)`` in level-0 px (QuPath's pixel coordinates of the full
    resolution image). ``properties``:

    - ``objectType: "detection"``, ``name`` (class name), ``classification: {"name", "color":
      [r, g, b]}`` (QuPath needs both keys to parse a classification object);
    - ``measurements`` (name → number): ``confidence`` (score), ``class_id`` (within its model),
      ``model_index`` and ``section`` (index, -1 if none);
    - ``metadata`` (name → string): ``model`` (the model's name);
    - ``model`` (name) and ``section`` at the top level too, for tools reading plain GeoJSON.

    What QuPath keeps on import (``parseObject`` in qupath-core's ``qupath/lib/io/
    QuPathTypeAdapters.java``, 0.4–0.6): ``name``, ``color``, ``classification``, ``isLocked``,
    ``isMissing``, ``measurements``, ``metadata``, ``objectType``, ``childObjects``; any other
    property (our top-level ``model``, ``section``) is dropped. Measurements are read as a
    name → number object since 0.4 (0.4 needs every value to be a JSON number; 0.5+ also
    accepts "NaN"/"Inf" strings). ``metadata`` is kept on every object from 0.5 (string
    values); QuPath 0.4 keeps it only on TMA cores, so there the model survives as
    ``model_index`` alone. A ``:`` in a class name makes QuPath read a derived class.
    """
    n = len(det)
    bad = ~(
        np.isfinite(det.x1) & np.isfinite(det.y1) & np.isfinite(det.x2) & np.isfinite(det.y2)
    ) | ~np.isfinite(det.score)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ExportError(
            f"detection {i} has a non-finite coordinate or score "
            f"({det.to_numpy()[i].tolist()}); GeoJSON has no NaN/Infinity"
        )
    colors = class_colors(det.model_class_names)
    names = det.names()
    # constant part of the properties per (model, class name)
    frag: dict[tuple[int, str], str] = {}
    for m, nm in set(zip(det.model.tolist(), names.tolist(), strict=True)):
        c = list(_color_of(nm, colors))
        frag[(m, nm)] = (
            '"objectType":"detection","name":'
            + json.dumps(nm)
            + ',"classification":{"name":'
            + json.dumps(nm)
            + ',"color":'
            + json.dumps(c)
            + '},"model":'
            + json.dumps(det.model_names[m])
        )
    f.write('{"type":"FeatureCollection","features":[')
    x1, y1, x2, y2 = (getattr(det, c).tolist() for c in ("x1", "y1", "x2", "y2"))
    scores = _float32_text(det.score)
    models, sections, nms = det.model.tolist(), det.section.tolist(), names.tolist()
    class_ids = det.class_id.tolist()
    meta = [',"metadata":{"model":' + json.dumps(m) + "}}}" for m in det.model_names]
    for i in range(n):
        a, b, c, d = repr(x1[i]), repr(y1[i]), repr(x2[i]), repr(y2[i])
        ring = f"[[{a},{b}],[{c},{b}],[{c},{d}],[{a},{d}],[{a},{b}]]"
        f.write(
            ("," if i else "")
            + '\n{"type":"Feature","geometry":{"type":"Polygon","coordinates":['
            + ring
            + ']},"properties":{'
            + frag[(models[i], nms[i])]
            + f',"section":{sections[i]},"measurements":{{"confidence":{scores[i]},'
            f'"class_id":{class_ids[i]},"model_index":{models[i]},"section":{sections[i]}}}'
            + meta[models[i]]
        )
    f.write("\n]}\n")


def write_csv(det: Detections, f) -> None:
    """Write ``det`` to the text stream ``f`` (opened with ``newline=""``) as CSV: the header
    :data:`CSV_COLUMNS`, then one row per detection (level-0 px; ``model`` = model name;
    floats in their shortest exact text, so they read back bit-identical)."""
    w = csv.writer(f, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    if not len(det):
        return
    x1, y1, x2, y2 = (getattr(det, c) for c in ("x1", "y1", "x2", "y2"))
    w.writerows(
        zip(
            x1.tolist(),
            y1.tolist(),
            x2.tolist(),
            y2.tolist(),
            (x2 - x1).tolist(),
            (y2 - y1).tolist(),
            _float32_text(det.score),
            det.class_id.tolist(),
            det.names().tolist(),
            det.model_name_per_row().tolist(),
            det.section.tolist(),
            strict=True,
        )
    )
