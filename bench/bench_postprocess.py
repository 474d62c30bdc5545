"""GPU pre/post-processing kernels vs the torch / ultralytics / torchvision ways, on one GPU.

Not part of the default test run (``testpaths = ["tests"]``); GPU only (skips with the reason
otherwise)::

    python -m pytest bench/bench_postprocess.py

Postprocess: decode + class-aware NMS (+ our mapping to level-0 px) of one batch of 32 tiles,
the same CUDA head output for every contender:

* ``trtwsi``: :func:`trtwsi.ops.cuda.postprocess` (two launches and a memset, no host sync);
* ``ultralytics``: ``ultralytics.utils.nms.non_max_suppression`` (what ultralytics predict runs;
  it loops over images in Python and syncs; its box mapping is not even timed), with torchvision
  imported so that it uses ``torchvision.ops.nms`` (its fastest path);
* ``torchvision``: a batched torch decode + one ``torchvision.ops.batched_nms`` over all tiles
  (tile and class folded into the group index), the fastest plain-torch way.

Cases: ``realistic`` — the head output of the bundled ``trtwsi/models/demo-yolo11n.pt`` (fp16) on 32
640² tiles of a synthetic slide (``trtwsi.synthetic.Scene``), conf 0.25; ``dense`` — the same
output at conf 0.001 (the trained demo model is confident: ~100 candidates per tile);
``all-anchors`` — its boxes with uniform random class scores, so all 8400 anchors of every tile
are candidates (the worst case: global-memory sort, NMS over the whole ranking).

Preprocess: 32 tiles cut from a 4096² uint8 RGB chunk already on the GPU into fp16 NCHW, vs
torch (slicing + stack, and ``F.interpolate`` for the resize case): ``copy`` 640 → 640 (no
resize) and ``resize`` 1280 → 640.

Every timed function ends with ``torch.cuda.synchronize()``, so a time is the batch's wall time
(launch overhead included). Results, the device and the speedups go to
``bench/results/postprocess-<gpu>.json``; the goal is ≥ 20× ultralytics' NMS.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision  # imported here: ultralytics' NMS then uses torchvision.ops.nms

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _machine import host_info, update_results

from trtwsi.ops import cuda
from trtwsi.ops import reference as ref


def _why_no_gpu() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import cupy  # noqa: F401
    except Exception as e:
        return f"needs CuPy (pip install 'trtwsi[gpu]'): {e}"
    return None


_NO_GPU = _why_no_gpu()
if _NO_GPU is not None:
    pytest.skip(_NO_GPU, allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
WEIGHTS = ROOT / "trtwsi" / "models" / "demo-yolo11n.pt"  # the bundled demo model
BATCH, TILE, IMGSZ = 32, 640, 640
IOU, MAX_DET = 0.45, 300
#: case -> (head output, conf): the model's output at its usual and at a very low threshold,
#: and the worst case: the model's boxes with random scores, every anchor a candidate.
CASES = {"realistic": ("model", 0.25), "dense": ("model", 0.001), "all-anchors": ("random", 0.001)}
GOAL = 20.0  # × ultralytics non_max_suppression
ROUNDS = 50

_RESULTS: dict = {}


# ------------------------------------------------------------------------------------------
# machine + JSON
# ------------------------------------------------------------------------------------------
def machine_info() -> dict:
    info = host_info("postprocess")
    name = torch.cuda.get_device_name()
    info.update(
        gpu=name,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cupy=__import__("cupy").__version__,
        device=f"GPU: {name} (CUDA {torch.version.cuda}); host {info['cpu']}, {info['cores']} cores",
    )
    return info


def results_path(info: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower()).strip("-")[:40] or "gpu"
    return RESULTS_DIR / f"postprocess-{slug}.json"


def _speedups(data: dict) -> dict:
    """Speedups of trtwsi over each other implementation, per recorded case, and the goal."""
    speed = {}
    for case, r in data.get("postprocess", {}).items():
        t = r.get("seconds", {})
        if "trtwsi" in t:
            speed[case] = {k: t[k] / t["trtwsi"] for k in t if k != "trtwsi"}
    pre = {}
    for case, r in data.get("preprocess", {}).items():
        t = r.get("seconds", {})
        if "trtwsi" in t and "torch" in t:
            pre[case] = t["torch"] / t["trtwsi"]
    return {
        "speedup_postprocess": speed,
        "speedup_preprocess": pre,
        "goal": {
            "speedup_vs_ultralytics": GOAL,
            "met": {c: s.get("ultralytics", 0.0) >= GOAL for c, s in speed.items()},
        },
    }


def write_results() -> Path:
    info = machine_info()
    return update_results(results_path(info), _RESULTS, info, derive=_speedups)


def _record(section: str, case: str, who: str, benchmark, extra: dict) -> None:
    entry = _RESULTS.setdefault(section, {}).setdefault(case, {"seconds": {}})
    entry["seconds"][who] = benchmark.stats["min"]
    entry.setdefault("median_seconds", {})[who] = benchmark.stats["median"]
    entry.update(extra)
    write_results()


def _timed(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_output():
    """(32, 4 + nc, 8400) fp16 CUDA head output of the demo model on 32 tiles, and the model."""
    pytest.importorskip("ultralytics", reason="the demo model needs ultralytics")
    from trtwsi.engines.model import Model
    from trtwsi.synthetic import Scene

    if not WEIGHTS.exists():
        pytest.skip(f"{WEIGHTS} is not there")
    model = Model(WEIGHTS, head="nms")
    net = model.module.cuda().half()
    cols, rows = 8, BATCH // 8
    scene = Scene(cols * TILE + 400, rows * TILE + 400, seed=1)
    chunk = scene.render(200, 200, cols * TILE, rows * TILE)
    offsets = [(c * TILE, r * TILE) for r in range(rows) for c in range(cols)]
    x = cuda.preprocess_chunk(torch.from_numpy(chunk).cuda(), offsets, (TILE, TILE), IMGSZ)
    with torch.no_grad():
        y = net(x)
    raw = (y[0] if isinstance(y, (tuple, list)) else y).contiguous()
    torch.cuda.synchronize()
    assert raw.shape[0] == BATCH and raw.dtype == torch.float16
    origins = torch.tensor(offsets, dtype=torch.float64, device="cuda") + 1e5
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(raw[:, 4:].shape, generator=g) * 0.9 + 0.05
    raw_random = torch.cat([raw[:, :4], scores.to(raw)], 1).contiguous()
    return {"model": raw, "random": raw_random}, origins, model.nc


def _ultralytics_nms():
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:  # older ultralytics
        from ultralytics.utils.ops import non_max_suppression
    return non_max_suppression


def torchvision_postprocess(raw: torch.Tensor, conf: float, iou: float, max_det: int):
    """Batched torch decode + one batched_nms over all tiles (group = tile * nc + class)."""
    nc = raw.shape[1] - 4
    r = raw.float().transpose(1, 2)  # (B, N, 4 + nc)
    score, cls = r[..., 4:].max(2)
    keep = score > conf
    b_idx = keep.nonzero()[:, 0]
    xywh, s, c = r[..., :4][keep], score[keep], cls[keep]
    boxes = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    k = torchvision.ops.batched_nms(boxes, s, b_idx * nc + c, iou)
    return boxes[k], s[k], c[k], b_idx[k]  # (not capped at max_det per tile: a favour to it)


# ------------------------------------------------------------------------------------------
# postprocess
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("who", ["trtwsi", "ultralytics", "torchvision"])
def test_postprocess(benchmark, head_output, case, who):
    raws, origins, nc = head_output
    which, conf = CASES[case]
    raw = raws[which]
    lb = ref.letterbox_params(TILE, TILE, IMGSZ)
    if who == "trtwsi":
        out = torch.empty((BATCH, MAX_DET, 6), dtype=torch.float64, device="cuda")
        counts = torch.empty(BATCH, dtype=torch.int32, device="cuda")

        def fn():
            return cuda.postprocess(
                raw, "nms", conf, IOU, MAX_DET, origins, lb, (TILE, TILE), 1.0,
                out=out, counts=counts,
            )  # fmt: skip
    elif who == "ultralytics":
        nms = _ultralytics_nms()

        def fn():
            return nms(raw, conf, IOU, max_det=MAX_DET)
    else:

        def fn():
            return torchvision_postprocess(raw, conf, IOU, MAX_DET)

    result = benchmark.pedantic(_timed(fn), rounds=ROUNDS, iterations=1, warmup_rounds=3)
    score, _ = raw.float()[:, 4:].max(1)
    extra = {
        "batch": BATCH,
        "anchors": int(raw.shape[2]),
        "nc": nc,
        "conf": conf,
        "iou": IOU,
        "max_det": MAX_DET,
        "input_dtype": str(raw.dtype),
        "head_output": which,
        "candidates_per_tile_mean": float((score > conf).sum(1).float().mean()),
    }
    if who == "trtwsi":
        extra["detections_per_tile_mean"] = float(result[1].float().mean())
    _record("postprocess", case, who, benchmark, extra)


# ------------------------------------------------------------------------------------------
# preprocess
# ------------------------------------------------------------------------------------------
PRE_CASES = {"copy": 640, "resize": 1280}  # tile side -> dst 640


@pytest.fixture(scope="module")
def chunk_on_device():
    g = torch.Generator().manual_seed(0)
    chunk = torch.randint(0, 256, (4096, 4096, 3), dtype=torch.uint8, generator=g).cuda()
    torch.cuda.synchronize()
    return chunk


def torch_preprocess(chunk: torch.Tensor, offsets, tile: int, dst: int) -> torch.Tensor:
    """The plain-torch way: slice the tiles, stack, NCHW, /255, resize (F.interpolate) and pad."""
    import torch.nn.functional as F

    crops = torch.stack([chunk[y : y + tile, x : x + tile] for x, y in offsets])
    x = crops.permute(0, 3, 1, 2).float()
    lb = ref.letterbox_params(tile, tile, dst)
    if (lb.new_h, lb.new_w) != (tile, tile):
        x = F.interpolate(x, size=(lb.new_h, lb.new_w), mode="bilinear", align_corners=False)
    if (lb.new_h, lb.new_w) != (dst, dst):
        pads = (lb.pad_x, dst - lb.new_w - lb.pad_x, lb.pad_y, dst - lb.new_h - lb.pad_y)
        x = F.pad(x, pads, value=float(ref.PAD_VALUE))
    return (x / 255).half()


@pytest.mark.parametrize("case", list(PRE_CASES))
@pytest.mark.parametrize("who", ["trtwsi", "torch"])
def test_preprocess(benchmark, chunk_on_device, case, who):
    tile = PRE_CASES[case]
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(0, 4096 - tile + 1, (BATCH, 2), generator=g).tolist()
    if who == "trtwsi":
        t_off, strides = cuda.tile_byte_offsets(offsets, chunk_on_device.shape, (tile, tile))
        t_off, strides = torch.from_numpy(t_off).cuda(), torch.from_numpy(strides).cuda()
        src = chunk_on_device.view(-1)
        out = torch.empty((BATCH, 3, IMGSZ, IMGSZ), dtype=torch.float16, device="cuda")

        def fn():
            return cuda.preprocess(src, t_off, strides, (tile, tile), IMGSZ, out)
    else:

        def fn():
            return torch_preprocess(chunk_on_device, offsets, tile, IMGSZ)

    benchmark.pedantic(_timed(fn), rounds=ROUNDS, iterations=1, warmup_rounds=3)
    extra = {"batch": BATCH, "tile": tile, "dst": IMGSZ, "chunk": [4096, 4096], "out": "float16"}
    _record("preprocess", case, who, benchmark, extra)
