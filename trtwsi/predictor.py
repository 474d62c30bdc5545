"""Predictor: slide → sections → tile grid → read chunks → preprocess → model(s) → merge → Results.

Two inner loops share the orchestration (sections, grids, merge, Results): the reference path
(torch forward + reference ops; the CPU path, runs everywhere) and, on a CUDA device with CuPy,
the GPU pipeline (:class:`trtwsi.runtime.gpu.pipeline.GpuPipeline`: pinned ring buffers, own streams, CuPy
preprocess/decode/NMS kernels, CUDA-graph forward).

Coordinate frames: tiles and detections leave :meth:`Predictor._run_grid` in level-0 slide px.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from trtwsi.errors import TilingError, TrtwsiError
from trtwsi.plan.tissue import find_sections
from trtwsi.slide import Slide, open_slide


class _Timer:
    """Accumulates wall-clock seconds per stage (thread-safe)."""

    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.t[stage] += seconds


def _prefetch(fn, items: Sequence, workers: int, depth: int) -> Iterable:
    """Yield ``fn(item)`` in order, computed by ``workers`` threads at most ``depth`` ahead."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="trtwsi-read") as ex:
        pending: queue.SimpleQueue = queue.SimpleQueue()
        it = iter(items)
        n_inflight = 0
        for item in it:
            pending.put(ex.submit(fn, item))
            n_inflight += 1
            if n_inflight >= depth:
                break
        while n_inflight:
            fut = pending.get()
            n_inflight -= 1
            nxt = next(it, None)
            if nxt is not None:
                pending.put(ex.submit(fn, nxt))
                n_inflight += 1
            yield fut.result()


