"""The CUDA kernels (trtwsi.ops.cuda) against the reference ops (trtwsi.ops.reference).

GPU tests (marked ``gpu``) skip with a reason unless torch sees a CUDA GPU and CuPy imports.
They compare every kernel with the oracle on the same data, bit for bit where the contract
says so: decode, NMS and the level-0 mapping exactly (float64 bits, same rows, same order);
preprocess within 2e-6 (fp32) / 1 fp16 ulp of the reference, exactly without a resize (the
kernel repeats the reference's float64 arithmetic, so it is expected to be exact everywhere).

The host-side helpers (argument building, the mapping constants, the import without CuPy) are
checked on the CPU, unmarked.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.conftest import synth_rgb
from trtwsi.errors import MissingDependencyError, TilingError
from trtwsi.ops import cuda
from trtwsi.ops import reference as ref


def _why_no_gpu() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import cupy  # noqa: F401
    except Exception as e:  # ImportError, or a CuPy that cannot load its CUDA libraries
        return f"needs CuPy (pip install 'trtwsi[gpu]'): {e}"
    return None


_NO_GPU = _why_no_gpu()
gpu = [pytest.mark.gpu, pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or "")]


def _gpu(f):
    for m in gpu:
        f = m(f)
    return f


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def make_raw(
    B: int,
    nc: int,
    N: int,
    seed: int,
    dst: int = 640,
    power: float = 4.0,
    ties: int | None = None,
    spread: float = 40.0,
) -> torch.Tensor:
    """(B, 4 + nc, N) float32 head output: clustered boxes (lots of overlap) whose centres run
    ``spread`` px past the input on every side (clipping), scores ``rand ** power`` (mostly low;
    quantized to multiples of ``1 / ties`` when given: many exact score and class ties)."""
    g = torch.Generator().manual_seed(seed)
    k = max(N // 40, 1)
    centres = torch.rand(B, k, 2, generator=g) * (dst + 2 * spread) - spread
    idx = torch.randint(k, (B, N), generator=g)
    xy = torch.gather(centres, 1, idx[..., None].expand(B, N, 2))
    xy = xy + torch.randn(B, N, 2, generator=g) * 5
    wh = torch.rand(B, N, 2, generator=g) * 70 + 6
    scores = torch.rand(B, nc, N, generator=g) ** power
    if ties:
        scores = (scores * ties).ceil() / ties
    return torch.cat([xy.transpose(1, 2), wh.transpose(1, 2), scores], 1).contiguous()


def reference_dets(raw_cpu, head, conf, iou, max_det, lb, origins, l0, tile_size, n_valid=None):
    """Per valid tile: reference.scale_to_slide(reference.postprocess(...)[b], ...)."""
    per_tile = ref.postprocess(raw_cpu, head, conf, iou, max_det)
    n = len(per_tile) if n_valid is None else n_valid
    return [
        ref.scale_to_slide(per_tile[b], lb, origins[b].tolist(), l0, tile_size=tile_size)
        for b in range(n)
    ]


def assert_same_dets(dets, counts, expected, B=None):
    """Kernel output == reference, row for row, float64 bit for bit (NaN == NaN)."""
    dets, counts = dets.cpu(), counts.cpu()
    if B is not None:
        assert dets.shape[0] == B and counts.shape == (B,)
    assert counts.dtype == torch.int32 and dets.dtype == torch.float64
    for b, exp in enumerate(expected):
        c = int(counts[b])
        assert c == len(exp), f"tile {b}: {c} detections, reference {len(exp)}"
        torch.testing.assert_close(dets[b, :c], exp, rtol=0, atol=0, equal_nan=True)
    for b in range(len(expected), counts.shape[0]):
        assert int(counts[b]) == 0, f"padding tile {b} has count {int(counts[b])}"


def origins_far(B: int, seed: int = 0) -> torch.Tensor:
    """(B, 2) float64 tile origins between 1e5 and 3e5 level-0 px, non-integer."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 2, generator=g, dtype=torch.float64) * 2e5 + 1e5).round() + 0.25


