"""The reference ops against ultralytics (letterbox, preprocess, decode, scale) and torchvision (NMS)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from tests.conftest import synth_rgb
from trtwsi.errors import TilingError
from trtwsi.ops import reference as ref

# --- helpers ------------------------------------------------------------------------------


def ultralytics_input(tile_rgb: np.ndarray, dst: int) -> torch.Tensor:
    """What ultralytics predict feeds the model for one RGB tile: its own LetterBox (square,
    auto=False as with rect=False) and its own ``BasePredictor.preprocess`` (BGR input)."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.engine.predictor import BasePredictor

    letterbox = LetterBox((dst, dst), auto=False)
    fake = types.SimpleNamespace(
        pre_transform=lambda ims: [letterbox(image=x) for x in ims],
        device=torch.device("cpu"),
        model=types.SimpleNamespace(fp16=False),
    )
    return BasePredictor.preprocess(fake, [np.ascontiguousarray(tile_rgb[..., ::-1])])


def random_dets(
    n: int, nc: int, seed: int, span: float = 640.0, offset: float = 0.0
) -> torch.Tensor:
    """(n, 6) float32 detections: clustered boxes (lots of overlap), distinct random scores
    (fp32 ``torch.rand`` repeats values at n ~ 5000, and torchvision orders ties arbitrarily)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 20, 1), 2, generator=g) * span
    xy = (
        centres[torch.randint(len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 8
    )
    wh = torch.rand(n, 2, generator=g) * 40 + 10
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1) + offset
    scores = (torch.randperm(n, generator=g) + 1).float() / (n + 1)
    cls = torch.randint(nc, (n,), generator=g).float()
    return torch.cat([boxes, scores[:, None], cls[:, None]], 1).float()


def tv_batched(dets: torch.Tensor, iou: float, max_det=None) -> torch.Tensor:
    keep = torchvision.ops.batched_nms(dets[:, :4], dets[:, 4], dets[:, 5].long(), iou)
    return dets[keep][:max_det]


# --- letterbox ----------------------------------------------------------------------------

SHAPES = [
    (640, 640),
    (380, 500),
    (500, 380),
    (150, 200),
    (1280, 1280),
    (700, 701),
    (1, 3000),
    (3000, 1),
    (33, 47),
    (641, 640),
    (639, 640),
]


@pytest.mark.parametrize("dst", [640, 320, 96])
@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_letterbox_params_match_ultralytics(h, w, dst):
    from ultralytics.data.augment import LetterBox

    p = LetterBox((dst, dst), auto=False, scaleup=True, center=True).get_params(
        {"img": np.zeros((h, w, 3), np.uint8)}
    )
    lb = ref.letterbox_params(h, w, dst)
    assert lb.scale == p["ratio"][0]
    assert (lb.new_w, lb.new_h) == p["new_unpad"]
    assert (lb.pad_x, lb.pad_y) == (p["left"], p["top"])
    assert lb.pad_x + lb.new_w + p["right"] == dst and lb.pad_y + lb.new_h + p["bottom"] == dst


def test_letterbox_params_rejects_bad_sizes():
    with pytest.raises(TilingError):
        ref.letterbox_params(0, 10, 640)


# --- preprocess ---------------------------------------------------------------------------


def test_preprocess_without_resize_is_exact_copy():
    """Tile == dst: bit-identical to ultralytics, for every tile of a chunk."""
    chunk = synth_rgb(200, 260, seed=3)
    offsets = [(0, 0), (100, 40), (196, 136)]
    x = ref.preprocess(chunk, offsets, (64, 64), 64)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    for i, (ox, oy) in enumerate(offsets):
        tile = chunk[oy : oy + 64, ox : ox + 64]
        assert torch.equal(x[i], ultralytics_input(tile, 64)[0])
        assert torch.equal(x[i], torch.from_numpy(tile).permute(2, 0, 1).float() / 255)


def test_preprocess_pad_only_is_exact():
    """Scale 1 with padding (tile 64x40 into 64): no resize, exact, pad value 114/255."""
    chunk = synth_rgb(64, 40, seed=4)
    x = ref.preprocess(torch.from_numpy(chunk), [(0, 0)], (64, 40), 64)
    assert torch.equal(x[0], ultralytics_input(chunk, 64)[0])
    lb = ref.letterbox_params(64, 40, 64)
    assert lb.pad_x == 12 and lb.new_w == 40
    assert torch.all(x[0, :, :, : lb.pad_x] == torch.tensor(114.0) / 255)


# (tile h, tile w, dst): downscale, upscale, non-square both ways, odd padding, tiny source
RESIZE_CASES = [
    (380, 500, 320),
    (150, 200, 320),
    (500, 380, 320),
    (700, 700, 640),
    (1280, 1280, 640),
    (33, 47, 320),
]


@pytest.mark.parametrize(("th", "tw", "dst"), RESIZE_CASES)
def test_preprocess_resize_matches_ultralytics_within_one_level(th, tw, dst):
    chunk = synth_rgb(th + 7, tw + 5, seed=th + tw)
    offsets = [(0, 0), (5, 7), (2, 3)]
    x = ref.preprocess(chunk, offsets, (th, tw), dst)
    max_diff = 0.0
    for i, (ox, oy) in enumerate(offsets):
        theirs = ultralytics_input(chunk[oy : oy + th, ox : ox + tw], dst)[0]
        max_diff = max(max_diff, float((x[i] - theirs).abs().max()))
    # cv2's fixed-point INTER_LINEAR vs exact float bilinear: measured max 0.80/255.
    assert max_diff * 255 < 0.85, f"max |ours - ultralytics| = {max_diff * 255:.3f}/255"
    assert max_diff > 0  # a resize really happened


@pytest.mark.parametrize(("th", "tw", "dst"), RESIZE_CASES)
def test_preprocess_resize_matches_torch_bilinear(th, tw, dst):
    """The explicit sampling formula is torch's bilinear (align_corners=False, no antialias)."""
    chunk = synth_rgb(th, tw, seed=1)
    x = ref.preprocess(chunk, [(0, 0)], (th, tw), dst)
    lb = ref.letterbox_params(th, tw, dst)
    t = torch.from_numpy(chunk).permute(2, 0, 1)[None].double()
    r = F.interpolate(
        t, size=(lb.new_h, lb.new_w), mode="bilinear", align_corners=False, antialias=False
    )
    inner = x[0, :, lb.pad_y : lb.pad_y + lb.new_h, lb.pad_x : lb.pad_x + lb.new_w].double() * 255
    assert (inner - r[0]).abs().max() < 1e-3


