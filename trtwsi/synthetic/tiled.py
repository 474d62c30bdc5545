"""A simulated tiled detector: what a perfect but jittery detector run tile by tile reports.

Test and benchmark support for the seam merge (:mod:`trtwsi.merge`): ``make_layout`` places
ground-truth objects (on seams, dense nuclei, sparse metaphases, objects larger than the
overlap), ``simulate_tiled_detections`` clips them to every tile that sees them and jitters
them. ``bench/bench_merge.py`` chose the merge defaults with it. Frames: level-0 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trtwsi.errors import MergeError
from trtwsi.merge import overlapping_pairs
from trtwsi.plan.grid import axis_positions

__all__ = [
    "SimulatedDetections",
    "make_layout",
    "rows_by_tile",
    "simulate_tiled_detections",
    "tile_origins",
]


def tile_origins(length: int, tile: int, overlap: float) -> np.ndarray:
    """Tile start positions along one axis (level-0 px) for a slide of ``length`` px: the same
    placement as :class:`trtwsi.plan.grid.TileGrid` (stride ``round(tile·(1-overlap))`` from 0,
    the last tile flush with the far edge)."""
    stride = max(1, round(tile * (1.0 - overlap)))
    return axis_positions(0, length, tile, stride, length)


@dataclass(frozen=True)
class SimulatedDetections:
    """What a detector run tile by tile reports, in level-0 coordinates (M detections)."""

    boxes: np.ndarray  # (M, 4) float64 (x1, y1, x2, y2) level-0 px
    scores: np.ndarray  # (M,) float32
    classes: np.ndarray  # (M,) int64
    gt_index: np.ndarray  # (M,) int64 ground-truth row each detection comes from
    tile_index: np.ndarray  # (M,) int64 tile (row-major over the tile grid)
    visible: np.ndarray  # (M,) float64 fraction of the object's area inside the tile


def simulate_tiled_detections(
    gt_boxes: np.ndarray,
    tile: int,
    overlap: float,
    slide_w: int,
    slide_h: int,
    rng: np.random.Generator,
    jitter_px: float = 1.0,
    min_visible: float = 0.5,
    truncation_penalty: float = 0.3,
    score_noise: float = 0.02,
) -> SimulatedDetections:
    """Detections a perfect-but-jittery detector reports when run tile by tile.

    ``gt_boxes``: ``(N, 5)`` float ``(x1, y1, x2, y2, class)`` level-0 px. Tiles: ``tile`` px
    squares at :func:`tile_origins` on both axes. Every object is clipped to every tile it touches
    and reported there if at least ``min_visible`` of its area is inside the tile. Each report gets
    independent Gaussian jitter (``jitter_px`` sd) on its four coordinates (then clipped to the
    tile), and a score ``s0 + N(0, score_noise) - truncation_penalty·(1 - visible)``, where
    ``s0 ~ U(0.55, 0.95)`` is the object's own confidence, shared by its reports: a detector is
    less sure of a truncated object. Returns :class:`SimulatedDetections` (level-0 px).
    """
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 5)
    n = gt.shape[0]
    xs = tile_origins(slide_w, tile, overlap)
    ys = tile_origins(slide_h, tile, overlap)
    s0 = rng.uniform(0.55, 0.95, n)

    def spans(lo, hi, origins):
        # tiles [o, o + tile) with o < hi and o + tile > lo
        first = np.searchsorted(origins + tile, lo, side="right")
        last = np.searchsorted(origins, hi, side="left")
        return first, np.maximum(last - first, 0)

    fx, nx = spans(gt[:, 0], gt[:, 2], xs)
    fy, ny = spans(gt[:, 1], gt[:, 3], ys)
    cnt = nx * ny
    gi = np.repeat(np.arange(n), cnt)
    k = np.arange(gi.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    tx = fx[gi] + k % nx[gi]
    ty = fy[gi] + k // nx[gi]
    ox = xs[tx].astype(np.float64)
    oy = ys[ty].astype(np.float64)
    g = gt[gi]
    cb = np.stack(
        [
            np.maximum(g[:, 0], ox),
            np.maximum(g[:, 1], oy),
            np.minimum(g[:, 2], ox + tile),
            np.minimum(g[:, 3], oy + tile),
        ],
        axis=1,
    )
    full = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    vis_area = np.clip(cb[:, 2] - cb[:, 0], 0, None) * np.clip(cb[:, 3] - cb[:, 1], 0, None)
    vis = np.divide(vis_area, full, out=np.zeros_like(full), where=full > 0)
    m = vis >= min_visible
    gi, cb, vis, ox, oy = gi[m], cb[m], vis[m], ox[m], oy[m]
    tidx = (ty * xs.size + tx)[m]
    cb = cb + rng.normal(0.0, jitter_px, cb.shape)
    cb[:, [0, 2]] = np.clip(cb[:, [0, 2]], ox[:, None], ox[:, None] + tile)
    cb[:, [1, 3]] = np.clip(cb[:, [1, 3]], oy[:, None], oy[:, None] + tile)
    cb[:, 2] = np.maximum(cb[:, 2], cb[:, 0] + 1e-3)
    cb[:, 3] = np.maximum(cb[:, 3], cb[:, 1] + 1e-3)
    score = s0[gi] + rng.normal(0.0, score_noise, gi.size) - truncation_penalty * (1.0 - vis)
    score = np.clip(score, 0.01, 1.0).astype(np.float32)
    return SimulatedDetections(
        boxes=cb,
        scores=score,
        classes=gt[gi, 4].astype(np.int64),
        gt_index=gi.astype(np.int64),
        tile_index=tidx.astype(np.int64),
        visible=vis,
    )


def rows_by_tile(
    sim: SimulatedDetections,
    origin: tuple[float, float] = (0.0, 0.0),
    section: int = 0,
    base: int = 0,
    keep: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """``sim``'s reports as the runtime's rows, per tile: slide-wide tile id → ``(M, 8)``
    float64 ``x1 y1 x2 y2 score class section tile`` (level-0 px). The simulation ran on a
    grid whose top-left is ``origin``; ``keep``: the lattice tiles (row-major, ascending) the
    grid keeps, the others' reports dropped (None: all); tile ids are ``base`` + the position
    among the kept tiles, as :func:`~trtwsi.plan.slide_plan.plan_slide` numbers them."""
    tiles = sim.tile_index
    if keep is None:
        pos, m = tiles, np.ones(tiles.size, dtype=bool)
    else:
        keep = np.asarray(keep, dtype=np.int64)
        pos = np.searchsorted(keep, tiles)
        m = (pos < keep.size) & (keep[np.minimum(pos, keep.size - 1)] == tiles)
    ox, oy = origin
    rows = np.column_stack([
        sim.boxes + np.array([ox, oy, ox, oy]), sim.scores, sim.classes,
        np.full(tiles.size, section), base + pos,
    ]).astype(np.float64)[m]  # fmt: skip
    if not len(rows):
        return {}
    order = np.argsort(rows[:, 7], kind="stable")
    rows = rows[order]
    ids, starts = np.unique(rows[:, 7].astype(np.int64), return_index=True)
    return dict(zip(ids.tolist(), np.split(rows, starts[1:]), strict=True))


def make_layout(
    kind: str,
    slide_w: int,
    slide_h: int,
    rng: np.random.Generator,
    *,
    tile: int = 640,
    overlap: float = 0.2,
    n_classes: int = 1,
) -> np.ndarray:
    """Ground-truth layouts for the merge measurement: ``(N, 5)`` ``(x1, y1, x2, y2, class)``.

    ``kind``:
      - ``"nuclei"``: 20–40 px boxes (independent width/height), dense: centres on a ±7 px
        jittered 32.3 px lattice, so neighbours touch and sometimes overlap a little, as in tissue.
      - ``"metaphases"``: 60–120 px boxes, sparse (±80 px jittered 301.7 px lattice).
      - ``"large"``: 130–300 px boxes, sparse (±150 px jittered 701.3 px lattice): larger than
        the tile overlap, so some are seen whole by no tile.
      - ``"seams"``: 40–120 px boxes centred on tile borders (both axes) and on tile corners,
        offset by up to ±20 px: the worst case of a tiled detector.
    Objects are kept inside the slide. Classes are drawn uniformly from ``range(n_classes)``.
    """
    if kind == "nuclei":
        pitch, lo, hi, jit = 32.3, 20.0, 40.0, 7.0
    elif kind == "metaphases":
        pitch, lo, hi, jit = 301.7, 60.0, 120.0, 80.0
    elif kind == "large":
        pitch, lo, hi, jit = 701.3, 130.0, 300.0, 150.0
    elif kind == "seams":
        lo, hi = 40.0, 120.0
    else:
        raise MergeError(
            f"layout kind must be 'nuclei', 'metaphases', 'large' or 'seams', got {kind!r}"
        )
    if kind == "seams":
        xs = tile_origins(slide_w, tile, overlap)
        ys = tile_origins(slide_h, tile, overlap)
        # the seams: both edges of every tile overlap band
        sx = np.unique(np.r_[xs[1:], xs[:-1] + tile]).astype(np.float64)
        sy = np.unique(np.r_[ys[1:], ys[:-1] + tile]).astype(np.float64)
        centres = [np.stack(np.meshgrid(sx, sy), -1).reshape(-1, 2)]  # corners
        mids_x = (np.r_[0.0, sx] + np.r_[sx, slide_w]) / 2  # between vertical seams
        mids_y = (np.r_[0.0, sy] + np.r_[sy, slide_h]) / 2
        centres.append(np.stack(np.meshgrid(sx, mids_y), -1).reshape(-1, 2))  # vertical seams
        centres.append(np.stack(np.meshgrid(mids_x, sy), -1).reshape(-1, 2))  # horizontal
        c = np.concatenate(centres)
        c = c + rng.uniform(-20, 20, c.shape)
    else:
        # a lattice pitch and phase unrelated to the tile grid, so seams cut objects anywhere
        gx = np.arange(rng.uniform(0, pitch), slide_w, pitch)
        gy = np.arange(rng.uniform(0, pitch), slide_h, pitch)
        c = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        c = c + rng.uniform(-jit, jit, c.shape)
    wh = rng.uniform(lo, hi, c.shape)
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
    inside = (
        (boxes[:, 0] >= 0)
        & (boxes[:, 1] >= 0)
        & (boxes[:, 2] <= slide_w)
        & (boxes[:, 3] <= slide_h)
    )
    boxes = boxes[inside]
    if kind == "seams":  # drop the rare colliding pair so every object is distinct
        _, j = overlapping_pairs(boxes, metric="iou", threshold=0.0)
        boxes = np.delete(boxes, np.unique(j), axis=0)
    cls = rng.integers(0, n_classes, boxes.shape[0]).astype(np.float64)
    return np.concatenate([boxes, cls[:, None]], axis=1)