def run_both(raw, head, conf, iou, max_det, tile_size, dst, l0, origins, n_valid=None, **kw):
    """(kernel dets, kernel counts, reference list) for a head output given on the CPU."""
    lb = ref.letterbox_params(*tile_size, dst)
    dets, counts = cuda.postprocess(
        raw.cuda(), head, conf, iou, max_det, origins.cuda(), lb, tile_size, l0, n_valid, **kw
    )
    exp = reference_dets(raw, head, conf, iou, max_det, lb, origins, l0, tile_size, n_valid)
    return dets, counts, exp


# ------------------------------------------------------------------------------------------
# host side (CPU)
# ------------------------------------------------------------------------------------------
def test_import_without_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(MissingDependencyError, match=r"trtwsi\[gpu\]"):
        cuda._cupy()


def test_kernel_sources_are_self_contained():
    for family, (_, names) in cuda.KERNEL_FAMILIES.items():
        src = cuda.kernel_source(family)
        assert "#include" not in "\n".join(
            line for line in src.splitlines() if not line.lstrip().startswith("//")
        )
        assert "TRTWSI_COMMON_CUH" in src
        for name in names:
            assert f" {name}(" in src, (family, name)
    with pytest.raises(KeyError):
        cuda.kernel_source("nope")


def test_tile_byte_offsets():
    off, strides = cuda.tile_byte_offsets([(0, 0), (5, 7), (196, 136)], (200, 260, 3), (64, 64))
    assert off.dtype == np.int64 and strides.dtype == np.int64
    assert off.tolist() == [0, (7 * 260 + 5) * 3, (136 * 260 + 196) * 3]
    assert strides.tolist() == [780] * 3
    chunk = synth_rgb(200, 260, seed=1)
    flat = chunk.reshape(-1)
    for o, (x, y) in zip(off, [(0, 0), (5, 7), (196, 136)], strict=True):
        assert np.array_equal(flat[o : o + 3], chunk[y, x])  # top-left pixel
    empty = cuda.tile_byte_offsets(np.zeros((0, 2), int), (10, 10, 3), (4, 4))
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


@pytest.mark.parametrize("offset", [(-1, 0), (0, -1), (33, 0), (0, 33), (40, 40)])
def test_tile_byte_offsets_rejects_tiles_outside_the_chunk(offset):
    with pytest.raises(TilingError, match="outside"):
        cuda.tile_byte_offsets([(0, 0), offset], (64, 64, 3), (32, 32))


@pytest.mark.parametrize(
    ("th", "tw", "dst", "l0"),
    [(640, 640, 640, 1.0), (1280, 1280, 640, 2.0), (500, 380, 640, (4.0, 4.5)), (33, 47, 320, 1)],
)
def test_mapping_params_reproduce_scale_to_slide(th, tw, dst, l0):
    """The constants the kernels take, evaluated with the kernels' formula in float64 numpy,
    give reference.scale_to_slide bit for bit (boxes inside, across and outside the content)."""
    lb = ref.letterbox_params(th, tw, dst)
    pad_x, pad_y, hi_x, hi_y, gx, gy, sx, sy = cuda.mapping_params(lb, (th, tw), l0)
    g = torch.Generator().manual_seed(th)
    d = torch.cat([torch.rand(500, 4, generator=g) * (dst + 80) - 40, torch.rand(500, 2)], 1)
    x0, y0 = 123456.25, 234567.75
    exp = ref.scale_to_slide(d, lb, (x0, y0), l0, tile_size=(th, tw)).numpy()
    v = d.numpy().astype(np.float64)
    got = np.stack(
        [
            x0 + ((np.clip(v[:, 0], pad_x, hi_x) - pad_x) / gx) * sx,
            y0 + ((np.clip(v[:, 1], pad_y, hi_y) - pad_y) / gy) * sy,
            x0 + ((np.clip(v[:, 2], pad_x, hi_x) - pad_x) / gx) * sx,
            y0 + ((np.clip(v[:, 3], pad_y, hi_y) - pad_y) / gy) * sy,
            v[:, 4],
            v[:, 5],
        ],
        1,
    )
    assert np.array_equal(got, exp)