def test_preprocess_fp16_and_empty():
    chunk = synth_rgb(64, 64, seed=5)
    x16 = ref.preprocess(chunk, [(0, 0)], (64, 64), 64, dtype=torch.float16)
    assert x16.dtype == torch.float16
    assert torch.equal(x16, ref.preprocess(chunk, [(0, 0)], (64, 64), 64).half())
    assert ref.preprocess(chunk, np.zeros((0, 2), int), (32, 32), 64).shape == (0, 3, 64, 64)


@pytest.mark.parametrize("offset", [(-1, 0), (0, -1), (33, 0), (0, 33), (40, 40)])
def test_preprocess_rejects_tiles_outside_the_chunk(offset):
    chunk = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(TilingError, match="outside"):
        ref.preprocess(chunk, [(0, 0), offset], (32, 32), 32)


def test_preprocess_rejects_bad_chunk():
    with pytest.raises(TilingError, match="uint8"):
        ref.preprocess(np.zeros((64, 64, 3), np.float32), [(0, 0)], (32, 32), 32)
    with pytest.raises(TilingError, match=r"\(H, W, 3\)"):
        ref.preprocess(np.zeros((64, 64), np.uint8), [(0, 0)], (32, 32), 32)


# --- decode -------------------------------------------------------------------------------


def test_decode_nms_head_hand_made():
    # 3 anchors, 3 classes. Anchor 0: class tie 0.6/0.6 -> class 0. Anchor 1: score == conf -> out.
    raw = torch.tensor(
        [
            [
                [10.0, 20.0, 30.0],
                [10.0, 20.0, 30.0],
                [4.0, 5.0, 6.0],
                [2.0, 3.0, 4.0],
                [0.6, 0.1, 0.2],
                [0.6, 0.5, 0.9],
                [0.1, 0.2, 0.3],
            ]
        ]
    )
    (d,) = ref.decode_nms_head(raw, conf=0.5)
    expected = torch.tensor([[8.0, 9.0, 12.0, 11.0, 0.6, 0.0], [27.0, 28.0, 33.0, 32.0, 0.9, 1.0]])
    assert torch.equal(d, expected)


