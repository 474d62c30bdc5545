"""Acceptance: for the same model and tile, trtwsi's detections match ``ultralytics.YOLO.predict``
— same boxes within 1 px, same classes, scores within 1e-3 (fp32, CPU) — for both head kinds.

Ours: Model + TorchEngine + reference ops (preprocess → infer → postprocess → scale_to_slide),
boxes in tile px. Theirs: ``YOLO(path).predict(tile_bgr, imgsz=..., rect=False)`` with its
defaults otherwise (e.g. channels_last on the CPU), boxes in tile px.

Models: random-init yolo11n (``"nms"`` head), yolo26n through its end-to-end head (ultralytics
``nms=False``), the same yolo26n through its one-to-many head (``head="nms"``, ultralytics'
default for YOLO26), plus every bundled ``trtwsi/models/*.pt`` (trained demo models).

What is compared, and how strictly:

* identical model inputs — a tile of exactly ``imgsz`` (no resize), tiles downscaled by exactly 2
  (2x2-replicated content, so cv2 and our bilinear agree exactly), and ultralytics' own
  letterboxed input fed to our engine + post-processing: **every** detection must pair up
  within the tolerances (only fp32 noise of two conv layouts differs);
* our own preprocessing at arbitrary resize ratios (inputs differ by < 1/255 per pixel, cv2's
  fixed point vs exact bilinear): detections must pair up within the tolerances, except
  discrete flips that input noise can cause — a score within 1e-3 of ``conf``, or NMS choosing
  the other of two near-equal overlapping candidates. Each unpaired detection must be such a
  flip, and they may be at most 25 % of the detections.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import synth_rgb
from tests.ops.test_reference import ultralytics_input
from trtwsi._util.resources import bundled_models_dir
from trtwsi.engines.model import Model
from trtwsi.ops import reference as ref

EXTRA_MODELS = sorted(bundled_models_dir().glob("*.pt"))

BOX_TOL = 1.0  # px, tile frame, max |corner difference|
SCORE_TOL = 1e-3
FLIP_IOU_MARGIN = 0.05  # an NMS flip: the other side kept a same-class box with IoU > iou - this
MAX_FLIP_FRACTION = 0.25
MIN_COMPARED = 20  # synthetic models must yield more detections than this per test

CASES = [
    pytest.param(("yolo11n.yaml", None), id="yolo11n-nms"),
    pytest.param(("yolo26n.yaml", "end2end"), id="yolo26n-end2end"),
    pytest.param(("yolo26n.yaml", "nms"), id="yolo26n-one2many-nms"),
    *(pytest.param((p, None), id=f"models/{p.name}") for p in EXTRA_MODELS),
]


class Case:
    """One model under test, with its ultralytics twin."""

    def __init__(self, weights: Path, head: str | None, synthetic: bool):
        from ultralytics import YOLO

        self.weights, self.synthetic = weights, synthetic
        self.head = Model(weights, head=head).head
        self._head = head
        self.yolo = YOLO(str(weights))
        # nms=False selects the one-to-one (end-to-end) head; default: one-to-many + NMS.
        self.kwargs = {"nms": False} if self.head == "end2end" else {}
        self.stats = {}

    def model(self, imgsz: int | None = None) -> Model:
        # PyTorch's parity (the CPU default with OpenVINO installed is covered by the graph
        # backend and one-tile-region tests below)
        return Model(self.weights, head=self._head, imgsz=imgsz, backend="torch")

    def predict(self, tile_rgb: np.ndarray, model: Model, conf: float) -> torch.Tensor:
        threads = torch.get_num_threads()  # ultralytics' select_device lowers it for the process
        try:
            res = self._predict(tile_rgb, model, conf)
        finally:
            torch.set_num_threads(threads)
        return res.boxes.data.double()

    def _predict(self, tile_rgb: np.ndarray, model: Model, conf: float):
        return self.yolo.predict(
            source=np.ascontiguousarray(tile_rgb[..., ::-1]),  # ultralytics takes BGR arrays
            imgsz=model.imgsz,
            conf=conf,
            iou=model.iou,
            max_det=model.max_det,
            rect=False,  # square letterbox, as ours
            device="cpu",
            verbose=False,
            **self.kwargs,
        )[0]


@pytest.fixture(scope="module", params=CASES)
def case(request, yolo_pt):
    src, head = request.param
    if isinstance(src, Path):
        return Case(src, head, synthetic=False)
    return Case(yolo_pt(src), head, synthetic=True)


def _choose_conf(raw: torch.Tensor, head: str) -> float:
    """A threshold that leaves many candidates (random models score everything) and sits in the
    widest gap of the score distribution there, so that noise does not move scores across it:
    between ranks 150 and 600 per tile for NMS heads, the middle half of the top-K for
    end-to-end heads."""
    if head == "nms":
        scores = raw[:, 4:].amax(1).flatten().sort(descending=True).values
        lo, hi = 150 * len(raw), 600 * len(raw)
    else:
        scores = raw[..., 4].flatten().sort(descending=True).values
        lo, hi = len(scores) // 4, 3 * len(scores) // 4
    hi = min(hi, len(scores) - 1)
    gaps = scores[lo:hi] - scores[lo + 1 : hi + 1]
    i = lo + int(gaps.argmax())
    return max(float(scores[i] + scores[i + 1]) / 2, 1e-4)


def _ours(model: Model, x: torch.Tensor, tile_hw, conf: float | None = None):
    """Engine + post-processing on model inputs ``x``; (conf, per-tile (M, 6) in tile px)."""
    raw = model.load_engine("cpu").infer(x)
    conf = _choose_conf(raw, model.head) if conf is None else conf
    lb = ref.letterbox_params(*tile_hw, model.imgsz)
    dets = ref.postprocess(raw, model.head, conf, model.iou, model.max_det)
    return conf, [ref.scale_to_slide(d, lb, tile_size=tile_hw) for d in dets]


def _pair(ours: torch.Tensor, theirs: torch.Tensor):
    """Pair detections (same class, box within BOX_TOL, score within SCORE_TOL), greedily by
    descending score. Returns (n pairs, max box diff, max score diff, unpaired ours, unpaired
    theirs)."""
    free = torch.ones(len(ours), dtype=torch.bool)
    box_diff = score_diff = 0.0
    lonely = []
    for t in theirs[theirs[:, 4].argsort(descending=True)]:
        d_box = (ours[:, :4] - t[:4]).abs().amax(1)
        ok = (
            free
            & (ours[:, 5] == t[5])
            & (d_box <= BOX_TOL)
            & ((ours[:, 4] - t[4]).abs() <= SCORE_TOL)
        )
        if not ok.any():
            lonely.append(t)
            continue
        i = int(torch.where(ok, d_box, torch.inf).argmin())
        free[i] = False
        box_diff = max(box_diff, float(d_box[i]))
        score_diff = max(score_diff, float((ours[i, 4] - t[4]).abs()))
    lonely_theirs = torch.stack(lonely) if lonely else theirs[:0]
    return int((~free).sum()), box_diff, score_diff, ours[free], lonely_theirs


def _overlap(det: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of ``det`` with ``others`` (tile px). Boxes that lay wholly in the letterbox padding
    are clipped flat onto the tile edge (zero height or width); two flat boxes on the same edge
    are compared by the overlap of their intervals along it."""
    iou = ref.box_iou_pairs(det[:4].double(), others[:, :4].double()).nan_to_num(0.0)
    for lo, hi, a_lo, a_hi in ((1, 3, 0, 2), (0, 2, 1, 3)):  # flat in y (interval in x), flat in x
        flat = (others[:, lo] == others[:, hi]) & (others[:, lo] == det[lo]) & (det[lo] == det[hi])
        inter = (
            torch.minimum(others[:, a_hi], det[a_hi]) - torch.maximum(others[:, a_lo], det[a_lo])
        ).clamp(min=0)
        union = (others[:, a_hi] - others[:, a_lo]) + (det[a_hi] - det[a_lo]) - inter
        iou = torch.where(flat, inter / union, iou)
    return iou


