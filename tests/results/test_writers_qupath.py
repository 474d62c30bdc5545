"""trtwsi.results.writers.write_geojson: the Feature shape QuPath 0.4–0.6 imports.

What QuPath reads (qupath/qupath, qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java,
``PathObjectTypeAdapter.parseObject``, tags v0.4.4, v0.5.1, v0.6.0): the Feature's ``id``,
``geometry`` and ``nucleusGeometry``, and from ``properties`` only ``name``, ``color``,
``classification``, ``isMissing``, ``isLocked``, ``measurements``, ``metadata``, ``objectType``
(aliases ``object_type``, ``type``) and ``childObjects``/``children``. Every other property is
dropped. ``classification`` is parsed by ``GsonTools.PathClassTypeAdapter`` and needs ``name``
(or ``names``) and ``color`` (an int array). ``measurements`` is a name → number object
(``MeasurementListTypeAdapter``). ``metadata`` (string values) is set on every object from 0.5;
0.4 only keeps it on TMA cores (``TMACoreObject implements MetadataStore``).
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from trtwsi.results import Detections
from trtwsi.results.writers import write_geojson

#: properties QuPath's GeoJSON importer reads; all others are ignored on import.
QUPATH_PROPERTIES = {
    "name",
    "color",
    "classification",
    "isMissing",
    "isLocked",
    "measurements",
    "metadata",
    "objectType",
    "childObjects",
}
#: objectType values QuPath maps to a PathObject class (anything else becomes an annotation).
QUPATH_OBJECT_TYPES = {"detection", "annotation", "cell", "tile", "tmaCore", "root"}


def detections() -> Detections:
    a = Detections.from_arrays(
        [[100.5, 200.25, 180.75, 260.0], [2000.0, 1000.0, 2003.0, 1001.5]],
        np.array([0.9, 0.123456789], dtype=np.float32),
        [0, 1],
        section=[3, -1],
        class_names=["metaphase", "nucleus"],
        model_names=["meta-net"],
    )
    b = Detections.from_arrays(
        [[123456.789, 98765.4321, 123500.0, 98800.0]],
        np.array([0.7], dtype=np.float32),
        [0],
        section=2,
        class_names=["mitosis"],
        model_names=["other-net"],
    )
    return Detections.concat([a, b])


def features(det: Detections) -> list[dict]:
    f = io.StringIO()
    write_geojson(det, f)
    doc = json.loads(f.getvalue())
    assert doc["type"] == "FeatureCollection"
    return doc["features"]


def qupath_import(props: dict) -> dict:
    """The properties that survive QuPath's import (what parseObject reads)."""
    return {k: v for k, v in props.items() if k in QUPATH_PROPERTIES}


def is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def test_features_have_the_shape_qupath_reads():
    det = detections()
    feats = features(det)
    assert len(feats) == len(det)
    for i, f in enumerate(feats):
        assert f["type"] == "Feature"
        assert "id" not in f  # QuPath gives each object a fresh UUID
        g = f["geometry"]
        assert g["type"] == "Polygon" and len(g["coordinates"]) == 1
        ring = g["coordinates"][0]
        x1, y1, x2, y2 = det.boxes[i]
        assert ring == [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]  # closed, level-0 px
        p = f["properties"]
        assert p["objectType"] in QUPATH_OBJECT_TYPES and p["objectType"] == "detection"
        cls = p["classification"]
        assert isinstance(cls["name"], str) and cls["name"] == det.names()[i]
        assert ":" not in cls["name"]  # QuPath would split it into a derived class
        c = cls["color"]
        assert len(c) == 3 and all(type(v) is int and 0 <= v <= 255 for v in c)
        assert isinstance(p["name"], str)
        m = p["measurements"]
        assert isinstance(m, dict) and m and all(is_number(v) for v in m.values())
        md = p["metadata"]
        assert isinstance(md, dict) and all(isinstance(v, str) for v in md.values())
        assert all(isinstance(k, str) for k in (*m, *md))


def test_model_section_score_and_class_survive_the_import():
    det = detections()
    for i, f in enumerate(features(det)):
        kept = qupath_import(f["properties"])
        m = kept["measurements"]
        assert np.float32(m["confidence"]) == det.score[i]  # float32 exact
        assert m["class_id"] == det.class_id[i] and type(m["class_id"]) is int
        assert m["section"] == det.section[i] and type(m["section"]) is int
        assert m["model_index"] == det.model[i] and type(m["model_index"]) is int
        assert kept["metadata"] == {"model": det.model_names[det.model[i]]}  # QuPath >= 0.5
        assert kept["classification"]["name"] == det.names()[i]
    # section -1 (none) is a number too; the two models keep their own names
    sec = [f["properties"]["measurements"]["section"] for f in features(det)]
    assert sec == [3, -1, 2]
    md = [f["properties"]["metadata"]["model"] for f in features(det)]
    assert md == ["meta-net", "meta-net", "other-net"]


def test_plain_geojson_keys_are_kept_for_other_tools():
    det = detections()
    for i, f in enumerate(features(det)):
        p = f["properties"]
        assert p["model"] == det.model_names[det.model[i]]
        assert p["section"] == det.section[i]
        assert p["name"] == det.names()[i]
        assert set(p) - QUPATH_PROPERTIES == {"model", "section"}  # the only keys QuPath drops


@pytest.mark.parametrize("model_names", [None, ['a"quoted" model, ünïcode']])
def test_single_model_and_odd_model_names(model_names):
    det = Detections.from_arrays(
        [[0.0, 0.0, 10.0, 10.0]],
        np.array([0.5], dtype=np.float32),
        [0],
        class_names=["cell"],
        model_names=model_names,
    )
    (f,) = features(det)
    assert f["properties"]["metadata"]["model"] == det.model_names[0]
    assert f["properties"]["measurements"]["model_index"] == 0