def test_decode_end2end_strict_threshold_and_cap():
    raw = torch.tensor(
        [[[0, 0, 1, 1, 0.9, 2], [0, 0, 1, 1, 0.5, 1], [0, 0, 1, 1, 0.7, 0], [0, 0, 1, 1, 0.2, 0]]]
    ).float()
    (d,) = ref.decode_end2end(raw, conf=0.5)
    assert d[:, 4].tolist() == pytest.approx([0.9, 0.7])
    assert len(ref.decode_end2end(raw, 0.1, max_det=2)[0]) == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_postprocess_nms_head_equals_ultralytics(seed):
    """Bit-identical to ultralytics non_max_suppression on a raw (B, 4+nc, N) head output."""
    from ultralytics.utils.nms import non_max_suppression

    g = torch.Generator().manual_seed(seed)
    B, nc, N = 2, 3, 3000
    xy = torch.rand(B, 2, N, generator=g) * 640
    wh = torch.rand(B, 2, N, generator=g) * 60 + 4
    scores = torch.rand(B, nc, N, generator=g) ** 3
    raw = torch.cat([xy, wh, scores], 1)
    ours = ref.postprocess(raw, "nms", conf=0.3, iou=0.45, max_det=300)
    theirs = non_max_suppression(raw.clone(), 0.3, 0.45, max_det=300)
    assert sum(len(d) for d in ours) > 300
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_postprocess_end2end_equals_ultralytics():
    from ultralytics.utils.nms import non_max_suppression

    g = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 300, 6, generator=g) * torch.tensor([640, 640, 640, 640, 1, 1])
    raw[..., 4] = raw[..., 4].sort(dim=1, descending=True).values
    raw[..., 5] = raw[..., 5].mul(3).floor()
    ours = ref.postprocess(raw, "end2end", conf=0.4, iou=0.45, max_det=100)
    theirs = non_max_suppression(raw.clone(), 0.4, 0.45, max_det=100, end2end=True)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert [len(d) for d in ours] == [100, 100]


def test_postprocess_rejects_unknown_head():
    with pytest.raises(ValueError, match="head"):
        ref.postprocess(torch.zeros(1, 7, 10), "yolo", 0.5, 0.5)


# --- NMS ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "nc", "iou"),
    [(50, 1, 0.5), (2000, 3, 0.45), (5000, 10, 0.7), (3000, 2, 0.0), (500, 4, 1.0)],
)
def test_nms_matches_torchvision(n, nc, iou):
    dets = random_dets(n, nc, seed=n + nc)
    ours = ref.nms(dets, iou, max_det=None)
    assert torch.equal(ours, tv_batched(dets, iou))
    assert 0 < len(ours) < n or iou == 1.0
    # max_det is a cap on the score-sorted result
    assert torch.equal(ref.nms(dets, iou, max_det=37), ours[:37])


def test_nms_class_agnostic_matches_torchvision_nms():
    dets = random_dets(2000, 5, seed=7)
    keep = torchvision.ops.nms(dets[:, :4], dets[:, 4], 0.5)
    assert torch.equal(ref.nms(dets, 0.5, max_det=None, class_aware=False), dets[keep])


def test_nms_empty():
    out = ref.nms(torch.zeros(0, 6), 0.5)
    assert out.shape == (0, 6) and out.dtype == torch.float32


def test_nms_iou_exactly_at_threshold_is_kept():
    """Suppression needs IoU strictly above the threshold, as torchvision."""
    # IoU = 1 / 2 exactly (inter 1, union 2).
    dets = torch.tensor([[0, 0, 2, 1, 0.9, 0], [0, 0, 1, 1, 0.8, 0]], dtype=torch.float32)
    assert len(ref.nms(dets, 0.5)) == 2 == len(tv_batched(dets, 0.5))
    assert len(ref.nms(dets, 0.4999)) == 1 == len(tv_batched(dets, 0.4999))


def test_nms_threshold_compared_in_float64_like_torchvision():
    """IoU = 3/5 computes to fp32(0.6) = 0.6000000238 > 0.6 (double): torchvision suppresses.
    A float32 comparison (0.6f > 0.6f) would keep it."""
    dets = torch.tensor([[0, 0, 4, 1, 0.9, 0], [1, 0, 5, 1, 0.8, 0]], dtype=torch.float32)
    assert float(ref.box_iou_pairs(dets[0, :4], dets[1:, :4])[0]) == np.float32(0.6)
    assert len(tv_batched(dets, 0.6)) == 1
    assert len(ref.nms(dets, 0.6)) == 1


def test_nms_score_ties_keep_lower_index():
    # Identical boxes, identical scores: the first row of each class survives.
    box = [10.0, 10.0, 50.0, 50.0]
    dets = torch.tensor([[*box, 0.5, 1], [*box, 0.5, 0], [*box, 0.5, 1], [*box, 0.5, 0]])
    assert torch.equal(ref.nms(dets, 0.5), dets[[0, 1]])