class Predictor:
    """Run one or more YOLO detectors over a slide.

    Args:
        slide: path, array or Slide (see :func:`trtwsi.open_slide`).
        models: Model objects or .pt paths. Models with the same input size share reads and
            preprocessing; each model keeps its own ``min_conf`` / ``iou`` / classes.
        overlap: tile overlap, ratio in [0, 1) or pixels (model px).
        mpp: microns per pixel of the models' input (None: level-0 pixels as they are).
        batch: tiles per forward pass (None: 32 on the GPU pipeline, 8 otherwise). The GPU
            pipeline pads the last batch to this size (fixed shapes for CUDA graphs/engines).
        workers: reader threads (default: CPU count).
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N".
        timing: collect per-stage seconds into ``Results.timings``.
        progress: show a tqdm progress bar (tiles, tiles/s, ETA).
        merge: dict of options for :func:`trtwsi.merge.merge_detections` (method, metric, threshold,
            class_aware) — defaults chosen by measurement, see trtwsi/merge.py.
        min_tissue: drop tiles whose tissue fraction (from the section mask) is below this.
        slide_mpp: override the slide's own µm/px.
        max_det: per-tile cap on detections.
        gpu_pipeline: use the GPU pipeline (True), the reference path (False), or the pipeline
            whenever the device is CUDA and CuPy is installed (None).
        readers: how the GPU pipeline reads: ``"auto"``, ``"threads"`` or ``"processes"``
            (see :class:`trtwsi.runtime.gpu.pipeline.GpuPipeline`).
        engine_cache: a dict shared by several Predictors (a batch worker's slides) in which
            loaded engines are kept and reused, keyed by model, device, precision and batch
            size, so a worker loads each model's engine once; None: engines belong to this
            Predictor.
    """

    def __init__(
        self,
        slide,
        models: Sequence = (),
        *,
        overlap: float = 0.2,
        mpp: float | None = None,
        batch: int | None = None,
        workers: int | None = None,
        device: str = "auto",
        timing: bool = True,
        progress: bool = False,
        merge: dict | None = None,
        min_tissue: float = 0.0,
        slide_mpp: float | None = None,
        max_det: int = 300,
        gpu_pipeline: bool | None = None,
        readers: str = "auto",
        engine_cache: dict | None = None,
    ):
        from trtwsi.engines.model import Model

        self.slide: Slide = open_slide(slide, mpp=slide_mpp)
        if not models:
            raise TrtwsiError("Predictor needs at least one model (a trtwsi.Model or a .pt path)")
        self.models = [m if isinstance(m, Model) else Model(m) for m in models]
        if batch is not None and batch < 1:
            raise TrtwsiError(f"batch must be >= 1, got {batch}")
        self.overlap = overlap
        self.mpp = mpp
        self.workers = workers or os.cpu_count() or 1
        self.device = self._pick_device(device)
        self.gpu_pipeline = self._pick_pipeline(gpu_pipeline)
        self.batch = int(batch) if batch is not None else (32 if self.gpu_pipeline else 8)
        self.timing = timing
        self.progress = progress
        self.merge_opts = dict(merge or {})
        self.min_tissue = min_tissue
        self.max_det = max_det
        self._engines = None
        self._pipelines: dict[int, object] = {}
        self.readers = readers
        self._engine_cache = engine_cache

    # --- setup -------------------------------------------------------------------------------
    @staticmethod
    def _pick_device(device: str) -> str:
        import torch

        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise TrtwsiError(
                f"device={device!r} asked for, but torch sees no CUDA GPU; use device='cpu'"
            )
        return device

    def _pick_pipeline(self, want: bool | None) -> bool:
        if not self.device.startswith("cuda"):
            if want:
                raise TrtwsiError(
                    f"gpu_pipeline=True needs a CUDA device, but device={self.device!r}"
                )
            return False
        from trtwsi.runtime.gpu.device import gpu_unavailable_reason

        why = gpu_unavailable_reason()
        if want and why is not None:
            raise TrtwsiError(f"gpu_pipeline=True but the GPU pipeline cannot run: {why}")
        return why is None if want is None else bool(want)

    def _get_engines(self):
        if self._engines is None:
            half = self.device.startswith("cuda")
            bs = self.batch if self.gpu_pipeline else None
            self._engines = [self._load_engine(m, half, bs) for m in self.models]
        return self._engines

    def _load_engine(self, m, half: bool, batch_size: int | None):
        """``m.load_engine(...)``, through ``engine_cache`` when one was given."""
        cache = self._engine_cache
        if cache is None:
            return m.load_engine(self.device, half=half, batch_size=batch_size)
        key = (id(m), self.device, half, batch_size)
        hit = cache.get(key)
        if hit is None or hit[0] is not m:  # (the model is kept: its id cannot be reused)
            hit = cache[key] = (m, m.load_engine(self.device, half=half, batch_size=batch_size))
        return hit[1]

    def _pipeline(self, model_ids: list[int]):
        """The GPU pipeline of one input-size group (created once, buffers reused)."""
        key = self.models[model_ids[0]].imgsz
        if key not in self._pipelines:
            from trtwsi.runtime.gpu.pipeline import GpuPipeline

            engines = self._get_engines()
            self._pipelines[key] = GpuPipeline(
                self.slide,
                [self.models[i] for i in model_ids],
                [engines[i] for i in model_ids],
                self.device,
                batch=self.batch,
                workers=self.workers,
                max_det=self.max_det,
                timer=None,
                timing=self.timing,
                readers=self.readers,
            )
        return self._pipelines[key]

    def close(self) -> None:
        """Release GPU pipeline resources (reader processes, shared buffers)."""
        for p in self._pipelines.values():
            p.close()
        self._pipelines.clear()

    # --- running -----------------------------------------------------------------------------
    def run(self, section: int | None = None, region: tuple[int, int, int, int] | None = None):
        """Detect on all tissue sections (default), one section (index in reading order), or a
        level-0 ``region`` ``(x, y, w, h)``. Returns :class:`trtwsi.results.Results`."""
        from trtwsi.results import Results

        t_start = time.perf_counter()
        timer = _Timer()
        t = time.perf_counter()
        if region is not None:
            if section is not None:
                raise TrtwsiError("give either section= or region=, not both")
            x, y, w, h = (int(v) for v in region)
            if w <= 0 or h <= 0:
                raise TilingError(f"region must have positive size, got {region}")
            targets = [(-1, (x, y, w, h))]
            sections_info = []
        else:
            sections = find_sections(self.slide)
            sections_info = [
                {"index": s.index, "bbox": list(map(int, s.bbox)), "area": int(s.area)}
                for s in sections
            ]
            if section is not None:
                if not 0 <= section < len(sections):
                    raise TrtwsiError(
                        f"section {section} does not exist: this slide has {len(sections)} tissue "
                        f"section(s) (0..{len(sections) - 1}); run `trtwsi info` to list them"
                    )
                sections = [sections[section]]
            targets = [(s.index, s) for s in sections]
        timer.add("sections", time.perf_counter() - t)

        per_model: list[list[np.ndarray]] = [[] for _ in self.models]
        n_tiles = 0
        self._bar = None
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=0, unit="tile", desc="tiles", dynamic_ncols=True)
        if self.gpu_pipeline:  # all sections of an input size in one pipeline pass
            runs = [
                (sec_index, nd)
                for group in self._imgsz_groups()
                for (sec_index, _), nd in zip(
                    targets, self._run_grids_gpu([t for _, t in targets], group, timer), strict=True
                )
            ]
        else:
            runs = [
                (sec_index, self._run_grid(target, group, timer))
                for sec_index, target in targets
                for group in self._imgsz_groups()
            ]
        for sec_index, (n, dets) in runs:
            n_tiles += n
            for mi, d in dets.items():
                if len(d):
                    per_model[mi].append(np.column_stack([d, np.full(len(d), sec_index)]))

        if self._bar is not None:
            self._bar.close()
        t = time.perf_counter()
        detections = self._merge(per_model)
        timer.add("merge", time.perf_counter() - t)
        total = time.perf_counter() - t_start
        timings = {k: round(v, 6) for k, v in timer.t.items()} if self.timing else {}
        timings["total"] = round(total, 6)
        errors = [
            {
                "type": type(e).__name__,
                "message": str(e),
                "level": e.level,
                "tile": list(e.tile) if isinstance(e.tile, tuple) else e.tile,
                "region": list(e.region) if e.region is not None else None,
            }
            for e in self.slide.read_errors
        ]
        return Results(
            detections=detections,
            timings=timings,
            errors=errors,
            slide=self.slide.info().__dict__,
            models=[self._describe(m) for m in self.models],
            params={
                "overlap": self.overlap,
                "mpp": self.mpp,
                "batch": self.batch,
                "device": self.device,
                "pipeline": "gpu" if self.gpu_pipeline else "reference",
                "section": section,
                "region": list(region) if region is not None else None,
                "merge": self.merge_opts,
            },
            sections=sections_info,
            n_tiles=n_tiles,
        )

    def _describe(self, m) -> dict:
        kind, reason = m.resolve_backend(self.device)
        return {
            "name": m.name,
            "weights": str(m.weights),
            "sha256": m.sha256,
            "classes": list(m.names),
            "head": m.head,
            "imgsz": m.imgsz,
            "min_conf": m.min_conf,
            "iou": m.iou,
            "backend": kind,
            "reason": reason,
        }

    def _imgsz_groups(self) -> list[list[int]]:
        by_size: dict[int, list[int]] = defaultdict(list)
        for i, m in enumerate(self.models):
            by_size[m.imgsz].append(i)
        return list(by_size.values())

    def _grid(self, target, model_ids: list[int]):
        """The TileGrid of ``target`` (Section or level-0 box) at the group's input size."""
        from trtwsi.plan.grid import TileGrid

        return TileGrid(
            self.slide,
            target,
            tile_size=self.models[model_ids[0]].imgsz,
            overlap=self.overlap,
            mpp=self.mpp,
            min_tissue=self.min_tissue,
        )

    def _run_grids_gpu(self, targets, model_ids: list[int], timer: _Timer):
        """GPU pipeline over the grids of all ``targets`` at once; one ``(n_tiles, {model
        index: (M, 6)})`` per target, as :meth:`_run_grid` returns."""
        grids = [self._grid(t, model_ids) for t in targets]
        if self._bar is not None:
            self._bar.total += sum(len(g) for g in grids)
            self._bar.refresh()
        pipe = self._pipeline(model_ids)
        pipe.timer = timer
        results = iter(pipe.run_grids([g for g in grids if len(g)], bar=self._bar))
        out = []
        for g in grids:
            if len(g) == 0:
                out.append((0, {mi: np.zeros((0, 6)) for mi in model_ids}))
                continue
            dets = next(results)
            out.append((len(g), {mi: dets[k] for k, mi in enumerate(model_ids)}))
        return out

    def _run_grid(self, target, model_ids: list[int], timer: _Timer):
        """Tile ``target`` (Section or level-0 box) at the group's input size and run its models.

        Returns (number of tiles, {model index: (M, 6) float64 rows x1 y1 x2 y2 score class in
        level-0 px}) before cross-tile merging.
        """
        import torch

        from trtwsi.ops import reference as ref

        imgsz = self.models[model_ids[0]].imgsz
        grid = self._grid(target, model_ids)
        out: dict[int, list[np.ndarray]] = {mi: [] for mi in model_ids}
        if len(grid) == 0:
            return 0, {mi: np.zeros((0, 6)) for mi in model_ids}
        bar = self._bar
        if bar is not None:
            bar.total += len(grid)
            bar.refresh()
        engines = self._get_engines()
        chunks = grid.chunks()
        level = grid.read_level
        rs = grid.read_size
        lb = ref.letterbox_params(rs, rs, imgsz)
        l0_per_px = grid.tile_l0 / rs

        def read(chunk):
            t0 = time.perf_counter()
            cx, cy, _, _ = chunk.region
            cw, ch = chunk.read_size
            img = self.slide.read_region(cx, cy, cw, ch, level=level)
            timer.add("read", time.perf_counter() - t0)
            return chunk, img

        pend_x: list = []  # preprocessed tiles waiting for a full batch
        pend_origin: list = []

        def flush():
            if not pend_x:
                return
            x = torch.cat(pend_x)
            origins = np.concatenate(pend_origin)
            pend_x.clear()
            pend_origin.clear()
            for mi in model_ids:
                m, eng = self.models[mi], engines[mi]
                t0 = time.perf_counter()
                raw = eng.infer(x.to(eng.device, eng.dtype, non_blocking=True))
                timer.add("infer", time.perf_counter() - t0)
                t0 = time.perf_counter()
                per_tile = ref.postprocess(
                    raw.float().cpu(), m.head, m.min_conf, m.iou, self.max_det
                )
                for dets, (ox, oy) in zip(per_tile, origins, strict=True):
                    if len(dets):
                        out[mi].append(
                            ref.scale_to_slide(dets, lb, (ox, oy), l0_per_px).double().numpy()
                        )
                timer.add("postprocess", time.perf_counter() - t0)
            if bar is not None:
                bar.update(len(origins))

        n_pending = 0
        for chunk, img in _prefetch(read, chunks, self.workers, depth=max(2, self.workers)):
            t0 = time.perf_counter()
            x = ref.preprocess(img, chunk.offsets, (rs, rs), imgsz)
            timer.add("preprocess", time.perf_counter() - t0)
            origins = grid.tiles[chunk.tile_indices, :2]
            # split the chunk's tiles into batch-sized pieces
            start = 0
            while start < len(x):
                take = min(self.batch - n_pending, len(x) - start)
                pend_x.append(x[start : start + take])
                pend_origin.append(origins[start : start + take])
                n_pending += take
                start += take
                if n_pending == self.batch:
                    flush()
                    n_pending = 0
        flush()
        return len(grid), {
            mi: (np.concatenate(v) if v else np.zeros((0, 6))) for mi, v in out.items()
        }

    def _merge(self, per_model: list[list[np.ndarray]]):
        """Merge duplicates across tile seams per model; returns Detections."""
        from trtwsi.merge import merge_detections
        from trtwsi.results import Detections

        parts = []
        for mi, rows in enumerate(per_model):
            if not rows:
                continue
            d = np.concatenate(rows)  # x1 y1 x2 y2 score class section
            merged = merge_detections(
                d[:, :4],
                d[:, 4],
                d[:, 5].astype(np.int64),
                groups=d[:, 6].astype(np.int64),
                **self.merge_opts,
            )
            parts.append((mi, merged, d))
        return Detections.from_merged(parts, models=self.models)
