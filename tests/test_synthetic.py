"""trtwsi.synthetic: determinism, region independence, ground truth, TIFF/SVS writers."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import tifffile

from trtwsi import synthetic
from trtwsi.synthetic import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    GLASS_RGB,
    GroundTruth,
    Scene,
    make_array,
    make_slide,
    sidecar_path,
)


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene(3000, 2200, seed=3)


def _luma(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


# --- determinism -------------------------------------------------------------------------------
def test_same_seed_same_scene(scene):
    other = Scene(3000, 2200, seed=3)
    np.testing.assert_array_equal(other.boxes, scene.boxes)
    assert other.section_bboxes == scene.section_bboxes
    x, y, _, _ = scene.section_bboxes[0]
    np.testing.assert_array_equal(other.render(x, y, 700, 500), scene.render(x, y, 700, 500))


def test_different_seeds_differ(scene):
    other = Scene(3000, 2200, seed=4)
    assert other.section_bboxes != scene.section_bboxes
    assert len(other.boxes) != len(scene.boxes) or not np.array_equal(other.boxes, scene.boxes)
    a, b = scene.render(0, 0, 3000, 2200), other.render(0, 0, 3000, 2200)
    assert np.mean(a != b) > 0.2


def test_render_is_independent_of_how_the_slide_is_cut(scene):
    # a region over tissue, objects and a tissue edge, rendered whole (> one internal block) ...
    x0, y0, w, h = scene.section_bboxes[0]
    x0, y0, w, h = x0 - 150, y0 + 100, 1500, 700
    whole = scene.render(x0, y0, w, h)
    assert len(scene.boxes_in(x0, y0, w, h, min_visible=1.0)) >= 5  # really has objects
    assert (_luma(whole) > 235).mean() > 0.02  # ... and glass
    # ... equals the same region assembled from irregular pieces (cuts through objects)
    xs, ys = [0, 1, 333, 517, 1024, 1111, w], [0, 77, 129, 256, 300, 699, h]
    pieces = np.zeros_like(whole)
    for i in range(len(ys) - 1):
        for j in range(len(xs) - 1):
            pieces[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] = scene.render(
                x0 + xs[j], y0 + ys[i], xs[j + 1] - xs[j], ys[i + 1] - ys[i]
            )
    np.testing.assert_array_equal(pieces, whole)
    # and a cold scene (no cached sprites) agrees with a warm one
    np.testing.assert_array_equal(
        Scene(3000, 2200, seed=3).render(x0 + 5, y0 + 7, 300, 200), whole[7:207, 5:305]
    )


def test_render_outside_the_slide_is_glass(scene):
    img = scene.render(-300, -200, 200, 150)
    assert img.shape == (150, 200, 3) and img.dtype == np.uint8
    assert np.abs(img.reshape(-1, 3).mean(0) - np.array(GLASS_RGB)).max() < 1.5
    # crossing the border: the inside part equals a render of the inside alone
    np.testing.assert_array_equal(
        scene.render(-50, -40, 300, 200)[40:, 50:], scene.render(0, 0, 250, 160)
    )


# --- ground truth ------------------------------------------------------------------------------
def test_boxes_are_inside_tissue(scene):
    assert scene.boxes.dtype == np.float32 and scene.boxes.shape[1] == 5
    assert len(scene.boxes) > 50
    for x1, y1, x2, y2, _ in scene.boxes:
        inside = [
            sx <= x1 and sy <= y1 and x2 <= sx + sw and y2 <= sy + sh
            for sx, sy, sw, sh in scene.section_bboxes
        ]
        assert sum(inside) == 1, (x1, y1, x2, y2)
        a = scene.tissue_alpha(int(x1), int(y1), int(np.ceil(x2 - x1)), int(np.ceil(y2 - y1)))
        assert a.min() > 0.9, (x1, y1, x2, y2, a.min())


def test_both_classes_at_default_density():
    s = Scene(4000, 3000, seed=0)
    cls = s.boxes[:, 4].astype(int)
    n_nuc, n_met = int((cls == 0).sum()), int((cls == 1).sum())
    assert n_nuc > 0 and n_met > 0
    # densities are per mm² of tissue (0.25 µm² per px at 0.5 µm/px)
    tissue_mm2 = sum(s.section_areas) * 0.25e-6
    assert n_nuc / tissue_mm2 == pytest.approx(500, rel=0.2)
    assert n_met / tissue_mm2 == pytest.approx(10, rel=0.5)
    assert s.class_names == CLASS_NAMES == ["nucleus", "metaphase"]


def test_nuclei_do_not_overlap_much(scene):
    b = scene.boxes[scene.boxes[:, 4] == 0, :4].astype(np.float64)
    ix = np.clip(
        np.minimum(b[:, None, 2], b[None, :, 2]) - np.maximum(b[:, None, 0], b[None, :, 0]), 0, None
    )
    iy = np.clip(
        np.minimum(b[:, None, 3], b[None, :, 3]) - np.maximum(b[:, None, 1], b[None, :, 1]), 0, None
    )
    inter = ix * iy
    np.fill_diagonal(inter, 0)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ios = inter / np.minimum(area[:, None], area[None, :])
    assert ios.max() < 0.5


def test_object_sizes_scale_with_mpp():
    def sizes(mpp):
        s = Scene(4000, 3000, seed=1, mpp=mpp)
        b = s.boxes
        return np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])[b[:, 4] == 0])

    s05 = sizes(0.5)
    assert 20 <= s05 <= 40  # ~20-40 px nuclei at 0.5 µm/px
    assert sizes(0.25) == pytest.approx(2 * s05, rel=0.15)


@pytest.mark.parametrize("cls", [0, 1])
def test_box_matches_drawn_pixels(cls):
    """On glass (no tissue), the dark pixels of an object fill its ground-truth box."""
    s = Scene(400, 400, seed=5, n_sections=0, extra_objects=[(200.3, 190.7, cls)])
    assert len(s.boxes) == 1 and s.boxes[0, 4] == cls
    x1, y1, x2, y2, _ = s.boxes[0]
    img = s.render(0, 0, 400, 400)
    dark = _luma(img) < 200
    ys, xs = np.nonzero(dark)
    assert abs(xs.min() - x1) <= 1.0 and abs(xs.max() + 1 - x2) <= 1.0
    assert abs(ys.min() - y1) <= 1.0 and abs(ys.max() + 1 - y2) <= 1.0
    if cls == 0:  # a nucleus is centred where asked
        assert (x1 + x2) / 2 == pytest.approx(200.3, abs=1e-3)
        assert (y1 + y2) / 2 == pytest.approx(190.7, abs=1e-3)
    else:  # a spread: many separate dark rods within a 60-120 px disc
        import cv2

        n, _ = cv2.connectedComponents(dark.astype(np.uint8))
        assert n - 1 >= 5  # separate chromosomes (a nucleus is one blob)
        box_area = (x2 - x1) * (y2 - y1)
        assert dark.sum() < 0.6 * box_area  # sparse, unlike a filled ellipse (~78 %)
        assert 30 <= max(x2 - x1, y2 - y1) <= 120


def test_nuclei_are_darker_than_their_surroundings(scene):
    img = _luma(scene.render(0, 0, scene.width, scene.height))
    inner, ring = [], []
    for x1, y1, x2, y2, _ in scene.boxes[scene.boxes[:, 4] == 0][:100]:
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        inner.append(img[cy - 3 : cy + 4, cx - 3 : cx + 4].mean())
        ring.append(img[int(y1) - 6 : int(y2) + 6, int(x2) + 3 : int(x2) + 6].mean())
    assert np.mean(inner) < np.mean(ring) - 40


def test_extra_objects_are_placed_exactly_and_clear_their_neighbourhood():
    base = Scene(3000, 2200, seed=3)
    x1, y1, x2, y2, _ = base.boxes[5]
    cx, cy = float(x1 + x2) / 2, float(y1 + y2) / 2  # right on top of a generated object
    s = Scene(3000, 2200, seed=3, extra_objects=[(cx, cy, 1), (cx + 200.5, cy, 0)])
    extra = s.boxes[-2:]
    assert list(extra[:, 4]) == [1.0, 0.0]
    assert (extra[1, 0] + extra[1, 2]) / 2 == pytest.approx(cx + 200.5, abs=1e-3)
    # no generated object touches an extra one
    gen = s.boxes[:-2]
    for ex in extra:
        hit = (gen[:, 0] < ex[2]) & (gen[:, 2] > ex[0]) & (gen[:, 1] < ex[3]) & (gen[:, 3] > ex[1])
        assert not hit.any()
    assert len(gen) < len(base.boxes)


def test_boxes_in(scene):
    x1, y1, x2, y2, _ = scene.boxes[0]
    mid = (x1 + x2) / 2
    # region whose left edge cuts the box in half
    left_half = scene.boxes_in(mid, y1 - 50, 400, (y2 - y1) + 100, min_visible=0.4)
    assert any(np.array_equal(b, scene.boxes[0]) for b in left_half)
    assert not any(
        np.array_equal(b, scene.boxes[0])
        for b in scene.boxes_in(mid, y1 - 50, 400, (y2 - y1) + 100, min_visible=0.6)
    )
    clipped = scene.boxes_in(mid, y1 - 50, 400, (y2 - y1) + 100, min_visible=0.4, clip=True)
    assert clipped[:, 0].min() >= mid
    assert len(scene.boxes_in(-500, -500, 100, 100)) == 0
    everything = scene.boxes_in(0, 0, scene.width, scene.height, min_visible=1.0)
    np.testing.assert_array_equal(everything, scene.boxes)


def test_blank_scene_and_tiny_scene():
    s = Scene(2000, 1500, seed=9, n_sections=0)
    assert len(s.boxes) == 0 and s.section_bboxes == []
    img = s.render(0, 0, 2000, 1500)
    assert np.abs(img.reshape(-1, 3).mean(0) - np.array(GLASS_RGB)).max() < 1.0
    assert 0.5 < img.std() < 4
    tiny = Scene(64, 64, seed=0)  # used for class names by the training script: must not fail
    assert tiny.render(0, 0, 64, 64).shape == (64, 64, 3)


def test_ground_truth_round_trip(tmp_path, scene):
    gt = scene.ground_truth()
    p = gt.save(tmp_path / "x.gt.json")
    back = GroundTruth.load(p)
    np.testing.assert_array_equal(back.boxes, gt.boxes)  # exact: float32 -> JSON -> float32
    assert back.boxes.dtype == np.float32
    assert back.class_names == gt.class_names and back.sections == gt.sections
    assert (back.width, back.height, back.mpp, back.seed) == (3000, 2200, 0.5, 3)
    assert back.version == GENERATOR_VERSION
    assert back.counts() == gt.counts() and sum(gt.counts().values()) == len(gt.boxes)


def test_make_array(scene):
    img, gt = make_array(600, 400, seed=3, n_sections=1)
    assert img.shape == (400, 600, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, Scene(600, 400, seed=3, n_sections=1).render(0, 0, 600, 400))
    assert gt.width == 600 and len(gt.sections) == 1


# --- writers -----------------------------------------------------------------------------------
def test_make_slide_pyramidal_tiff(tmp_path):
    path = tmp_path / "s.tif"
    gt = make_slide(path, 2400, 1800, seed=2, mpp=0.25, tile=256, quality=90)
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == 1  # levels are SubIFDs of page 0
        p0 = tf.pages[0]
        assert p0.is_tiled and (p0.tilewidth, p0.tilelength) == (256, 256)
        assert p0.compression == tifffile.COMPRESSION.JPEG
        assert p0.shape == (1800, 2400, 3)
        assert p0.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = p0.tags["XResolution"].value
        assert num / den == pytest.approx(1e4 / 0.25)  # px per cm
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(1800, 2400, 3), (450, 600, 3)]
        sub = levels[1].pages[0]
        num, den = sub.tags["XResolution"].value
        assert num / den == pytest.approx(1e4 / 0.25 / 4)
        lvl0 = levels[0].asarray()
        lvl1 = levels[1].asarray()
    truth = Scene(2400, 1800, seed=2, mpp=0.25).render(0, 0, 2400, 1800)
    assert _psnr(lvl0, truth) > 35
    assert np.abs(lvl0.astype(int) - truth).mean() < 3
    import cv2

    assert _psnr(lvl1, cv2.resize(truth, (600, 450), interpolation=cv2.INTER_AREA)) > 35
    # the sidecar
    side = sidecar_path(path)
    assert side == tmp_path / "s.gt.json" and side.exists()
    back = GroundTruth.load(side)
    np.testing.assert_array_equal(back.boxes, gt.boxes)
    assert back.mpp == 0.25 and back.params["flavor"] == "tiff"
    assert json.loads(side.read_text())["generator"] == "trtwsi.synthetic"


def test_make_slide_svs(tmp_path):
    path = tmp_path / "s.svs"
    make_slide(path, 9000, 2500, seed=4, flavor="svs", tile=240, quality=80)
    with tifffile.TiffFile(path) as tf:
        desc = tf.pages[0].description
        assert desc.startswith("Aperio Image Library")
        assert "|MPP = 0.5|" in desc + "|" and "|AppMag = 20|" in desc
        assert tf.is_svs
        shapes = [(p.shape, p.is_tiled) for p in tf.pages]
        # level 0, thumbnail (stripped), then the levels as consecutive tiled pages
        assert shapes[0] == ((2500, 9000, 3), True)
        assert not shapes[1][1] and max(shapes[1][0][:2]) <= 768
        assert [s for s, tiled in shapes[2:]] == [(625, 2250, 3), (157, 563, 3)]
        assert all(tiled for _, tiled in shapes[2:])
        assert tf.pages[0].tilewidth == 240
        assert [lv.shape[-3:] for lv in tf.series[0].levels] == [
            (2500, 9000, 3),
            (625, 2250, 3),
            (157, 563, 3),
        ]


@pytest.mark.parametrize("flavor", ["tiff", "svs"])
def test_make_slide_levels_argument(tmp_path, flavor):
    for levels, shapes in (
        (1, [(1000, 1200, 3)]),
        (3, [(1000, 1200, 3), (250, 300, 3), (63, 75, 3)]),
    ):
        path = tmp_path / f"l{levels}.{flavor}"
        make_slide(path, 1200, 1000, seed=1, flavor=flavor, levels=levels)
        with tifffile.TiffFile(path) as tf:
            assert [lv.shape[-3:] for lv in tf.series[0].levels] == shapes
            if flavor == "svs":  # the thumbnail page is there even without lower levels
                assert not tf.pages[1].is_tiled and tf.pages[1].shape[:2] == (250, 300)


def test_open_slide_reads_what_make_slide_wrote(tmp_path):
    from trtwsi import open_slide

    for flavor, name in (("tiff", "a.tif"), ("svs", "a.svs")):
        make_slide(tmp_path / name, 2600, 2100, seed=6, flavor=flavor, mpp=0.5)
        with open_slide(tmp_path / name) as slide:
            assert slide.mpp == pytest.approx(0.5)
            assert (slide.width, slide.height) == (2600, 2100)
            assert [lv.downsample for lv in slide.levels] == pytest.approx([1, 2600 / 650])
            truth = Scene(2600, 2100, seed=6).render(700, 500, 600, 400)
            assert _psnr(slide.read_region(700, 500, 600, 400), truth) > 35


def test_make_slide_memory_is_bounded(tmp_path, monkeypatch):
    """Level 0 is never held whole: peak memory hardly grows with the slide's height, and no
    render request is larger than one strip of file tiles."""
    biggest = []
    real = Scene.render

    def spy(self, x, y, w, h):
        biggest.append(w * h)
        return real(self, x, y, w, h)

    monkeypatch.setattr(Scene, "render", spy)
    # the sprite cache is bounded separately (SPRITE_CACHE_BYTES); measure the writer alone
    monkeypatch.setattr(synthetic.scene, "SPRITE_CACHE_BYTES", 0)
    Scene(64, 64, seed=12)  # textures are cached per seed: keep them out of the measurement
    peaks = []
    # heights 8x apart: the small slide's own peak varies by a few MB between runs (the render
    # and encoder threads' timing; 32.8-38.7 MB measured), which must stay small against the
    # growth tested (a 2000 vs 8000 pair once failed on that variance alone, on a loaded machine)
    for h in (2000, 16000):
        tracemalloc.start()
        make_slide(tmp_path / f"m{h}.tif", 2048, h, seed=12, threads=2)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    growth = peaks[1] - peaks[0]
    level0_growth = 2048 * 14000 * 3
    # level 1 alone grows by 1/16 of level 0; holding level 0 would grow by 100 %
    assert growth < 0.25 * level0_growth, (peaks, level0_growth)
    assert max(biggest) <= 1024 * 256


def test_make_slide_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="tile"):
        make_slide(tmp_path / "x.tif", 500, 500, tile=100)
    with pytest.raises(ValueError, match="flavor"):
        make_slide(tmp_path / "x.tif", 500, 500, flavor="ndpi")
    with pytest.raises(ValueError, match="mpp"):
        Scene(100, 100, mpp=0)
