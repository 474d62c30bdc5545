"""trtwsi.results and trtwsi._util.atomic: the Detections table, exporters, atomic no-clobber writes."""

from __future__ import annotations

import csv
import json
import os
import sys

import cv2
import numpy as np
import pytest

import trtwsi.results.results as results_mod
from trtwsi._util.atomic import atomic_write, write_bytes_atomic
from trtwsi.errors import MissingDependencyError, OutputExistsError, TrtwsiError
from trtwsi.merge import merge_detections
from trtwsi.results import (
    COLUMNS,
    CSV_COLUMNS,
    Detections,
    ExportError,
    Results,
    UnsupportedOutputFormatError,
    class_colors,
)
from trtwsi.slide.array import ArraySlide

SLIDE_W, SLIDE_H = 4000, 2000


def two_model_detections() -> Detections:
    a = Detections.from_arrays(
        [[100.5, 200.25, 180.75, 260.0], [2000.0, 1000.0, 2003.0, 1001.5], [10, 10, 10, 10]],
        np.array([0.9, 0.5, 0.123456789], dtype=np.float32),
        [0, 1, 1],
        section=[0, 1, -1],
        class_names=["metaphase", 'nucleus, "odd" name'],
        model_names=["meta-net"],
    )
    b = Detections.from_arrays(
        [[3000.0, 1500.0, 3400.0, 1900.0], [123456.789, 98765.4321, 123500.0, 98800.0]],
        np.array([0.7, 0.3], dtype=np.float32),
        [0, 0],
        section=2,
        class_names=["metaphase"],
        model_names=["other-net"],
    )
    return Detections.concat([a, b])


def make_results(det: Detections | None = None, **kw) -> Results:
    det = two_model_detections() if det is None else det
    base = {
        "detections": det,
        "timings": {"read": 1.5, "infer": 3.25, "merge": 0.25, "total": 5.0},
        "errors": [
            {
                "type": "TileReadError",
                "message": "tile (3, 4) failed",
                "level": 0,
                "tile": [3, 4],
                "region": [0, 0, 256, 256],
            }
        ],
        "slide": {
            "path": "/data/s.svs",
            "format": "svs",
            "width": SLIDE_W,
            "height": SLIDE_H,
            "mpp": 0.25,
            "levels": [],
            "properties": {},
        },
        "models": [
            {"name": "meta-net", "backend": "torch", "classes": ["metaphase", "nucleus"]},
            {"name": "other-net", "backend": "tensorrt", "classes": ["metaphase"]},
        ],
        "params": {"tile": 640, "overlap": 0.2, "mpp": None},
        "sections": [{"index": 0, "bbox": [0, 0, 100, 100], "area": 5000}],
        "n_tiles": 100,
    }
    base.update(kw)
    return Results(**base)


def no_temp_files(directory) -> bool:
    return not [p for p in os.listdir(directory) if p.endswith(".tmp")]


