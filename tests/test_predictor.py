"""End to end on the CPU with the bundled demo models and held-out synthetic slides (seeds < 1000;
the demo models were trained on seeds >= 1000, see trtwsi/models/demo-*.json)."""


import numpy as np
import pytest

import trtwsi
from trtwsi._util.resources import bundled_models_dir
from trtwsi.errors import OutputExistsError, TrtwsiError
from trtwsi.ops.boxes import overlap_matrix
from trtwsi.results.evaluate import precision_recall
from trtwsi.synthetic import Scene, make_array, make_slide

MODELS = bundled_models_dir()
NMS_MODEL = MODELS / "demo-yolo11n.pt"
E2E_MODEL = MODELS / "demo-yolo26n.pt"


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    path = tmp_path_factory.mktemp("heldout") / "heldout.tif"
    gt = make_slide(path, 8000, 6000, seed=7)
    return path, gt


@pytest.mark.parametrize("weights", [NMS_MODEL, E2E_MODEL], ids=["yolo11n-nms", "yolo26n-end2end"])
def test_accuracy_on_heldout_slide(heldout, weights):
    path, gt = heldout
    res = trtwsi.Predictor(path, [trtwsi.Model(weights)], batch=4).run()
    det = res.detections
    assert len(det) > 100
    scores = precision_recall(det.boxes, det.score, det.class_id, gt.boxes, gt.class_names)
    for s in scores:
        assert s.tp + s.fn > 0, f"no ground truth of class {s.name}"
        assert s.precision >= 0.9 and s.recall >= 0.9, s.as_dict()
    assert res.timings["total"] > 0 and res.timings["infer"] > 0
    assert res.n_tiles > 0 and res.errors == []
    # every detection lies in a tissue section's box and is tagged with it
    for i, sec in enumerate(res.sections):
        x, y, w, h = sec["bbox"]
        sel = det.section == i
        b = det.boxes[sel]
        assert np.all(
            (b[:, 0] >= x - 1)
            & (b[:, 2] <= x + w + 1)
            & (b[:, 1] >= y - 1)
            & (b[:, 3] <= y + h + 1)
        )


def test_objects_across_tile_seams_reported_once():
    # Tiles of 640 with overlap 0.2 start at 0, 512, 1024 ... from the region origin: put objects on
    # the overlap bands, on tile edges and at four-tile corners, inside tissue.
    scene = Scene(2600, 2000, seed=11)
    seams = []
    for sx, sy, sw, sh in scene.section_bboxes:
        for gx in (576, 640, 1088, 1152, 1600, 1664, 2112, 2176):
            for gy in (576, 640, 1088, 1152, 1600, 1664):
                if sx + 60 < gx < sx + sw - 60 and sy + 60 < gy < sy + sh - 60:
                    seams.append((gx, gy, 0))
    seams = seams[:16]
    assert len(seams) >= 4
    img, gt = make_array(2600, 2000, seed=11, extra_objects=seams)
    res = trtwsi.Predictor(img, [trtwsi.Model(NMS_MODEL)], batch=4).run(region=(0, 0, 2600, 2000))
    det = res.detections
    seam_gt = np.array(
        [
            b
            for b in gt.boxes
            if any(
                abs((b[0] + b[2]) / 2 - x) < 2 and abs((b[1] + b[3]) / 2 - y) < 2
                for x, y, _ in seams
            )
        ]
    )
    assert len(seam_gt) == len(seams)
    iou = overlap_matrix(seam_gt[:, :4], det.boxes)
    hits = (iou > 0.3).sum(axis=1)
    assert np.all(hits == 1), f"seam objects reported {hits.tolist()} times"
    scores = precision_recall(det.boxes, det.score, det.class_id, gt.boxes, gt.class_names)
    assert all(s.precision >= 0.95 for s in scores), [s.as_dict() for s in scores]


def test_no_tissue_gives_clean_empty_results(tmp_path):
    blank = np.full((1500, 2000, 3), 246, np.uint8)
    res = trtwsi.Predictor(blank, [trtwsi.Model(NMS_MODEL)]).run()
    assert len(res.detections) == 0 and res.n_tiles == 0 and res.sections == []
    out = res.save(tmp_path / "empty.geojson")
    assert '"features"' in out.read_text()


def test_bad_arguments_are_typed_errors(tmp_path):
    img, _ = make_array(1200, 900, seed=3)
    p = trtwsi.Predictor(img, [trtwsi.Model(NMS_MODEL)])
    with pytest.raises(TrtwsiError, match="section 99 does not exist"):
        p.run(section=99)
    with pytest.raises(TrtwsiError, match="either section= or region="):
        p.run(section=0, region=(0, 0, 10, 10))
    with pytest.raises(TrtwsiError, match="at least one model"):
        trtwsi.Predictor(img, [])
    res = p.run(region=(0, 0, 700, 700))
    res.save(tmp_path / "r.csv")
    with pytest.raises(OutputExistsError):
        res.save(tmp_path / "r.csv")


def test_cli_info_predict_and_clobber(tmp_path, capsys):
    from trtwsi.app.cli import main

    path = tmp_path / "s.tif"
    make_slide(path, 2400, 1800, seed=21, n_sections=2)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sections 2" in out and "0.5000 µm/px" in out
    geo = tmp_path / "s.geojson"
    args = [
        "predict",
        str(path),
        "--model",
        str(NMS_MODEL),
        "--out",
        str(geo),
        "--also",
        "csv",
        "--no-progress",
    ]
    assert main(args) == 0
    assert geo.exists() and geo.with_suffix(".csv").exists()
    assert main(args) == 1  # refuses to clobber
    assert "overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["predict", str(tmp_path / "missing.tif"), "--model", str(NMS_MODEL)]) == 1
    assert "not found" in capsys.readouterr().err
    assert (
        main(["eval", str(path), "--model", str(NMS_MODEL), "--no-progress", "--min-score", "0.9"])
        == 0
    )