@pytest.mark.parametrize("seed", [11, 12])
def test_nms_many_score_ties(seed):
    """Thousands of boxes with 11 distinct scores. The kept set equals torchvision's (its CPU
    kernel keeps ties in index order within a class); the order is ours: descending score,
    then ascending row index (torchvision's final cross-class sort leaves ties unordered)."""
    dets = random_dets(3000, 3, seed=seed)
    dets[:, 4] = (dets[:, 4] * 10).round() / 10
    dets = torch.cat([dets, torch.arange(len(dets))[:, None].float()], 1)  # remember the row
    ours = ref.nms(dets[:, :6], 0.45, max_det=None)
    keep = torchvision.ops.batched_nms(dets[:, :4], dets[:, 4], dets[:, 5].long(), 0.45)
    rows = keep.sort().values
    assert torch.equal(
        ours, dets[rows[torch.sort(dets[rows, 4], descending=True, stable=True).indices], :6]
    )
    assert len(ours) < len(dets)


def test_nms_large_coordinates_needs_no_offset():
    """10^5-px coordinates, many classes: equal to per-class torchvision NMS in fp32."""
    dets = random_dets(3000, 40, seed=3, span=2000.0, offset=98_000.0)
    ours = ref.nms(dets, 0.5, max_det=None)
    keep = [
        idx[torchvision.ops.nms(dets[idx, :4], dets[idx, 4], 0.5)]
        for c in dets[:, 5].unique()
        for idx in [(dets[:, 5] == c).nonzero()[:, 0]]
    ]
    keep = torch.cat(keep)
    keep = keep[torch.sort(dets[keep, 4], descending=True, stable=True).indices]
    assert torch.equal(ours, dets[keep])
    # Offsetting classes by (max coordinate + 1) in fp32 moves boxes to ~4e6 px, where fp32
    # steps are 0.25-0.5 px: IoUs change. Our result does not depend on it.
    assert len(ours) > 100


def test_nms_float64_input_stays_float64():
    dets = random_dets(500, 2, seed=2).double()
    out = ref.nms(dets, 0.5)
    assert out.dtype == torch.float64
    assert torch.equal(out, tv_batched(dets, 0.5)[:300])


# --- scale to slide -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("th", "tw", "dst"), [(380, 500, 320), (150, 200, 320), (640, 640, 640), (333, 640, 640)]
)
def test_scale_to_slide_matches_ultralytics_scale_boxes(th, tw, dst):
    from ultralytics.utils.ops import scale_boxes

    dets = random_dets(500, 3, seed=th, span=dst)
    dets[:10, :4] = torch.tensor([-20.0, -20.0, dst + 20.0, dst + 20.0])  # runs into the padding
    lb = ref.letterbox_params(th, tw, dst)
    ours = ref.scale_to_slide(dets, lb, tile_size=(th, tw))
    theirs = scale_boxes((dst, dst), dets[:, :4].clone(), (th, tw))
    assert ours.dtype == torch.float64
    assert (ours[:, :4] - theirs.double()).abs().max() < 1e-3
    assert torch.equal(ours[:, 4:], dets[:, 4:].double())
    assert torch.equal(ours[:10, :4].float(), torch.tensor([[0.0, 0.0, tw, th]]).expand(10, 4))


def test_scale_to_slide_level0_mapping_and_precision():
    """Tile read at downsample 4, origin near 10^5 px: float64 exact, float32 within 0.004 px."""
    lb = ref.letterbox_params(320, 320, 640)  # scale 2, no padding
    dets = torch.tensor([[100.5, 200.25, 300.75, 639.0, 0.8, 2.0]])
    origin = (123_456.0, 98_765.0)
    out = ref.scale_to_slide(dets, lb, origin, 4.0)
    expected = [
        123_456 + 100.5 / 2 * 4,
        98_765 + 200.25 / 2 * 4,
        123_456 + 300.75 / 2 * 4,
        98_765 + 639 / 2 * 4,
    ]
    assert out[0, :4].tolist() == expected
    out32 = ref.scale_to_slide(dets, lb, origin, 4.0, dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert (out32[0, :4].double() - out[0, :4]).abs().max() <= 0.004
    # anisotropic downsample, and scale-based gain equals the exact gain for square tiles
    out_xy = ref.scale_to_slide(dets, lb, origin, (4.0, 2.0), tile_size=(320, 320))
    assert out_xy[0, 3].item() == 98_765 + 639 / 2 * 2
    assert out_xy[0, 0].item() == expected[0]


def test_scale_to_slide_empty():
    out = ref.scale_to_slide(torch.zeros(0, 6), ref.letterbox_params(100, 100, 64), (5.0, 5.0), 2.0)
    assert out.shape == (0, 6)