def test_wrappers_reject_host_tensors_before_touching_cupy():
    lb = ref.letterbox_params(640, 640, 640)
    with pytest.raises(ValueError, match="CUDA"):
        cuda.postprocess(
            torch.zeros(1, 7, 10), "nms", 0.5, 0.5, 10, torch.zeros(1, 2), lb, (640, 640)
        )
    with pytest.raises(ValueError, match="head"):
        cuda.postprocess(
            torch.zeros(1, 7, 10), "yolo", 0.5, 0.5, 10, torch.zeros(1, 2), lb, (640, 640)
        )
    with pytest.raises(ValueError, match="CUDA"):
        cuda.preprocess_chunk(torch.zeros(8, 8, 3, dtype=torch.uint8), [(0, 0)], (8, 8), 8)


# ------------------------------------------------------------------------------------------
# preprocess (GPU)
# ------------------------------------------------------------------------------------------
def _assert_preprocess_close(got: torch.Tensor, exp: torch.Tensor, exact: bool):
    got = got.cpu()
    assert got.dtype == exp.dtype and got.shape == exp.shape
    if exact:
        assert torch.equal(got, exp), float((got.float() - exp.float()).abs().max())
    elif exp.dtype == torch.float32:
        torch.testing.assert_close(got, exp, rtol=0, atol=2e-6)
    else:  # at most one fp16 ulp: compare the binary16 bit patterns as integers
        diff = (got.view(torch.int16).int() - exp.view(torch.int16).int()).abs()
        assert int(diff.max()) <= 1


# (chunk h, chunk w, tile h, tile w, dst): no resize, 2x downscale, upscale, non-square with odd
# padding both ways, tiny tile, pad-only (tile smaller than dst on one side, scale 1)
PRE_CASES = [
    (700, 900, 640, 640, 640),
    (1400, 1500, 1280, 1280, 640),
    (600, 700, 500, 500, 640),
    (520, 400, 500, 380, 640),
    (400, 520, 380, 500, 640),
    (60, 70, 33, 47, 320),
    (100, 90, 64, 40, 64),
]