def _is_flip(
    det: torch.Tensor, other_side: torch.Tensor, conf: float, iou: float, head: str
) -> bool:
    """Can input noise explain that ``det`` has no partner on the other side?"""
    if abs(float(det[4]) - conf) <= SCORE_TOL:
        return True  # at the score threshold
    if head != "nms":
        return False
    same = other_side[(other_side[:, 5] == det[5]) & (other_side[:, 4] >= det[4] - SCORE_TOL)]
    # suppressed there by a near-equal rival of its class
    return bool(len(same)) and bool((_overlap(det, same) > iou - FLIP_IOU_MARGIN).any())


def _compare(case: Case, model: Model, tiles, mine, conf: float, tag: str, exact: bool):
    n_pairs = n_flips = n_dets = 0
    box_diff = score_diff = 0.0
    for tile_rgb, ours in zip(tiles, mine, strict=True):
        theirs = case.predict(tile_rgb, model, conf)
        n, bd, sd, lone_ours, lone_theirs = _pair(ours, theirs)
        n_pairs, n_dets = n_pairs + n, n_dets + max(len(ours), len(theirs))
        box_diff, score_diff = max(box_diff, bd), max(score_diff, sd)
        lonely = [(d, theirs) for d in lone_ours] + [(d, ours) for d in lone_theirs]
        unexplained = [
            d.tolist()
            for d, other in lonely
            if exact or not _is_flip(d, other, conf, model.iou, model.head)
        ]
        assert not unexplained, (
            f"{tag}: {len(unexplained)} detections without a partner (ours {len(ours)}, ultralytics "
            f"{len(theirs)}, conf {conf:.4f}); first: {unexplained[:3]}"
        )
        n_flips += len(lonely)
    print(
        f"\n[parity] {case.weights.name} head={model.head} imgsz={model.imgsz} {tag}: {n_pairs} paired, "
        f"{n_flips} flips, max box diff {box_diff:.2e} px, max score diff {score_diff:.2e} (conf {conf:.4f})"
    )
    assert n_flips <= MAX_FLIP_FRACTION * max(n_dets, 1), (
        f"{tag}: {n_flips} flips of {n_dets} detections"
    )
    if case.synthetic:
        assert n_pairs > MIN_COMPARED, f"{tag}: only {n_pairs} detections compared"


