"""The reference tile loop: torch forward + reference ops (the CPU path; runs everywhere).

Reads chunks with reader threads (a few ahead), preprocesses each chunk's tiles, runs each
model of the input-size group on full batches, and post-processes with
:mod:`trtwsi.ops.reference`. Detections leave in level-0 slide px as ``(M, 8)`` float64 rows
``x1 y1 x2 y2 score class section tile`` (see :mod:`trtwsi.runtime.finish`).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

__all__ = ["CPU_CHUNK_PIXELS", "ReferenceRunner", "prefetch"]

#: Read-level pixels per chunk read on the CPU path (3 × 3 tiles of 640 px at 0.2 overlap: a
#: 1665² read; at most a few chunks are held at once, see ``prefetch``).
CPU_CHUNK_PIXELS = 1700 * 1700


def prefetch(fn: Callable, items: Sequence, workers: int, depth: int) -> Iterable:
    """Yield ``fn(item)`` in order, computed by ``workers`` threads at most ``depth`` ahead."""
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


class ReferenceRunner:
    """Runs slide plans tile by tile with torch and the reference ops.

    Args:
        models: all :class:`~trtwsi.engines.model.Model` objects of the runtime.
        engines: their engines (same order), any batch size.
        batch: tiles per forward pass; ``workers``: reader threads; ``max_det``: per-tile cap.
    """

    def __init__(self, models, engines, *, batch: int, workers: int, max_det: int):
        self.models = list(models)
        self.engines = list(engines)
        self.batch = int(batch)
        self.workers = max(1, int(workers))
        self.max_det = int(max_det)

    def run(self, plan, timer, bar=None) -> list[list[np.ndarray]]:
        """All tiles of ``plan``; returns per model a list of ``(M, 8)`` row arrays."""
        out: list[list[np.ndarray]] = [[] for _ in self.models]
        for size, grids in plan.grids.items():
            ids = [i for i, m in enumerate(self.models) if m.imgsz == size]
            for (sec, _), grid, base in zip(plan.targets, grids, plan.tile_base[size], strict=True):
                if len(grid):
                    self._run_grid(plan.slide, grid, ids, sec, base, out, timer, bar)
        return out

    def _run_grid(self, slide, grid, model_ids, section, tile_base, out, timer, bar) -> None:
        import torch

        from trtwsi.ops import reference as ref

        imgsz = self.models[model_ids[0]].imgsz
        level, rs = grid.read_level, grid.read_size
        lb = ref.letterbox_params(rs, rs, imgsz)
        l0_per_px = grid.tile_l0 / rs

        def read(chunk):
            t0 = time.perf_counter()
            cx, cy, _, _ = chunk.region
            cw, ch = chunk.read_size
            img = slide.read_region(cx, cy, cw, ch, level=level, only=chunk.windows(rs))
            timer.add("read", time.perf_counter() - t0)
            return chunk, img

        pend_x: list = []
        pend_ids: list = []

        def flush():
            if not pend_x:
                return
            x = torch.cat(pend_x)
            tiles = np.concatenate(pend_ids)
            pend_x.clear()
            pend_ids.clear()
            origins = grid.tiles[tiles, :2]
            for mi in model_ids:
                m, eng = self.models[mi], self.engines[mi]
                t0 = time.perf_counter()
                raw = eng.infer(x.to(eng.device, eng.dtype, non_blocking=True))
                timer.add("infer", time.perf_counter() - t0)
                t0 = time.perf_counter()
                per_tile = ref.postprocess(
                    raw.float().cpu(), m.head, m.min_conf, m.iou, self.max_det
                )
                for dets, (ox, oy), t in zip(per_tile, origins, tiles, strict=True):
                    if len(dets):
                        d = ref.scale_to_slide(dets, lb, (ox, oy), l0_per_px).double().numpy()
                        extra = np.broadcast_to([float(section), float(tile_base + t)], (len(d), 2))
                        out[mi].append(np.column_stack([d, extra]))
                timer.add("postprocess", time.perf_counter() - t0)
            if bar is not None:
                bar.update(len(tiles))

        n_pending = 0
        chunks = grid.chunks(max_pixels=CPU_CHUNK_PIXELS)
        for chunk, img in prefetch(read, chunks, self.workers, depth=max(2, self.workers)):
            # tiles are preprocessed a batch at a time, so float temporaries stay batch-sized
            # (a whole chunk of up to ~56 tiles made ~275 MB of them at once)
            start, n = 0, len(chunk.offsets)
            while start < n:
                take = min(self.batch - n_pending, n - start)
                t0 = time.perf_counter()
                x = ref.preprocess(img, chunk.offsets[start : start + take], (rs, rs), imgsz)
                timer.add("preprocess", time.perf_counter() - t0)
                pend_x.append(x)
                pend_ids.append(chunk.tile_indices[start : start + take])
                n_pending += take
                start += take
                if n_pending == self.batch:
                    flush()
                    n_pending = 0
        flush()