@_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("H", "W", "th", "tw", "dst"), PRE_CASES)
def test_preprocess_chunk_matches_reference(H, W, th, tw, dst, dtype):
    chunk = synth_rgb(H, W, seed=H + W)
    # corners of the chunk (tiles touching every border) and an interior odd offset
    offsets = [(0, 0), (W - tw, 0), (0, H - th), (W - tw, H - th), ((W - tw) // 3, (H - th) // 2)]
    exp = ref.preprocess(chunk, offsets, (th, tw), dst, dtype=dtype)
    out = torch.full((len(offsets) + 2, 3, dst, dst), -7.0, dtype=dtype, device="cuda")
    got = cuda.preprocess_chunk(torch.from_numpy(chunk).cuda(), offsets, (th, tw), dst, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape[0] == len(offsets)
    lb = ref.letterbox_params(th, tw, dst)
    _assert_preprocess_close(got, exp, exact=(lb.new_h, lb.new_w) == (th, tw))
    assert bool((out[len(offsets) :] == -7.0).all())  # rows past B untouched


@_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("H", "W", "th", "tw", "dst"), PRE_CASES[:3] + PRE_CASES[-2:])
def test_preprocess_into_channels_last_matches_reference(H, W, th, tw, dst, dtype):
    """NHWC memory (a channels_last ``out``, what the torch engine's static input is): the
    same values as the reference at the same (b, c, y, x), and rows past B untouched."""
    chunk = synth_rgb(H, W, seed=H * W)
    offsets = [(0, 0), (W - tw, H - th), ((W - tw) // 2, (H - th) // 3)]
    exp = ref.preprocess(chunk, offsets, (th, tw), dst, dtype=dtype)
    out = torch.full((len(offsets) + 1, 3, dst, dst), -7.0, dtype=dtype, device="cuda")
    out = out.contiguous(memory_format=torch.channels_last)
    got = cuda.preprocess_chunk(torch.from_numpy(chunk).cuda(), offsets, (th, tw), dst, out=out)
    assert got.data_ptr() == out.data_ptr() and not got.is_contiguous()
    assert got.is_contiguous(memory_format=torch.channels_last)
    lb = ref.letterbox_params(th, tw, dst)
    _assert_preprocess_close(got, exp, exact=(lb.new_h, lb.new_w) == (th, tw))
    assert bool((out[len(offsets) :] == -7.0).all())
    with pytest.raises(ValueError, match="contiguous"):  # neither layout
        cuda.preprocess_chunk(
            torch.from_numpy(chunk).cuda(), offsets, (th, tw), dst,
            out=torch.empty((3, dst, dst, 3), dtype=dtype, device="cuda").permute(0, 3, 2, 1),
        )  # fmt: skip


@_gpu
def test_preprocess_is_bit_exact_with_resize_too():
    """Not part of the contract (which allows 2e-6 / 1 ulp), but expected: the kernel repeats the
    reference's float64 arithmetic operation for operation. A failure here alone is a precision
    drift to look at, not a wrong result."""
    chunk = synth_rgb(1400, 1500, seed=9)
    offsets = [(0, 0), (101, 57)]
    for dtype in (torch.float32, torch.float16):
        exp = ref.preprocess(chunk, offsets, (1280, 1280), 640, dtype=dtype)
        got = cuda.preprocess_chunk(
            torch.from_numpy(chunk).cuda(), offsets, (1280, 1280), 640, dtype=dtype
        )
        assert torch.equal(got.cpu(), exp)


@_gpu
def test_preprocess_two_chunks_back_to_back():
    """One launch over tiles of two chunks of different widths concatenated in one buffer."""
    a, b = synth_rgb(300, 350, seed=1), synth_rgb(280, 410, seed=2)
    src = torch.cat([torch.from_numpy(a).reshape(-1), torch.from_numpy(b).reshape(-1)]).cuda()
    th = tw = 256
    oa, sa = cuda.tile_byte_offsets([(0, 0), (94, 44)], a.shape, (th, tw))
    ob, sb = cuda.tile_byte_offsets([(154, 24), (3, 5)], b.shape, (th, tw))
    tile_offsets = torch.from_numpy(np.concatenate([oa, ob + a.size])).cuda()
    row_strides = torch.from_numpy(np.concatenate([sa, sb])).cuda()
    out = torch.empty((4, 3, 320, 320), dtype=torch.float32, device="cuda")
    got = cuda.preprocess(src, tile_offsets, row_strides, (th, tw), 320, out)
    exp = torch.cat(
        [
            ref.preprocess(a, [(0, 0), (94, 44)], (th, tw), 320),
            ref.preprocess(b, [(154, 24), (3, 5)], (th, tw), 320),
        ]
    )
    _assert_preprocess_close(got, exp, exact=False)


@_gpu
def test_preprocess_empty_batch_and_bad_tiles():
    chunk = torch.zeros((64, 64, 3), dtype=torch.uint8, device="cuda")
    assert cuda.preprocess_chunk(chunk, np.zeros((0, 2), int), (32, 32), 64).shape == (
        0,
        3,
        64,
        64,
    )
    with pytest.raises(TilingError, match="outside"):
        cuda.preprocess_chunk(chunk, [(40, 40)], (32, 32), 64)


# ------------------------------------------------------------------------------------------
# decode (GPU)
# ------------------------------------------------------------------------------------------
@_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("nc", "N", "conf"), [(1, 8400, 0.25), (3, 2100, 0.05), (80, 8400, 0.3)])
def test_decode_matches_reference(nc, N, conf, dtype):
    raw = make_raw(3, nc, N, seed=nc, power=2.0, ties=64).to(dtype)
    raw[1, 4:] = 0.0  # an empty tile
    cands = cuda.decode_nms_head(raw.cuda(), conf)
    expected = ref.decode_nms_head(raw, conf)
    counts = cands.count.cpu()
    keys = cands.keys.cpu()
    for b, exp in enumerate(expected):
        c = int(counts[b])
        assert c == len(exp)
        anchors = (keys[b, :c] & 0xFFFFFFFF).sort().values  # slot order is arbitrary
        score, _ = raw[b, 4:].float().max(0)
        assert torch.equal(anchors, (score > conf).nonzero()[:, 0])
        got = torch.cat(
            [
                cands.boxes[b, anchors].cpu(),
                cands.scores[b, anchors].cpu()[:, None],
                cands.classes[b, anchors].cpu()[:, None].float(),
            ],
            1,
        )
        assert torch.equal(got, exp)
    assert int(counts[1]) == 0 and int(counts.sum()) > 0


# ------------------------------------------------------------------------------------------
# postprocess, "nms" head (GPU)
# ------------------------------------------------------------------------------------------
# (B, nc, N, conf, iou, max_det, power, ties): typical, nc=1, nc=80, score ties, low conf
NMS_CASES = [
    (8, 3, 8400, 0.25, 0.45, 300, 4.0, None),
    (4, 1, 8400, 0.25, 0.7, 300, 3.0, None),
    (4, 80, 8400, 0.25, 0.45, 300, 2.0, None),
    (4, 3, 8400, 0.1, 0.45, 300, 3.0, 16),
    (2, 2, 2100, 0.001, 0.5, 1000, 1.0, None),
]


@_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("B", "nc", "N", "conf", "iou", "max_det", "power", "ties"), NMS_CASES)
def test_postprocess_nms_matches_reference(B, nc, N, conf, iou, max_det, power, ties, dtype):
    raw = make_raw(B, nc, N, seed=B * nc + N, power=power, ties=ties).to(dtype)
    origins = origins_far(B)
    dets, counts, exp = run_both(raw, "nms", conf, iou, max_det, (1280, 1280), 640, 2.0, origins)
    assert_same_dets(dets, counts, exp, B)
    assert sum(len(e) for e in exp) > B  # not a vacuous comparison


@_gpu
@pytest.mark.parametrize("max_det", [300, 100_000])
def test_postprocess_all_anchors_are_candidates(max_det):
    """Every one of 8400 anchors above conf: the sort leaves shared memory (global path), and
    with max_det=100000 the NMS walks the whole ranking."""
    raw = make_raw(2, 2, 8400, seed=5, power=1.0)
    raw[:, 4:] = raw[:, 4:] * 0.9 + 0.05  # every score > 0.05 > conf
    cands = cuda.decode_nms_head(raw.cuda(), 0.01)
    assert cands.count.cpu().tolist() == [8400, 8400]
    dets, counts, exp = run_both(
        raw, "nms", 0.01, 0.5, max_det, (640, 640), 640, 1.0, origins_far(2)
    )
    assert_same_dets(dets, counts, exp, 2)
    if max_det == 300:
        assert counts.cpu().tolist() == [300, 300]


@_gpu
@pytest.mark.slow
def test_postprocess_1280_input_33600_anchors():
    """A 1280-px input: 33600 anchors, all above conf (sort of 65536 padded keys), nc=1."""
    raw = make_raw(1, 1, 33600, seed=7, dst=1280, power=1.0)
    raw[:, 4:] = raw[:, 4:] * 0.5 + 0.3
    dets, counts, exp = run_both(
        raw, "nms", 0.25, 0.45, 2000, (2048, 2048), 1280, 1.0, origins_far(1)
    )
    assert_same_dets(dets, counts, exp, 1)


@_gpu
def test_postprocess_iou_exactly_at_threshold_is_kept():
    """IoU = 1/2 exactly: kept at iou=0.5 (strict >), suppressed at 0.4999. IoU = 3/5 in fp32 is
    0.6000000238 > 0.6 in float64: suppressed at iou=0.6 (float64 comparison)."""
    # xywh: A = (0, 0, 10, 10); B = (0, 0, 10, 20) -> inter 100, union 200.
    # C = (100, 0, 104, 1); D = (101, 0, 105, 1) -> inter 3, union 5.
    xywh = torch.tensor(
        [[5.0, 5.0, 10.0, 10.0], [5.0, 10.0, 10.0, 20.0], [102, 0.5, 4, 1], [103, 0.5, 4, 1]]
    )
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    raw = torch.cat([xywh.T, scores], 0)[None]  # (1, 5, 4), nc = 1
    for thr, n in ((0.5, 3), (0.4999, 2), (0.6, 3), (0.61, 4)):
        dets, counts, exp = run_both(
            raw, "nms", 0.1, thr, 300, (640, 640), 640, 1.0, torch.zeros(1, 2, dtype=torch.float64)
        )
        assert_same_dets(dets, counts, exp)
        assert int(counts[0]) == n, thr


@_gpu
def test_postprocess_score_ties_lower_anchor_first():
    """Equal scores: ranked by anchor. Identical boxes of one class: the lowest anchor survives;
    disjoint boxes with equal scores come out in anchor order."""
    N = 12
    xywh = torch.tensor([[50.0, 50.0, 20.0, 20.0]]).repeat(N, 1)
    xywh[6:, 0] += (torch.arange(6).float() + 1) * 90  # anchors 6..11: disjoint
    cls = torch.zeros(2, N)
    cls[0] = 0.5
    cls[1, [1, 3]] = 0.5  # anchors 1 and 3: class 1 (class 0 score 0.5 too -> tie -> class 0)
    raw = torch.cat([xywh.T, cls], 0)[None]
    dets, counts, exp = run_both(
        raw, "nms", 0.25, 0.45, 300, (640, 640), 640, 1.0, torch.zeros(1, 2, dtype=torch.float64)
    )
    assert_same_dets(dets, counts, exp)
    # anchor 0 of the identical group (1..5 suppressed; 1 and 3 tie into class 0), then 6..11
    assert int(counts[0]) == 7
    assert dets[0, :7, 0].cpu().tolist() == [40.0, 130.0, 220.0, 310.0, 400.0, 490.0, 580.0]


@_gpu
def test_postprocess_nan_and_degenerate_boxes():
    """NaN scores drop the anchor, NaN/zero-size boxes never suppress (NaN IoU), as reference."""
    raw = make_raw(2, 3, 600, seed=3, power=1.0)
    raw[0, 5, ::7] = float("nan")  # NaN class score
    raw[0, 0, 1::11] = float("nan")  # NaN box x
    raw[1, 2:4, ::5] = 0.0  # zero-size boxes
    dets, counts, exp = run_both(raw, "nms", 0.2, 0.45, 300, (640, 640), 640, 1.0, origins_far(2))
    assert_same_dets(dets, counts, exp)


@_gpu
def test_postprocess_padded_batch_and_empty_tiles():
    raw = make_raw(6, 3, 8400, seed=8)
    raw[2, 4:] = 0.0  # a valid tile without candidates
    raw[4:] = float("nan")  # padding tiles hold garbage: must not be read
    dets, counts, exp = run_both(
        raw, "nms", 0.25, 0.45, 300, (1280, 1280), 640, 1.0, origins_far(6), n_valid=4
    )
    assert_same_dets(dets, counts, exp, 6)
    assert int(counts[2]) == 0
    _, counts0 = cuda.postprocess(
        raw.cuda(),
        "nms",
        0.25,
        0.45,
        300,
        origins_far(6),
        ref.letterbox_params(1280, 1280, 640),
        (1280, 1280),
        1.0,
        n_valid=0,
    )
    assert counts0.cpu().tolist() == [0] * 6


@_gpu
def test_postprocess_no_anchors_and_zero_max_det():
    lb = ref.letterbox_params(640, 640, 640)
    dets, counts = cuda.postprocess(
        torch.zeros(2, 7, 0, device="cuda"), "nms", 0.2, 0.5, 300, torch.zeros(2, 2), lb, (640, 640)
    )
    assert counts.cpu().tolist() == [0, 0] and dets.shape == (2, 300, 6)
    raw = make_raw(2, 3, 500, seed=1).cuda()
    dets, counts = cuda.postprocess(raw, "nms", 0.2, 0.5, 0, torch.zeros(2, 2), lb, (640, 640))
    assert counts.cpu().tolist() == [0, 0] and dets.shape == (2, 0, 6)


@_gpu
@pytest.mark.parametrize(
    ("th", "tw", "dst", "l0"), [(500, 380, 640, (4.0, 4.0)), (380, 500, 640, 1.5), (33, 47, 320, 1)]
)
def test_postprocess_letterbox_geometries(th, tw, dst, l0):
    """Non-square tiles (odd padding), upscale and downscale; boxes across the padding clip."""
    raw = make_raw(3, 4, 2100, seed=th, dst=dst, power=2.0)
    dets, counts, exp = run_both(raw, "nms", 0.2, 0.45, 300, (th, tw), dst, l0, origins_far(3))
    assert_same_dets(dets, counts, exp, 3)


@_gpu
def test_postprocess_preallocated_buffers_and_side_stream():
    raw = make_raw(4, 3, 8400, seed=2).half()
    lb = ref.letterbox_params(640, 640, 640)
    origins = origins_far(4)
    out = torch.full((6, 300, 6), -1.0, dtype=torch.float64, device="cuda")
    cnt = torch.full((6,), -1, dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        raw_gpu, origins_gpu = raw.cuda(), origins.cuda()
        dets, counts = cuda.postprocess(
            raw_gpu, "nms", 0.25, 0.45, 300, origins_gpu, lb, (640, 640), 1.0, out=out, counts=cnt
        )
    side.synchronize()
    assert dets.data_ptr() == out.data_ptr() and counts.data_ptr() == cnt.data_ptr()
    assert dets.shape == (4, 300, 6)
    assert_same_dets(
        dets, counts, reference_dets(raw, "nms", 0.25, 0.45, 300, lb, origins, 1.0, (640, 640)), 4
    )
    assert cnt[4:].cpu().tolist() == [-1, -1]


# ------------------------------------------------------------------------------------------
# postprocess, "end2end" head (GPU)
# ------------------------------------------------------------------------------------------
@_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("K", "max_det"), [(300, 100), (300, 300), (1000, 700), (5, 300)])
def test_postprocess_end2end_matches_reference(K, max_det, dtype):
    g = torch.Generator().manual_seed(K)
    B = 5
    raw = torch.rand(B, K, 6, generator=g) * torch.tensor(
        [700, 700, 700, 700, 1, 1]
    ) - torch.tensor([30, 30, 0, 0, 0, 0])
    raw[..., 2:4] += raw[..., 0:2]
    raw[..., 4] = (raw[..., 4].sort(dim=1, descending=True).values * 32).round() / 32  # ties
    raw[..., 5] = raw[..., 5].mul(80).floor()
    raw[3, :, 4] = 0.0  # an empty tile
    raw = raw.to(dtype)
    dets, counts, exp = run_both(
        raw, "end2end", 0.25, 0.45, max_det, (1280, 1280), 640, 2.0, origins_far(B), n_valid=4
    )
    assert_same_dets(dets, counts, exp, B)
    assert int(counts[3]) == 0 and int(counts[:3].sum()) > 0


# ------------------------------------------------------------------------------------------
# a real model (GPU + ultralytics)
# ------------------------------------------------------------------------------------------
@_gpu
@pytest.mark.parametrize(
    ("weights", "head"), [("demo-yolo11n.pt", "nms"), ("demo-yolo26n.pt", "end2end")]
)
def test_real_model_head_output(weights, head):
    """Preprocess 4 tiles of a synthetic slide on the GPU, run the bundled demo model in fp16,
    postprocess on the GPU: equal to the reference ops on the same (fp16) head output."""
    pytest.importorskip("ultralytics", reason="the demo model needs ultralytics")
    from trtwsi._util.resources import bundled_models_dir
    from trtwsi.engines.model import Model
    from trtwsi.synthetic import Scene

    path = bundled_models_dir() / weights
    if not path.exists():
        pytest.skip(f"{path} is not there")
    model = Model(path, head=head)
    net = model.module.cuda().half()
    scene = Scene(2600, 1400, seed=4)
    chunk = scene.render(0, 0, 2600, 1400)
    offsets = [(0, 0), (1320, 0), (0, 120), (1320, 120)]
    x = cuda.preprocess_chunk(torch.from_numpy(chunk).cuda(), offsets, (1280, 1280), 640)
    _assert_preprocess_close(
        x, ref.preprocess(chunk, offsets, (1280, 1280), 640, torch.float16), exact=False
    )
    with torch.no_grad():
        y = net(x)
    raw = (y[0] if isinstance(y, (tuple, list)) else y).contiguous()
    origins = torch.tensor(offsets, dtype=torch.float64) * 2.0 + 1e5  # read at level 1
    lb = ref.letterbox_params(1280, 1280, 640)
    dets, counts = cuda.postprocess(raw, head, 0.25, 0.45, 300, origins, lb, (1280, 1280), 2.0)
    exp = reference_dets(raw.cpu(), head, 0.25, 0.45, 300, lb, origins, 2.0, (1280, 1280))
    assert_same_dets(dets, counts, exp, 4)
    assert int(counts.sum()) > 0