# ------------------------------------------------------------------------------------------
# Detections
# ------------------------------------------------------------------------------------------
def test_detections_columns_dtypes_and_numpy_layout():
    det = two_model_detections()
    assert len(det) == 5
    for c, dt in COLUMNS.items():
        assert det[c].dtype == dt, c
    arr = det.to_numpy()
    assert arr.shape == (5, 6) and arr.dtype == np.float64
    np.testing.assert_array_equal(arr[:, :4], det.boxes)
    np.testing.assert_array_equal(arr[:, 4], det.score.astype(np.float64))
    np.testing.assert_array_equal(arr[:, 5], det.class_id)
    np.testing.assert_array_equal(det.model, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(det.section, [0, 1, -1, 2, 2])
    with pytest.raises(ExportError, match="rows"):
        Detections(x1=[0, 1], y1=[0], x2=[1, 2], y2=[1, 2], score=[1, 1], class_id=[0, 0])


def test_class_names_single_and_multi_model():
    one = Detections.from_arrays(np.zeros((2, 4)), [0.5, 0.6], [1, 0], class_names=["a", "b"])
    assert one.class_names == ["a", "b"]
    np.testing.assert_array_equal(one.global_class_id, one.class_id)
    assert one.names().tolist() == ["b", "a"]
    det = two_model_detections()
    assert det.model_names == ["meta-net", "other-net"]
    assert det.model_class_names == [["metaphase", 'nucleus, "odd" name'], ["metaphase"]]
    assert det.class_names == ["metaphase", 'nucleus, "odd" name', "metaphase"]
    np.testing.assert_array_equal(det.global_class_id, [0, 1, 1, 2, 2])
    assert [det.class_names[g] for g in det.global_class_id] == det.names().tolist()
    unknown = Detections.from_arrays(np.zeros((1, 4)), [0.5], [7], class_names=["a"])
    assert unknown.names().tolist() == ["class7"]


def test_getitem_concat_and_records():
    det = two_model_detections()
    sub = det[det.score > 0.4]
    assert isinstance(sub, Detections) and len(sub) == 3
    assert sub.model_names == det.model_names
    np.testing.assert_array_equal(sub.score, det.score[det.score > 0.4])
    assert len(det[np.array([4, 0])]) == 2 and det[np.array([4, 0])].x1[0] == det.x1[4]
    assert len(det[1:3]) == 2 and len(det[2]) == 1
    with pytest.raises(IndexError):
        det[np.array([True, False])]
    with pytest.raises(KeyError, match="columns are"):
        det["nope"]
    # concat matches models by (name, classes) and remaps indices
    again = Detections.concat([det[3:], det[:3]])  # both parts list both models
    assert again.model_names == ["meta-net", "other-net"]
    np.testing.assert_array_equal(again.model, [1, 1, 0, 0, 0])
    assert again.names().tolist() == det[np.r_[3, 4, 0, 1, 2]].names().tolist()
    solo = Detections.from_arrays([[0, 0, 1, 1]], [0.5], [0], class_names=["x"], model_names=["s"])
    mixed = Detections.concat([solo, det])  # different model lists: appended and remapped
    assert mixed.model_names == ["s", "meta-net", "other-net"]
    np.testing.assert_array_equal(mixed.model, [0, 1, 1, 1, 2, 2])
    assert mixed.names().tolist() == ["x", *det.names().tolist()]
    recs = det.to_records()
    assert recs[0] == {
        "x1": 100.5,
        "y1": 200.25,
        "x2": 180.75,
        "y2": 260.0,
        "score": 0.9,
        "class_id": 0,
        "model": 0,
        "section": 0,
        "class_name": "metaphase",
        "model_name": "meta-net",
    }
    assert recs[4]["model_name"] == "other-net"
    assert Detections.concat([]).__len__() == 0


def test_to_pandas_optional(monkeypatch):
    det = two_model_detections()
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas -> ImportError
    with pytest.raises(MissingDependencyError, match="pandas"):
        det.to_pandas()
    monkeypatch.undo()
    pd = pytest.importorskip("pandas")
    df = det.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == 5
    assert df["class_name"].tolist() == det.names().tolist()


def test_from_merged_and_merge():
    rows = np.array(
        [
            [0, 0, 100, 100, 0.9, 0, 3],
            [60, 0, 100, 100, 0.6, 0, 3],
            [500, 500, 520, 520, 0.5, 1, 4],
        ],
        dtype=float,
    )
    merged = merge_detections(rows[:, :4], rows[:, 4], rows[:, 5].astype(int))

    class M:  # what trtwsi.engines.model.Model exposes
        name, names = "m", ["metaphase", "nucleus"]

    det = Detections.from_merged([(0, merged, rows)], models=[M()])
    assert len(det) == 2 and det.model_names == ["m"]
    np.testing.assert_array_equal(det.section, [3, 4])
    assert det.names().tolist() == ["metaphase", "nucleus"]
    empty = Detections.from_merged([], models=[{"name": "x", "classes": ["a"]}])
    assert len(empty) == 0 and empty.class_names == ["a"]
    # Detections.merge never merges across models
    both = Detections.concat(
        [
            det,
            Detections.from_arrays(
                [[0, 0, 100, 100]],
                [0.95],
                [0],
                class_names=["metaphase", "nucleus"],
                model_names=["n"],
            ),
        ]
    )
    assert len(both.merge()) == 3
    assert len(both.merge(class_aware=False)) == 3


def test_class_colors_are_stable_and_distinct():
    a = class_colors([["metaphase", "nucleus"], ["metaphase", "mitosis"]])
    b = class_colors([["metaphase", "nucleus"], ["metaphase", "mitosis"]])
    assert a == b and len(set(a.values())) == 3
    many = class_colors([[f"c{i}" for i in range(40)]])
    assert len(set(many.values())) > 30
    assert all(all(0 <= v <= 255 for v in c) for c in many.values())


# ------------------------------------------------------------------------------------------
# exporters
# ------------------------------------------------------------------------------------------
def test_geojson_is_qupath_shaped(tmp_path):
    res = make_results()
    det = res.detections
    path = res.save(tmp_path / "out.geojson")
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection"
    feats = doc["features"]
    assert len(feats) == len(det)
    colors = {}
    for i, f in enumerate(feats):
        assert f["type"] == "Feature"
        g = f["geometry"]
        assert g["type"] == "Polygon" and len(g["coordinates"]) == 1
        ring = g["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed
        x1, y1, x2, y2 = det.boxes[i]
        assert ring == [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]  # level-0 px, exact
        p = f["properties"]
        assert p["objectType"] == "detection"
        cls = p["classification"]
        assert cls["name"] == det.names()[i] == p["name"]
        assert len(cls["color"]) == 3 and all(isinstance(v, int) for v in cls["color"])
        colors.setdefault(cls["name"], tuple(cls["color"]))
        assert colors[cls["name"]] == tuple(cls["color"])  # one colour per class
        assert isinstance(p["measurements"], dict)
        conf = p["measurements"]["confidence"]
        assert isinstance(conf, float) and np.float32(conf) == det.score[i]
        assert p["model"] == det.model_names[det.model[i]]
        assert p["section"] == det.section[i]
    assert len(set(colors.values())) == len(colors) == 2
    assert feats[4]["geometry"]["coordinates"][0][0] == [123456.789, 98765.4321]


def test_csv_round_trip(tmp_path):
    res = make_results()
    det = res.detections
    path = res.save(tmp_path / "out.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(det)
    for i, r in enumerate(rows):
        for c in ("x1", "y1", "x2", "y2"):
            assert float(r[c]) == det[c][i]  # bit-exact
        assert float(r["width"]) == det.x2[i] - det.x1[i]
        assert float(r["height"]) == det.y2[i] - det.y1[i]
        assert np.float32(r["score"]) == det.score[i]
        assert int(r["class_id"]) == det.class_id[i]
        assert r["class_name"] == det.names()[i]  # commas and quotes survive
        assert r["model"] == det.model_names[det.model[i]]
        assert int(r["section"]) == det.section[i]


def test_json_round_trip(tmp_path):
    res = make_results(timings={"read": 1.5, "bad": float("nan"), "total": 5.0})
    path = res.save(tmp_path / "out.json")
    json.loads(path.read_text())  # strict JSON
    back = Results.load(path)
    for c in COLUMNS:
        np.testing.assert_array_equal(back.detections[c], res.detections[c])
        assert back.detections[c].dtype == COLUMNS[c]
    assert back.detections.model_names == res.detections.model_names
    assert back.detections.model_class_names == res.detections.model_class_names
    assert back.timings == {"read": 1.5, "bad": None, "total": 5.0}
    for attr in (
        "errors",
        "slide",
        "models",
        "params",
        "sections",
        "n_tiles",
        "created",
        "version",
    ):
        assert getattr(back, attr) == getattr(res, attr), attr
    with pytest.raises(UnsupportedOutputFormatError):
        Results.load(tmp_path / "out.csv")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ExportError, match="not a trtwsi results file"):
        Results.load(tmp_path / "other.json")


def test_overlay_png_draws_boxes(tmp_path):
    slide = ArraySlide(np.full((SLIDE_H, SLIDE_W, 3), 128, np.uint8))
    det = Detections.from_arrays(
        [
            [2000, 1000, 3000, 1800],  # big box, far from the legend
            [3600.0, 200.0, 3601.0, 201.0],  # 1 px at level 0: 0.25 px in the thumbnail
            [3200.0, 400.0, 3200.0, 400.0],  # zero-area box on a thumbnail pixel boundary
        ],
        np.array([0.9, 0.8, 0.7], np.float32),
        [0, 1, 1],
        class_names=["metaphase", "nucleus"],
    )
    res = make_results(det)
    path = res.save(tmp_path / "overlay.png", slide=slide, max_size=1000)
    img = cv2.imread(str(path))[..., ::-1]
    assert img.shape == (500, 1000, 3)  # the thumbnail's size
    colors = class_colors(det.model_class_names)
    # scale 0.25: the big box's left edge at x=500, rows 250..449
    edge = img[260:440, 500]
    assert (edge == colors["metaphase"]).all(axis=1).all()
    assert (img[350, 700] == 128).all()  # inside the box: thumbnail untouched
    assert (img[50, 900] == colors["nucleus"]).all()  # the tiny box is still a visible pixel
    assert (img[100, 800] == colors["nucleus"]).all()  # and so is the zero-area one
    assert (img[480:, 100:400] == 128).all()  # nothing drawn elsewhere
    assert not (img[5:20, 5:60] == 128).all()  # the legend
    jpg = res.save(tmp_path / "overlay.JPG", slide=slide, max_size=400)
    assert cv2.imread(str(jpg)).shape == (200, 400, 3)


def test_overlay_from_stored_thumbnail_and_missing_slide(tmp_path):
    det = Detections.from_arrays([[0, 0, 2000, 1000]], [0.9], [0], class_names=["a"])
    res = make_results(det)
    with pytest.raises(ExportError, match="needs the slide"):
        res.save(tmp_path / "o.png")
    assert not (tmp_path / "o.png").exists()
    res.thumbnail = np.full((100, 200, 3), 255, np.uint8)
    img = cv2.imread(str(res.save(tmp_path / "o.png")))
    assert img.shape == (100, 200, 3)
    assert not (img[10:40, 99] == 255).all()  # right edge of the box at x = 2000 * 0.05 - 1


def test_unknown_extension_is_a_typed_error(tmp_path):
    with pytest.raises(UnsupportedOutputFormatError) as ei:
        make_results().save(tmp_path / "out.xlsx")
    msg = str(ei.value)
    assert "'.xlsx'" in msg and ".geojson" in msg and ".csv" in msg and ".png" in msg
    assert isinstance(ei.value, TrtwsiError)
    assert not list(tmp_path.iterdir())


def test_empty_detections_give_valid_files(tmp_path):
    res = make_results(Detections.empty(class_names=["a", "b"], model_names=["m"]))
    doc = json.loads(res.save(tmp_path / "e.geojson").read_text())
    assert doc == {"type": "FeatureCollection", "features": []}
    lines = res.save(tmp_path / "e.csv").read_text().splitlines()
    assert lines == [",".join(CSV_COLUMNS)]
    back = Results.load(res.save(tmp_path / "e.json"))
    assert len(back.detections) == 0 and back.detections.class_names == ["a", "b"]
    slide = ArraySlide(np.full((200, 400, 3), 90, np.uint8))
    assert cv2.imread(str(res.save(tmp_path / "e.png", slide=slide))).shape == (200, 400, 3)


def test_summary_and_repr():
    res = make_results()
    s = res.summary()
    for needle in (
        "meta-net [torch]: 3",
        "other-net [tensorrt]: 2",
        "metaphase",
        "tiles: 100",
        "20.0 tiles/s",
        "errors: 1",
        "tile (3, 4) failed",
        "4000×2000",
    ):
        assert needle in s, (needle, s)
    r = repr(res)
    assert "5 detections" in r and "100 tiles" in r and "s.svs" in r


# ------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", ["geojson", "csv", "json"])
def test_failed_serializer_leaves_target_untouched(tmp_path, monkeypatch, ext):
    target = tmp_path / f"out.{ext}"
    target.write_text("ORIGINAL")

    def boom(*args, **kwargs):
        f = next(a for a in args if hasattr(a, "write"))
        f.write("partial garbage" * 1000)
        raise RuntimeError("serializer failed")

    name = {"geojson": "write_geojson", "csv": "write_csv", "json": None}[ext]
    if name:
        monkeypatch.setattr(results_mod, name, boom)
    else:
        monkeypatch.setattr(results_mod.json, "dump", boom)
    res = make_results()
    with pytest.raises(RuntimeError, match="serializer failed"):
        res.save(target, overwrite=True)
    assert target.read_text() == "ORIGINAL"
    with pytest.raises(RuntimeError):
        res.save(tmp_path / f"new.{ext}")
    assert not (tmp_path / f"new.{ext}").exists()
    assert no_temp_files(tmp_path)


def test_failed_image_encoding_leaves_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "o.png"
    target.write_bytes(b"ORIGINAL")
    monkeypatch.setattr(cv2, "imencode", lambda *a, **k: (False, None))
    res = make_results(thumbnail=np.zeros((10, 20, 3), np.uint8))
    with pytest.raises(ExportError, match="encode"):
        res.save(target, overwrite=True)
    assert target.read_bytes() == b"ORIGINAL" and no_temp_files(tmp_path)


def test_refuses_to_clobber_unless_overwrite(tmp_path):
    res = make_results()
    for ext in ("geojson", "csv", "json"):
        path = tmp_path / f"out.{ext}"
        res.save(path)
        first = path.read_bytes()
        path.write_text("EDITED BY HAND")
        with pytest.raises(OutputExistsError) as ei:
            res.save(path)
        assert str(path) in str(ei.value)
        assert "overwrite=True" in str(ei.value) and "--overwrite" in str(ei.value)
        assert isinstance(ei.value, FileExistsError)
        assert path.read_text() == "EDITED BY HAND"
        res.save(path, overwrite=True)
        assert path.read_bytes() == first
    res.thumbnail = np.zeros((10, 20, 3), np.uint8)
    res.save(tmp_path / "o.png")
    with pytest.raises(OutputExistsError):
        res.save(tmp_path / "o.png")
    assert no_temp_files(tmp_path)


def test_no_clobber_holds_against_a_file_appearing_mid_write(tmp_path):
    target = tmp_path / "race.csv"
    with pytest.raises(OutputExistsError), atomic_write(target) as f:
        f.write("ours")
        target.write_text("theirs")  # another writer wins the name meanwhile
    assert target.read_text() == "theirs" and no_temp_files(tmp_path)


def test_creates_missing_parents_and_sane_permissions(tmp_path):
    path = make_results().save(tmp_path / "a" / "b" / "out.json")
    assert path.exists()
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a temp file
    with pytest.raises(IsADirectoryError):
        write_bytes_atomic(tmp_path / "a", b"x", overwrite=True)
    with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "x", "a"):
        pass