def _crops(chunk, offsets, tile_hw):
    th, tw = tile_hw
    return [chunk[y : y + th, x : x + tw] for x, y in offsets]


def test_square_tile_end_to_end(case):
    """A tile of exactly imgsz (640 for the synthetic models): no resize, identical input."""
    model = case.model()
    s = model.imgsz
    tile = synth_rgb(s, s, seed=1)
    conf, mine = _ours(model, ref.preprocess(tile, [(0, 0)], (s, s), s), (s, s))
    _compare(case, model, [tile], mine, conf, f"{s}x{s} tile", exact=True)


def test_letterboxed_tiles_exact_resize_end_to_end(case):
    """Non-square tiles downscaled by exactly 2 (two 640x480 tiles into 320, padded top and
    bottom). The chunk's content is 2x2-replicated, so cv2's and our resize agree exactly."""
    model = case.model(320 if case.synthetic else None)
    s = model.imgsz
    th, tw = 3 * s // 2, 2 * s  # scale 1/2 -> content s x 3s/4
    small = synth_rgb(th, tw, seed=5)
    chunk = np.ascontiguousarray(small.repeat(2, 0).repeat(2, 1))  # (2th, 2tw)
    chunk = chunk[: th + 2 * 40, : tw + 2 * 60]
    offsets = [(0, 0), (120, 80)]  # even offsets keep the 2x2 blocks aligned
    x = ref.preprocess(chunk, offsets, (th, tw), s)
    tiles = _crops(chunk, offsets, (th, tw))
    assert torch.equal(x, torch.cat([ultralytics_input(t, s) for t in tiles]))  # identical inputs
    conf, mine = _ours(model, x, (th, tw))
    _compare(case, model, tiles, mine, conf, f"2 tiles {tw}x{th} (1/2)", exact=True)


LETTERBOX_TILES = [  # (offsets in the 700x600 chunk, (th, tw)): downscale x0.64, upscale x1.6
    ([(0, 0), (100, 320)], (380, 500)),
    ([(391, 37)], (150, 200)),
]


@pytest.mark.parametrize(("offsets", "tile_hw"), LETTERBOX_TILES, ids=["downscale", "upscale"])
def test_letterboxed_tiles_postprocess_on_ultralytics_input(case, offsets, tile_hw):
    """Ultralytics' own letterboxed input through our engine, decode, NMS and un-letterbox."""
    model = case.model(320 if case.synthetic else None)
    tiles = _crops(synth_rgb(700, 600, seed=2), offsets, tile_hw)
    x = torch.cat([ultralytics_input(t, model.imgsz) for t in tiles])
    conf, mine = _ours(model, x, tile_hw)
    _compare(
        case,
        model,
        tiles,
        mine,
        conf,
        f"{len(tiles)} tile(s) {tile_hw[1]}x{tile_hw[0]}, their input",
        exact=True,
    )


