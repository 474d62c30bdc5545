"""The double-buffered GPU tile pipeline: chunk reads → pinned host → device → kernels → results.

One :class:`GpuPipeline` runs one tile grid (all tiles of one input size) through one or more
engines of that size. Per batch of ``batch`` tiles (the last one padded, so CUDA graphs and
fixed-shape engines stay valid)::

    reader threads ─ read_region(out=pinned slot) ─┐
                                                   ▼ copy stream: H2D of the whole chunk into a
                                                     device slot (a pixel crosses PCIe once,
                                                     whatever the overlap); event h2d[i]
    compute stream: wait h2d events → preprocess kernel (all tiles of the batch, one launch)
                    → engine.infer (graph replay / TensorRT enqueue) → decode+NMS kernels
                    → level-0 shift → async D2H of (B, max_det, 6) + counts into pinned memory;
                    event done[k]
    host: waits on done[k - depth + 1] only (one event), turns rows into numpy.

Ring sizes: ``host_slots`` pinned chunk buffers (reads run that far ahead), ``device_slots``
device chunk buffers (a slot is reused only after the preprocess of the last batch that cut
tiles from it: event), ``depth`` batches in flight. No device-wide synchronize in the steady
state; the only host waits are on single events.

Frames: chunks are read-level px, tiles are cut at ``Chunk.offsets`` (read-level px),
detections come back in level-0 px as ``(M, 6)`` float64 ``x1 y1 x2 y2 score class``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from trtwsi.read.host import PinnedBuffer
from trtwsi.read.processes import ReaderStartError
from trtwsi.runtime.gpu.device import GpuStreams

__all__ = ["CHUNK_PIXELS", "GpuPipeline"]

#: Largest read (read-level px) of one chunk: 4096² px = 48 MiB of RGB per ring slot.
CHUNK_PIXELS = 4096 * 4096


@dataclass
class _Batch:
    """Host-side record of one batch in flight."""

    n: int  # real tiles (the rest is padding)
    done: object  # torch.cuda.Event recorded after the last D2H
    out_slot: int
    events: dict = field(default_factory=dict)  # stage -> (start event, end event)
    grid_ids: list = field(default_factory=list)  # grid index of each real tile


class GpuPipeline:
    """Run tile grids through engines on one GPU with overlapped reads, copies and compute.

    Args:
        slide: the :class:`~trtwsi.slide.Slide` to read.
        models: the :class:`~trtwsi.engines.model.Model` objects of one input size.
        engines: their engines (same order), each with fixed ``batch_size == batch``, on
            ``device``, computing in ``dtype`` (float16 or float32); an engine may expose a
            static ``input`` tensor that the preprocess kernel writes into directly.
        device: ``torch.device`` of the engines.
        batch: tiles per batch.
        workers: reader threads.
        max_det: per-tile cap on detections.
        timer: object with ``add(stage, seconds)`` (``predictor._Timer``).
        timing: collect per-stage GPU times from CUDA events (``h2d``, ``preprocess``,
            ``infer``, ``postprocess``; seconds summed over batches) besides wall times.
        host_slots, device_slots, depth: ring sizes (see module docstring).
        readers: ``"threads"`` (reader threads decode into pinned buffers), ``"processes"``
            (:class:`trtwsi.read.processes.ProcessReader`: ``workers`` processes decode into shared,
            page-locked buffers; slides opened from a file only) or ``"auto"`` (processes for
            file slides on hosts with at least 8 CPUs, else threads).
    """

    def __init__(
        self,
        slide,
        models,
        engines,
        device,
        *,
        batch: int,
        workers: int,
        max_det: int,
        timer,
        timing: bool = True,
        host_slots: int | None = None,
        device_slots: int = 3,
        depth: int = 3,
        readers: str = "auto",
    ):
        import torch

        self.slide = slide
        self.models = list(models)
        self.engines = list(engines)
        self.device = torch.device(device)
        self.batch = int(batch)
        self.workers = max(1, int(workers))
        self.max_det = int(max_det)
        self.timer = timer
        self.timing = timing
        from trtwsi.read.processes import process_readable

        self._auto_readers = readers == "auto"
        if readers not in ("auto", "threads", "processes"):
            raise ValueError(f"readers must be 'auto', 'threads' or 'processes', got {readers!r}")
        if readers == "auto":
            big = (os.cpu_count() or 1) >= 8
            readers = "processes" if big and process_readable(slide) else "threads"
        self.readers = readers
        self._reader = None
        self.host_slots = host_slots or self._default_host_slots()
        self.device_slots = max(2, int(device_slots))
        self.depth = max(2, int(depth))
        self.streams = GpuStreams.for_device(self.device)
        dtypes = {e.dtype for e in self.engines}
        if len(dtypes) != 1:
            raise ValueError(f"engines of one group must share a dtype, got {dtypes}")
        self.dtype = dtypes.pop()
        self.imgsz = self.models[0].imgsz
        for e in self.engines:
            if e.batch_size != self.batch:
                raise ValueError(f"engine batch_size {e.batch_size} != pipeline batch {self.batch}")
        first_input = getattr(self.engines[0], "input", None)
        self.input = (
            first_input
            if first_input is not None
            else torch.empty(
                (self.batch, 3, self.imgsz, self.imgsz), dtype=self.dtype, device=self.device
            )
        )
        B, md = self.batch, self.max_det
        n_out = self.depth
        # per model: device output buffers and a ring of pinned host copies
        self._dets_d = [
            torch.empty((B, md, 6), dtype=torch.float64, device=self.device) for _ in self.models
        ]
        self._counts_d = [
            torch.empty(B, dtype=torch.int32, device=self.device) for _ in self.models
        ]
        self._dets_h = [
            [torch.empty((B, md, 6), dtype=torch.float64, pin_memory=True) for _ in self.models]
            for _ in range(n_out)
        ]
        self._counts_h = [
            [torch.empty(B, dtype=torch.int32, pin_memory=True) for _ in self.models]
            for _ in range(n_out)
        ]
        # per batch metadata: tile byte offsets + row strides (int64), origins (float64)
        self._meta_i_h = [
            torch.empty((2, B), dtype=torch.int64, pin_memory=True) for _ in range(n_out)
        ]
        self._meta_f_h = [
            torch.empty((B, 2), dtype=torch.float64, pin_memory=True) for _ in range(n_out)
        ]
        self._meta_i_d = torch.empty((2, B), dtype=torch.int64, device=self.device)
        self._meta_f_d = torch.empty((B, 2), dtype=torch.float64, device=self.device)
        self._host: list[PinnedBuffer] = []
        self._arena = None
        self._slot_bytes = 0
        self._warm = False

    def _default_host_slots(self) -> int:
        """Host ring size: every reader process can hold a slot while the copy stream drains
        two; reader threads beyond 8 add no throughput (GIL), so threads get at most 10."""
        return self.workers + 2 if self.readers == "processes" else min(self.workers, 8) + 2

    # --- buffers -----------------------------------------------------------------------------
    def _ensure_buffers(self, slot_bytes: int) -> None:
        """(Re)allocate the pinned and device chunk rings when a grid needs bigger slots."""
        import torch

        if slot_bytes <= self._slot_bytes:
            return
        self._slot_bytes = slot_bytes
        if self.readers == "processes":
            from trtwsi.read.processes import ProcessReader

            if self._reader is not None:
                self._reader.close()
                self._reader = None
            try:
                self._reader = ProcessReader(self.slide, self.workers, self.host_slots, slot_bytes)
            except ReaderStartError as e:
                if not self._auto_readers:
                    raise
                import warnings

                warnings.warn(f"{e}; reading with threads instead", RuntimeWarning, stacklevel=4)
                self.readers = "threads"
                self.host_slots = self._default_host_slots()
        if self._reader is not None:
            self._host = self._reader.buffers
        else:
            self._host = [PinnedBuffer(slot_bytes) for _ in range(self.host_slots)]
        self._arena = torch.empty(
            self.device_slots * slot_bytes, dtype=torch.uint8, device=self.device
        )

    def _warm_up(self, lb, rs: int, l0_per_px: float) -> None:
        """Run the engines and kernels once on the compute stream before any reader thread
        exists: CUDA-graph capture (global mode) forbids other threads' unsafe CUDA calls while
        it runs, and the kernels compile (then cached) here rather than inside the first timed
        batch. Needs the chunk arena (``_ensure_buffers``)."""
        import torch

        if self._warm:
            return
        B = self.batch
        with torch.cuda.stream(self.streams.compute):
            self._meta_i_d.zero_()
            self._meta_i_d[1].fill_(rs * 3)
            self._meta_f_d.zero_()
            self._preprocess(rs)
            for k, eng in enumerate(self.engines):
                raw = eng.infer(self.input)
                self._postprocess(k, raw, B, lb, rs, l0_per_px)
        self.streams.compute.synchronize()  # one-time setup, not the steady state
        self._warm = True

    def _preprocess(self, rs: int) -> None:
        """Preprocess kernel on the current stream: the tiles described by the device metadata
        (byte offsets, row strides) → ``self.input``."""
        from trtwsi.ops import cuda as kops

        kops.preprocess(
            self._arena, self._meta_i_d[0], self._meta_i_d[1], (rs, rs), self.imgsz, self.input
        )

    def _postprocess(self, k: int, raw, n: int, lb, rs: int, l0_per_px: float) -> None:
        """Decode + NMS + level-0 mapping of model ``k``'s output for the first ``n`` tiles into
        its device result buffers, on the current stream."""
        from trtwsi.ops import cuda as kops

        m = self.models[k]
        kops.postprocess(
            raw,
            m.head,
            m.min_conf,
            m.iou,
            self.max_det,
            self._meta_f_d,
            lb,
            (rs, rs),
            l0_per_px,
            n_valid=n,
            out=self._dets_d[k],
            counts=self._counts_d[k],
        )

    # --- one grid ----------------------------------------------------------------------------
    def run_grid(self, grid, bar=None) -> dict[int, np.ndarray]:
        """Detect on every tile of ``grid`` (a :class:`~trtwsi.plan.grid.TileGrid` at this
        pipeline's input size). Returns ``{model position: (M, 6) float64}`` rows ``x1 y1 x2 y2
        score class_id`` in level-0 px, per-tile NMS done, before cross-tile merging."""
        return self.run_grids([grid], bar=bar)[0]

    def run_grids(self, grids, bar=None) -> list[dict[int, np.ndarray]]:
        """:meth:`run_grid` for several grids (e.g. the tissue sections of a slide) in one pass:
        their chunks flow through one pipeline, so it fills and drains once, and a batch may mix
        tiles of different grids. The grids must share read level and read/tile size (same
        slide, input size and mpp: always true for one Predictor's sections); otherwise they run
        one after another. Returns one ``run_grid`` result per grid, in order."""
        import torch

        from trtwsi.ops.reference import letterbox_params

        grids = list(grids)
        geometry = {(g.read_level, g.read_size, g.tile_l0) for g in grids}
        if len(geometry) > 1:
            return [self.run_grids([g], bar=bar)[0] for g in grids]
        out: list[dict[int, list[np.ndarray]]] = [
            {i: [] for i in range(len(self.models))} for _ in grids
        ]
        chunks = []  # (grid index, chunk)
        for gi, g in enumerate(grids):
            chunks += [(gi, c) for c in g.chunks(max_pixels=CHUNK_PIXELS)]
        if not chunks:
            return [{i: np.zeros((0, 6)) for i in range(len(self.models))} for _ in grids]
        grid = grids[0]
        level, rs = grid.read_level, grid.read_size
        lb = letterbox_params(rs, rs, self.imgsz)
        l0_per_px = grid.tile_l0 / rs
        # Slots are sized for the largest chunk TileGrid.chunks() can make, not this grid's, so
        # one set of buffers (and reader processes) serves every grid and run of this pipeline.
        slot_bytes = max(
            CHUNK_PIXELS * 3, max(c.read_size[0] * c.read_size[1] * 3 for _, c in chunks)
        )
        self._ensure_buffers(slot_bytes)
        S = self.streams
        timer, B = self.timer, self.batch

        def read(i: int):
            c = chunks[i][1]
            buf = self._host[i % self.host_slots]
            t0 = time.perf_counter()
            buf.wait_ready()  # the H2D of the chunk that used this slot before
            w, h = c.read_size
            if self._reader is not None:
                self._reader.read(i % self.host_slots, c.region[0], c.region[1], w, h, level)
            else:
                self.slide.read_region(
                    c.region[0], c.region[1], w, h, level=level, out=buf.view((h, w, 3))
                )
            timer.add("read", time.perf_counter() - t0)
            return i

        h2d_done: list = [None] * self.device_slots  # event: chunk in slot is on the device
        slot_free: list = [None] * self.device_slots  # event: last preprocess using slot done
        slot_pending = [0] * self.device_slots  # tiles cut from the slot not yet preprocessed
        pend_off: list[int] = []  # byte offsets in the arena of pending tiles
        pend_stride: list[int] = []
        pend_org: list[tuple[float, float]] = []
        pend_slots: list[int] = []
        pend_grid: list[int] = []  # grid index of each pending tile
        inflight: deque[_Batch] = deque()
        h2d_events: list = []  # (start, end) event pairs of chunk uploads, for timing
        n_batches = 0

        def collect(b: _Batch) -> None:
            t0 = time.perf_counter()
            b.done.synchronize()
            timer.add("wait_gpu", time.perf_counter() - t0)
            if self.timing:
                for stage, (e0, e1) in b.events.items():
                    timer.add(f"gpu_{stage}", e0.elapsed_time(e1) / 1000)
            for mi in range(len(self.models)):
                counts = self._counts_h[b.out_slot][mi].numpy()[: b.n]
                dets = self._dets_h[b.out_slot][mi].numpy()
                for t in np.flatnonzero(counts):
                    out[b.grid_ids[t]][mi].append(dets[t, : counts[t]].copy())
            if bar is not None:
                bar.update(b.n)

        def flush() -> None:
            nonlocal n_batches
            n = len(pend_off)
            if n == 0:
                return
            t0 = time.perf_counter()
            slot = n_batches % self.depth
            # at most depth - 1 batches stay in flight, so none of them still uses ring slot
            # ``slot`` (that was batch n_batches - depth)
            while len(inflight) >= self.depth - 1:
                collect(inflight.popleft())
            mi_h, mf_h = self._meta_i_h[slot], self._meta_f_h[slot]
            pad = B - n
            mi_h[0, :n] = torch.as_tensor(pend_off)
            mi_h[1, :n] = torch.as_tensor(pend_stride)
            mf_h[:n] = torch.as_tensor(pend_org, dtype=torch.float64)
            if pad:  # padding tiles repeat the last real tile; their results are ignored
                mi_h[:, n:] = mi_h[:, n - 1 : n]
                mf_h[n:] = mf_h[n - 1]
            ev = {}

            def mark(stage=None, start=None):
                """Record a timing event on the compute stream; close ``stage`` if named."""
                if not self.timing:
                    return None
                e1 = S.event(timing=True)
                e1.record(S.compute)
                if stage is not None:
                    ev[stage] = (start, e1)
                return e1

            with torch.cuda.stream(S.compute):
                for d in set(pend_slots):
                    S.compute.wait_event(h2d_done[d])
                e = mark()
                self._meta_i_d.copy_(mi_h, non_blocking=True)
                self._meta_f_d.copy_(mf_h, non_blocking=True)
                self._preprocess(rs)
                pre_done = S.event()
                pre_done.record(S.compute)
                e = mark("preprocess", e)
                for d in set(pend_slots):
                    slot_free[d] = pre_done
                for k, eng in enumerate(self.engines):
                    raw = eng.infer(self.input)
                    e = mark(f"infer_{k}" if len(self.models) > 1 else "infer", e)
                    self._postprocess(k, raw, n, lb, rs, l0_per_px)
                    e = mark(f"postprocess_{k}" if len(self.models) > 1 else "postprocess", e)
                    self._counts_h[slot][k].copy_(self._counts_d[k], non_blocking=True)
                    self._dets_h[slot][k].copy_(self._dets_d[k], non_blocking=True)
                done = S.event()
                done.record(S.compute)
            for d in pend_slots:
                slot_pending[d] -= 1
            inflight.append(
                _Batch(n=n, done=done, out_slot=slot, events=ev, grid_ids=list(pend_grid))
            )
            n_batches += 1
            pend_off.clear()
            pend_stride.clear()
            pend_org.clear()
            pend_slots.clear()
            pend_grid.clear()
            timer.add("launch", time.perf_counter() - t0)

        self._warm_up(lb, rs, l0_per_px)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="trtwsi-read") as pool:
            futures = deque(pool.submit(read, i) for i in range(min(self.host_slots, len(chunks))))
            for i, (gi, c) in enumerate(chunks):
                t0 = time.perf_counter()
                futures.popleft().result()
                timer.add("wait_read", time.perf_counter() - t0)
                t0 = time.perf_counter()
                d = i % self.device_slots
                if slot_pending[d]:  # tiles still waiting in a partial batch: launch it now
                    flush()
                hbuf = self._host[i % self.host_slots]
                w, h = c.read_size
                nbytes = w * h * 3
                base = d * self._slot_bytes
                with torch.cuda.stream(S.copy):
                    if slot_free[d] is not None:
                        S.copy.wait_event(slot_free[d])
                    e0 = S.event(timing=True) if self.timing else None
                    if e0 is not None:
                        e0.record(S.copy)
                    self._arena[base : base + nbytes].copy_(hbuf.tensor[:nbytes], non_blocking=True)
                    e1 = S.event(timing=self.timing)
                    e1.record(S.copy)
                h2d_done[d] = e1
                hbuf.ready = e1
                if e0 is not None:
                    h2d_events.append((e0, e1))
                if i + self.host_slots < len(chunks):
                    futures.append(pool.submit(read, i + self.host_slots))
                timer.add("launch", time.perf_counter() - t0)
                row = w * 3
                for t, (ox, oy) in zip(c.tile_indices, c.offsets, strict=True):
                    pend_off.append(base + int(oy) * row + int(ox) * 3)
                    pend_stride.append(row)
                    x0, y0 = grids[gi].tiles[t, :2]
                    pend_org.append((float(x0), float(y0)))
                    pend_slots.append(d)
                    pend_grid.append(gi)
                    slot_pending[d] += 1
                    if len(pend_off) == B:
                        flush()
            flush()
            while inflight:
                collect(inflight.popleft())
        if self.timing:
            for e0, e1 in h2d_events:
                timer.add("gpu_h2d", e0.elapsed_time(e1) / 1000)
        return [
            {mi: (np.concatenate(v) if v else np.zeros((0, 6))) for mi, v in o.items()} for o in out
        ]

    def close(self) -> None:
        """Stop reader processes and release the shared buffers (device memory goes with the
        object)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