@pytest.mark.parametrize(("offsets", "tile_hw"), LETTERBOX_TILES, ids=["downscale", "upscale"])
def test_letterboxed_tiles_end_to_end(case, offsets, tile_hw):
    """Our preprocessing at arbitrary resize ratios: within tolerance up to explained flips."""
    if not case.synthetic:
        # Our float resize and cv2's fixed-point one differ by up to 0.8/255 per pixel. The trained
        # demo models at this test's near-zero conf on random texture move scores by more than the
        # 1e-3 pairing tolerance under such input changes, so this comparison is not meaningful for
        # them; their parity on identical inputs is asserted by the three tests above.
        pytest.skip("inexact-resize comparison is only calibrated for the synthetic test models")
    model = case.model(320)
    chunk = synth_rgb(700, 600, seed=2)
    conf, mine = _ours(model, ref.preprocess(chunk, offsets, tile_hw, model.imgsz), tile_hw)
    tiles = _crops(chunk, offsets, tile_hw)
    _compare(
        case,
        model,
        tiles,
        mine,
        conf,
        f"{len(tiles)} tile(s) {tile_hw[1]}x{tile_hw[0]}",
        exact=False,
    )


@pytest.mark.parametrize("weights", EXTRA_MODELS, ids=[p.name for p in EXTRA_MODELS])
def test_one_tile_region_gives_exactly_ultralytics_detections(weights):
    """A slide region of exactly one tile through the whole Predictor (tiling, model,
    post-processing and the seam merge) gives ultralytics' own detections on that crop: the
    merge never removes a box the model's NMS kept inside one tile. The crop holds touching
    nuclei (dense scene) whose boxes overlap by IoS 0.59 — the seam merge used to drop one."""
    import trtwsi
    from trtwsi.ops.boxes import overlap_matrix
    from trtwsi.synthetic import make_array

    img, _ = make_array(2560, 1920, seed=11, n_sections=1, nucleus_density=3000)
    model = Model(weights)
    s = model.imgsz
    x = y = 640
    crop = img[y : y + s, x : x + s]
    res = trtwsi.Predictor(img, [model], device="cpu").run(region=(x, y, s, s))
    assert res.n_tiles == 1
    d = res.detections
    ios = overlap_matrix(d.boxes, d.boxes, "ios")
    np.fill_diagonal(ios, 0)
    same_class = d.class_id[:, None] == d.class_id[None, :]
    assert ((ios > 0.5) & same_class).any(), "the crop must hold a same-class pair over IoS 0.5"
    mine = torch.as_tensor(
        np.column_stack([d.boxes - [x, y, x, y], d.score, d.class_id]), dtype=torch.float64
    )
    case = Case(weights, None, synthetic=False)
    _compare(case, model, [crop], [mine], model.min_conf, "one-tile region", exact=True)


GRAPH_BACKENDS = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            importlib.util.find_spec(b) is None, reason=f"pip install 'trtwsi[{b}]'"
        ),
    )
    for b in ("onnxruntime", "openvino")
]


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
@pytest.mark.parametrize("weights", EXTRA_MODELS, ids=[p.name for p in EXTRA_MODELS])
def test_graph_backend_matches_ultralytics_on_a_scene_tile(weights, backend):
    """The CPU graph backends (ONNX Runtime, OpenVINO) hold ultralytics' own tolerances on a
    real scene tile at the model's threshold: every detection pairs up within 1 px and 1e-3.
    Same input as ultralytics (a tile of exactly imgsz), so only their float32 arithmetic
    differs from PyTorch's."""
    from trtwsi.synthetic import make_array

    img, _ = make_array(1920, 1920, seed=11, n_sections=1, nucleus_density=3000)
    model = Model(weights, backend=backend)
    s = model.imgsz
    tile = np.ascontiguousarray(img[640 : 640 + s, 640 : 640 + s])
    _, mine = _ours(model, ref.preprocess(tile, [(0, 0)], (s, s), s), (s, s), model.min_conf)
    assert len(mine[0]) > 20
    case = Case(weights, None, synthetic=False)
    _compare(case, model, [tile], mine, model.min_conf, f"{backend} {s}x{s} scene tile", exact=True)
