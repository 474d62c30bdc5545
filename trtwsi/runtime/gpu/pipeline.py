"""The double-buffered GPU tile pipeline that slides stream through.

One :class:`GpuPipeline` lives as long as its :class:`~trtwsi.runtime.Runtime`: it owns the
device chunk arena, the host ring (pinned buffers, or the shared ring of a
:class:`~trtwsi.read.processes.ReaderPool`), the per-group input and result buffers, and uses
the process-wide stream pair of its device. :meth:`GpuPipeline.run` takes an iterator of slide
plans and runs every chunk of every slide through it back to back::

    reader threads ─ read chunk i (pool process or slide.read_region) into host slot ─┐
                                                 copy stream: H2D of the whole chunk into a
                                                 device slot (a pixel crosses PCIe once)
    or, for JPEG levels, the GPU JPEG lane (runtime/gpu/jpeg_lane.py): pread the chunk's
    tiles → nvJPEG batch decode on the decode stream → copy stream lays them into the slot
    compute stream: wait H2D events → preprocess (all tiles of a batch, one launch)
                    → engine.infer (graph replay / TensorRT) → decode+NMS kernels → level-0
                    shift → async D2H of (B, max_det, 6) + counts into pinned memory
                    (the steps before and after the engine replayed as CUDA graphs:
                    ``runtime/gpu/launch_graphs.py``)
    host: waits on the done event of the batch ``depth - 1`` back (one event), sorts rows to
          their slides; a slide whose last batch is back is handed to ``on_slide_done``.

Reads run ``host_slots`` chunks ahead across slide boundaries, so the next slide's reads start
as soon as the current slide's reads end and the GPU does not drain between slides. A batch
may mix slides when their read geometry (read size, level-0 px per read px) and input-size
group agree; otherwise the partial batch is launched first (padded: fixed shapes for CUDA
graphs and engines). The chunk stream/slot logic is :class:`ChunkRing` and
:class:`BatchBuilder` (``runtime/gpu/ring.py``), which CPU tests drive with fake events.

Frames: chunks are read-level px, tiles are cut at ``Chunk.offsets``; rows come back in
level-0 px as ``(M, 8)`` float64 ``x1 y1 x2 y2 score class section tile``.

Over 500 lines on purpose: :meth:`GpuPipeline.run` is the one loop that orders reads, uploads,
launches and collection on three streams; its bookkeeping already lives in ``ring.py`` and the
GPU JPEG lane in ``jpeg_lane.py``, and what remains shares the loop's local state.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from trtwsi._util.env import env_setting
from trtwsi._util.turns import Turns
from trtwsi.errors import DeviceError, ReaderStartError
from trtwsi.read.host import PinnedBuffer
from trtwsi.read.processes import ReaderPool, process_readable
from trtwsi.runtime.gpu.device import GpuStreams
from trtwsi.runtime.gpu.jpeg_lane import DECODE_DEPTH, JpegLane, start_lane
from trtwsi.runtime.gpu.launch_graphs import LaunchGraphs
from trtwsi.runtime.gpu.ring import IDLE, BatchBuilder, ChunkRing, SlideTracker

__all__ = ["CHUNK_PIXELS", "GpuPipeline"]

#: decode="auto" starts the GPU JPEG lane only with fewer CPU readers than this. On the H200
#: host the lane made a 4 Gpx slide 1.6x and a 16-slide stream 1.55x faster with 4 reader
#: processes, and changed nothing measurable with 16, where its start (torchvision's import
#: and nvJPEG's set-up, beside the first slide) made single slides 0.5-0.9 s slower.
LANE_WORKERS = 8

#: Largest read (read-level px) of one chunk: 4096² px = 48 MiB of RGB per ring slot.
CHUNK_PIXELS = 4096 * 4096


@dataclass
class _Group:
    """Models of one input size, their engines and device buffers."""

    imgsz: int
    model_ids: list[int]
    engines: list
    input: object
    dets_d: list
    counts_d: list
    dets_h: list = field(default_factory=list)  # [out slot][model] pinned (B, md, 6)
    counts_h: list = field(default_factory=list)


@dataclass
class _Item:
    """One chunk of one slide, as the read stream yields it."""

    run: object  # the slide's SlideTracker entry
    group: int
    grid: object
    chunk: object
    section: int
    tile_base: int


class GpuPipeline:
    """Run slide plans through engines on one GPU with overlapped reads, copies and compute.

    Args:
        models: all :class:`~trtwsi.engines.model.Model` objects of the runtime.
        engines: their engines (same order), each with ``batch_size == batch`` on ``device``,
            computing in float16 or float32 (one dtype per input size); an engine may expose a
            static ``input`` tensor that the preprocess kernel writes into directly.
        device: CUDA device of the engines. ``batch``: tiles per batch. ``workers``: reader
            threads, and reader processes when ``readers`` is ``"processes"``.
        max_det: per-tile cap on detections. ``timing``: per-stage GPU times from CUDA events.
        readers: ``"threads"``, ``"processes"`` (a :class:`~trtwsi.read.processes.ReaderPool`
            started now) or ``"auto"`` (processes on hosts with ≥ 8 CPUs; threads with a
            warning if they cannot start).
        host_slots, device_slots, depth: ring sizes (host chunks read ahead, device chunk
            slots, batches in flight).
        spare_slots: extra slots of the reader pool's ring the pipeline never uses, listed in
            :attr:`spare` (the runtime's planners read thumbnails through them).
        decode: ``"auto"`` (with fewer than :data:`LANE_WORKERS` CPU readers, JPEG chunks
            are split between the GPU JPEG lane and the CPU readers once torchvision's nvJPEG
            decode is found to work here; else CPU only), ``"gpu"`` (the lane must work:
            DeviceError if not) or ``"cpu"`` (CPU readers only).
            ``decode_depth``: lane chunks decoded ahead at most.
        launch_graphs: replay the host-launched steps around the engine (metadata upload and
            preprocess; decode, NMS and result download) as CUDA graphs
            (:mod:`~trtwsi.runtime.gpu.launch_graphs`): a few Python calls per batch instead
            of about 30. None: on, unless ``$TRTWSI_LAUNCH_GRAPHS`` is ``0``.
    """

    def __init__(
        self,
        models,
        engines,
        device,
        *,
        batch: int,
        workers: int,
        max_det: int,
        timing: bool = True,
        readers: str = "auto",
        host_slots: int | None = None,
        device_slots: int = 3,
        depth: int = 3,
        spare_slots: int = 0,
        decode: str = "auto",
        decode_depth: int = DECODE_DEPTH,
        launch_graphs: bool | None = None,
    ):
        import os

        import torch

        if readers not in ("auto", "threads", "processes"):
            raise ValueError(f"readers must be 'auto', 'threads' or 'processes', got {readers!r}")
        if decode not in ("auto", "gpu", "cpu"):
            raise ValueError(f"decode must be 'auto', 'gpu' or 'cpu', got {decode!r}")
        self.models = list(models)
        self.device = torch.device(device)
        self.batch = int(batch)
        self.workers = max(1, int(workers))
        self.max_det = int(max_det)
        self.timing = timing
        self.streams = GpuStreams.for_device(self.device)
        self.device_slots = max(2, int(device_slots))
        self.depth = max(2, int(depth))
        self.slot_bytes = CHUNK_PIXELS * 3
        B, md = self.batch, self.max_det
        self.groups: list[_Group] = []
        for size in dict.fromkeys(m.imgsz for m in self.models):
            ids = [i for i, m in enumerate(self.models) if m.imgsz == size]
            engs = [engines[i] for i in ids]
            dtypes = {e.dtype for e in engs}
            if len(dtypes) != 1:
                raise ValueError(f"engines of input size {size} must share a dtype, got {dtypes}")
            for e in engs:
                if e.batch_size != self.batch:
                    raise ValueError(f"engine batch_size {e.batch_size} != pipeline batch {B}")
            first = getattr(engs[0], "input", None)
            inp = (
                first
                if first is not None
                else torch.empty((B, 3, size, size), dtype=dtypes.pop(), device=self.device)
            )
            g = _Group(
                imgsz=size,
                model_ids=ids,
                engines=engs,
                input=inp,
                dets_d=[
                    torch.empty((B, md, 6), dtype=torch.float64, device=self.device) for _ in ids
                ],
                counts_d=[torch.empty(B, dtype=torch.int32, device=self.device) for _ in ids],
            )
            g.dets_h = [
                [torch.empty((B, md, 6), dtype=torch.float64, pin_memory=True) for _ in ids]
                for _ in range(self.depth)
            ]
            g.counts_h = [
                [torch.empty(B, dtype=torch.int32, pin_memory=True) for _ in ids]
                for _ in range(self.depth)
            ]
            self.groups.append(g)
        self._meta_i_h = [
            torch.empty((2, B), dtype=torch.int64, pin_memory=True) for _ in range(self.depth)
        ]
        self._meta_f_h = [
            torch.empty((B, 2), dtype=torch.float64, pin_memory=True) for _ in range(self.depth)
        ]
        self._meta_i_d = torch.empty((2, B), dtype=torch.int64, device=self.device)
        self._meta_f_d = torch.empty((B, 2), dtype=torch.float64, device=self.device)
        self._arena = torch.empty(
            self.device_slots * self.slot_bytes, dtype=torch.uint8, device=self.device
        )
        if launch_graphs is None:
            launch_graphs = env_setting("TRTWSI_LAUNCH_GRAPHS") != "0"
        self.graphs = LaunchGraphs(self.device, launch_graphs)
        #: the GPU JPEG lane (None until its probe is done, or when off)
        self.lane: JpegLane | None = None
        #: why the GPU JPEG lane is off (None when it is on)
        self.decode_off: str | None = "decode='cpu' was asked for"
        #: the lane's probe while it runs (decode="auto": chunks go to the CPU readers meanwhile)
        self._lane_probe = None
        #: seconds the probe took (in the background for decode="auto"); None while it runs
        self.decode_probe_seconds: float | None = 0.0
        # set once the engines' warm-up (below) is done; the lane probe's device work waits
        self._warmed = threading.Event()
        if decode == "auto" and self.workers >= LANE_WORKERS:
            self.decode_off = (
                f"decode='auto' with {self.workers} CPU readers: CPU decode keeps up (the GPU "
                f"lane pays with fewer than {LANE_WORKERS}; decode='gpu' forces it)"
            )
        elif decode != "cpu":
            self._lane_probe = start_lane(
                self.device, self.streams.decode, decode_depth, self._warmed
            )
            self.decode_off = "the GPU JPEG probe is still running"
            self.decode_probe_seconds = None
        # Reader processes start first and import their decoders while the engines warm up
        # (they use no CUDA; the ring is page-locked here, before the graph capture).
        self.pool: ReaderPool | None = None
        auto = readers == "auto"
        if auto:
            readers = "processes" if (os.cpu_count() or 1) >= 8 else "threads"
        if readers == "processes":
            slots = host_slots or self.workers + 2
            try:
                self.pool = ReaderPool(
                    self.workers, slots + max(0, spare_slots), self.slot_bytes, wait=False
                )
            except ReaderStartError as e:
                if not auto:
                    self._warmed.set()  # the probe must not wait for a warm-up that never comes
                    raise
                warnings.warn(f"{e}; reading with threads instead", RuntimeWarning, stacklevel=3)
        # The engines' warm-up (the process's first cuDNN calls and the CUDA-graph capture:
        # 1.4 s on the H100 host) runs in the background, so the runtime's callers plan
        # slides and the readers fill the host ring meanwhile; the run loop waits for it
        # before its first upload (wait_warm). The capture is thread-local: other threads
        # may use the device meanwhile.
        #: seconds the warm-up took (None while it runs)
        self.warm_up_seconds: float | None = None
        self._warm_error: BaseException | None = None

        def warm_up() -> None:
            t0 = time.perf_counter()
            try:
                with torch.cuda.device(self.device):  # a new thread starts on device 0
                    self._warm_up()
            except BaseException as e:  # raised by wait_warm in the thread that needs it
                self._warm_error = e
            finally:
                self.warm_up_seconds = time.perf_counter() - t0
                self._warmed.set()

        threading.Thread(target=warm_up, name="trtwsi-warm-up", daemon=True).start()
        t0 = time.perf_counter()
        if decode == "gpu":
            try:
                self.wait_warm()
            except BaseException:
                if self.pool is not None:
                    self.pool.close()
                raise
            self._lane_probe.result()
            self.adopt_lane()
            if self.lane is None:
                if self.pool is not None:
                    self.pool.close()
                raise DeviceError(f"decode='gpu' cannot run: {self.decode_off}")
        #: seconds the start waited for the probe (0 for decode="auto")
        self.decode_wait_seconds = time.perf_counter() - t0
        if self.pool is not None:
            try:
                self.pool.ready()
            except ReaderStartError as e:
                self.pool = None
                if not auto:
                    raise
                warnings.warn(f"{e}; reading with threads instead", RuntimeWarning, stacklevel=3)
        self.readers = "processes" if self.pool is not None else "threads"
        #: reader-pool ring slots the pipeline leaves alone (empty without a pool)
        self.spare: list[int] = []
        if self.pool is not None:
            self._host = self.pool.buffers[:slots]
            self.spare = list(range(slots, len(self.pool.buffers)))
        else:
            n = host_slots or min(self.workers, 8) + 2
            self._host = [PinnedBuffer(self.slot_bytes) for _ in range(n)]
        self.host_slots = len(self._host)

    def wait_warm(self, timeout: float | None = None) -> bool:
        """Wait for the engines' warm-up; True once it is done (False: ``timeout`` passed).

        Raises:
            DeviceError: the warm-up failed (its error is the cause); the pipeline cannot run.
        """
        if not self._warmed.wait(timeout):
            return False
        if self._warm_error is not None:
            e = self._warm_error
            raise DeviceError(
                f"the engines' warm-up on {self.device} failed ({type(e).__name__}: {e}); "
                "check `trtwsi doctor` and the GPU's free memory"
            ) from e
        return True

    def adopt_lane(self) -> JpegLane | None:
        """The GPU JPEG lane, taken over from its probe once that is done (cheap to call
        per chunk); None while the probe runs or when nvJPEG cannot decode here."""
        probe = self._lane_probe
        if probe is not None and probe.done():
            self._lane_probe = None
            result = probe.result()
            self.decode_probe_seconds = round(probe.seconds, 4)
            if isinstance(result, str):
                self.decode_off = result
            else:
                self.lane, self.decode_off = result, None
        return self.lane

    @property
    def decode(self) -> str:
        """``"gpu+cpu"`` (JPEG chunks shared by the GPU lane and the CPU readers) or
        ``"cpu"`` (so far: with decode="auto" the lane joins when its probe is done)."""
        return "gpu+cpu" if self.adopt_lane() is not None else "cpu"

    # --- kernels -----------------------------------------------------------------------------
    def _preprocess(self, g: _Group, rs: int) -> None:
        from trtwsi.ops import cuda as kops

        kops.preprocess(
            self._arena, self._meta_i_d[0], self._meta_i_d[1], (rs, rs), g.imgsz, g.input
        )

    def _postprocess(self, g: _Group, k: int, raw, n: int, lb, rs: int, l0_per_px: float):
        from trtwsi.ops import cuda as kops

        m = self.models[g.model_ids[k]]
        kops.postprocess(
            raw, m.head, m.min_conf, m.iou, self.max_det, self._meta_f_d, lb, (rs, rs),
            l0_per_px, n_valid=n, out=g.dets_d[k], counts=g.counts_d[k],
        )  # fmt: skip

    def _warm_up(self) -> None:
        """Run every engine and kernel once on the compute stream: CUDA-graph capture and the
        kernels' compilation happen here, not inside a timed batch."""
        import torch

        from trtwsi.ops.reference import letterbox_params

        with torch.cuda.stream(self.streams.compute):
            for g in self.groups:
                rs = g.imgsz
                self._meta_i_d.zero_()
                self._meta_i_d[1].fill_(rs * 3)
                self._meta_f_d.zero_()
                self._preprocess(g, rs)
                for k, eng in enumerate(g.engines):
                    raw = eng.infer(g.input)
                    self._postprocess(
                        g, k, raw, self.batch, letterbox_params(rs, rs, g.imgsz), rs, 1.0
                    )
        self.streams.compute.synchronize()  # one-time setup, not the steady state

    # --- streaming ---------------------------------------------------------------------------
    def _items(self, runs):
        """Every chunk of every slide, in order; marks a slide ``issued`` after its last."""
        for run in runs:
            if run is IDLE:
                yield IDLE
                continue
            if run.error is None:
                plan = run.plan
                for gi, g in enumerate(self.groups):
                    grids = plan.grids.get(g.imgsz, [])
                    for (sec, _), grid, base in zip(
                        plan.targets, grids, plan.tile_base.get(g.imgsz, []), strict=True
                    ):
                        for c in grid.chunks(max_pixels=CHUNK_PIXELS):
                            yield _Item(run, gi, grid, c, sec, base)
            yield run  # end marker of this slide

    def run(self, runs, on_slide_done, on_tiles=None) -> None:
        """Stream ``runs`` (an iterator of :class:`~trtwsi.runtime.gpu.ring.SlideRun`, each
        with a ``plan`` or an ``error``) through the GPU; calls ``on_slide_done(run)`` (from
        this thread) for each slide once all its detections are back (``run.rows``), in the
        order the slides came, and ``on_tiles(run, tiles)`` with the slide-wide ids of each
        batch's tiles of ``run`` once their rows are in ``run.rows`` (must return quickly)."""
        import torch

        from trtwsi.ops import cuda as kops
        from trtwsi.ops.reference import letterbox_params

        S = self.streams
        graphs = self.graphs
        tracker = SlideTracker(on_slide_done, on_tiles)
        ring = ChunkRing(self.device_slots)
        builder = BatchBuilder(self.batch)
        inflight: deque = deque()
        n_batches = 0
        stream = self._items(runs)

        turns = Turns()  # CPU read k queues its strips with the processes k-th

        def read(slot: int, item: _Item, k: int, first: bool):
            """Read ``item``'s chunk into host slot ``slot``; ``k``: its place among the CPU
            reads; ``first``: the slide's first chunk (it sets the slide's start marks). The
            reader threads start in any order, but their strips reach the worker processes'
            queue in chunk order, so the chunk the pipeline waits for first is decoded first
            (a slide's first chunk has the workers to itself)."""
            run = item.run
            c, buf = item.chunk, self._host[slot]
            w, h = c.read_size
            only = c.windows(item.grid.read_size)  # not the glass of the chunk's bounding box
            pending = None
            with turns.turn(k):  # (the later reads wait for this block: keep it short)
                if run.error is not None:
                    return None
                t0 = time.perf_counter()
                buf.wait_ready()  # the H2D of the chunk that used this slot before
                if self.pool is not None and process_readable(run.plan.slide):
                    try:
                        pending = self.pool.submit(
                            slot, run.plan.slide, c.region[0], c.region[1], w, h, c.level, only
                        )
                    except Exception as e:  # the slide fails alone
                        run.fail(e)
                        return None
            if first:
                run.t_first_queued = time.perf_counter()
            try:
                if pending is not None:
                    pending.result()
                else:
                    run.plan.slide.read_region(
                        c.region[0], c.region[1], w, h, c.level, buf.view((h, w, 3)), only=only
                    )
            except Exception as e:  # the slide fails alone
                run.fail(e)
            t1 = time.perf_counter()
            if first:
                run.t_first_read = t1
            run.timer.add("read", t1 - t0)
            return None

        def collect(b) -> None:
            t0 = time.perf_counter()
            b.done.synchronize()
            waited = time.perf_counter() - t0
            g = self.groups[b.group]
            share = b.share()
            for run, frac in share.items():
                run.timer.add("wait_gpu", waited * frac)
                if self.timing:
                    for stage, (e0, e1) in b.events.items():
                        run.timer.add(f"gpu_{stage}", e0.elapsed_time(e1) / 1000 * frac)
            tile_run = np.asarray(b.runs_index, dtype=np.int64)
            for k, mi in enumerate(g.model_ids):
                counts = g.counts_h[b.out_slot][k].numpy()[: b.n].astype(np.int64)
                if not counts.any():
                    continue
                dets = g.dets_h[b.out_slot][k].numpy()[: b.n]
                mask = np.arange(self.max_det)[None, :] < counts[:, None]
                rows = dets[mask]
                t_of_row = np.repeat(np.arange(b.n), counts)
                extra = np.stack([b.sections[t_of_row], b.tiles[t_of_row]], 1).astype(np.float64)
                rows = np.concatenate([rows, extra], 1)
                owner = tile_run[t_of_row]
                for ri, run in enumerate(b.runs):
                    sel = rows[owner == ri]
                    if len(sel):
                        run.rows[mi].append(sel)
            # the batch's uploads (and all recorded before them) are done: count them before
            # ``returned`` may finish a slide and round its timings
            drain_h2d()
            tracker.returned(b)
            if self.bar is not None:
                self.bar.update(b.n)
            spent = time.perf_counter() - t0 - waited  # sorting rows, merge hand-offs
            for run, frac in share.items():
                run.timer.add("collect", spent * frac)

        def launch() -> None:
            """Launch the builder's pending tiles as one padded batch."""
            nonlocal n_batches
            pb = builder.take()
            if pb is None:
                return
            out_slot = n_batches % self.depth
            while len(inflight) >= self.depth - 1:  # so no batch in flight uses out_slot
                collect(inflight.popleft())
            t0 = time.perf_counter()  # "launch": this thread's time to enqueue the batch
            g = self.groups[pb.group]
            rs, l0_per_px = pb.geometry
            lb = letterbox_params(rs, rs, g.imgsz)
            n, B = pb.n, self.batch
            mi_h, mf_h = self._meta_i_h[out_slot], self._meta_f_h[out_slot]
            mi_h[0, :n] = torch.as_tensor(pb.offsets)
            mi_h[1, :n] = torch.as_tensor(pb.strides)
            mf_h[:n] = torch.as_tensor(pb.origins, dtype=torch.float64)
            if n < B:  # padding tiles repeat the last real tile; their results are ignored
                mi_h[:, n:] = mi_h[:, n - 1 : n]
                mf_h[n:] = mf_h[n - 1]
            ev = {}

            def mark(stage=None, start=None):
                if not self.timing:
                    return None
                e1 = S.event(timing=True)
                e1.record(S.compute)
                if stage is not None:
                    ev[stage] = (start, e1)
                return e1

            multi = len(g.engines) > 1

            def pre() -> None:  # metadata up, then the tiles cut into the engine input
                kops.copy_async(self._meta_i_d, mi_h)
                kops.copy_async(self._meta_f_d, mf_h)
                self._preprocess(g, rs)

            def post(k: int, raw) -> Callable[[], None]:  # decode + NMS, results down
                def steps() -> None:
                    self._postprocess(g, k, raw, n, lb, rs, l0_per_px)
                    kops.copy_async(g.counts_h[out_slot][k], g.counts_d[k])
                    kops.copy_async(g.dets_h[out_slot][k], g.dets_d[k])

                return steps

            with torch.cuda.stream(S.compute):
                for d in set(pb.slots):
                    S.compute.wait_event(ring.uploaded[d])
                e = mark()
                # the padding count is baked into the preprocess' metadata, not its graph
                graphs.launch(("pre", pb.group, rs, out_slot), None, pre)
                pre_done = S.event()
                pre_done.record(S.compute)
                e = mark("preprocess", e)
                ring.preprocessed(set(pb.slots), pre_done)
                for k, eng in enumerate(g.engines):
                    raw = eng.infer(g.input)
                    e = mark(f"infer_{k}" if multi else "infer", e)
                    if n == B:  # (a partial batch's count is a kernel argument)
                        m = self.models[g.model_ids[k]]  # thresholds are kernel arguments too
                        key = ("post", pb.group, k, rs, l0_per_px, out_slot, m.min_conf, m.iou)
                        graphs.launch(key, raw.data_ptr(), post(k, raw))
                    else:
                        post(k, raw)()
                    e = mark(f"postprocess_{k}" if multi else "postprocess", e)
                done = S.event()
                done.record(S.compute)
            pb.done, pb.out_slot, pb.events = done, out_slot, ev
            tracker.launched(pb, ring)
            inflight.append(pb)
            n_batches += 1
            for run, frac in pb.share().items():
                run.timer.add("launch", (time.perf_counter() - t0) * frac)

        h2d_events: deque = deque()  # (run, start event, end event, stage), in stream order

        def drain_h2d() -> None:
            """Add the finished uploads' GPU times to their slides' timers."""
            while h2d_events and h2d_events[0][2].query():
                run, e0, e1, stage = h2d_events.popleft()
                run.timer.add(f"gpu_{stage}", e0.elapsed_time(e1) / 1000)

        lane = self.adopt_lane()
        warmed = False
        with ThreadPoolExecutor(self.workers, thread_name_prefix="trtwsi-read") as pool:
            # (future, host slot or None for a lane chunk, item) | (None, None, end-of-slide run)
            ahead: deque = deque()
            k = 0  # CPU reads submitted: host slot k % host_slots
            cpu_ahead = 0  # CPU reads not yet consumed (≤ host_slots: their slots are taken)
            held = None  # an item that found no free decoder yet
            exhausted = False

            def refill() -> None:
                """Submit reads until both decoders are full, the stream is idle or ends."""
                nonlocal k, exhausted, cpu_ahead, held, lane
                if lane is None:
                    lane = self.adopt_lane()
                while not exhausted:
                    item, held = (held if held is not None else next(stream, None)), None
                    if item is None:
                        exhausted = True
                    elif item is IDLE:
                        return
                    elif isinstance(item, _Item):
                        first = item.run.t_first_submit is None
                        if first:
                            item.run.t_first_submit = time.perf_counter()
                        if lane is not None and lane.wants(item):
                            ahead.append((lane.submit(item), None, item))
                        elif cpu_ahead < self.host_slots:
                            slot = k % self.host_slots
                            cpu_ahead += 1
                            ahead.append((pool.submit(read, slot, item, k, first), slot, item))
                            k += 1
                        else:
                            held = item
                            return
                    else:
                        ahead.append((None, None, item))
                        tracker.add(item)

            while True:
                refill()
                if not ahead:
                    if exhausted:
                        break
                    launch()  # nothing to read yet: finish what is on the GPU meanwhile
                    while inflight:
                        collect(inflight.popleft())
                    time.sleep(0.002)
                    continue
                fut, slot, item = ahead.popleft()
                if fut is None:  # every chunk of this slide has been taken
                    tracker.issued(item)
                    continue
                if slot is not None and lane is not None:
                    lane.starved = not fut.done()  # CPU decode is behind: the lane helps
                t0 = time.perf_counter()
                decoded = fut.result()
                t1 = time.perf_counter()
                item.run.timer.add("wait_read", t1 - t0)
                if item.run.t_first_chunk is None:
                    item.run.t_first_chunk = t1
                if slot is not None:
                    cpu_ahead -= 1
                if item.run.error is not None or (slot is None and decoded is None):
                    if slot is None:
                        lane.dropped()
                    continue
                if not warmed:  # the first upload: the reads so far overlapped the warm-up
                    warmed = self.wait_warm()
                t0 = time.perf_counter()
                c = item.chunk
                geometry = (item.grid.read_size, item.grid.tile_l0 / item.grid.read_size)
                if not builder.accepts(item.group, geometry):
                    launch()
                d = ring.next_slot()
                if ring.pending[d]:  # tiles still wait in a partial batch: launch it now
                    launch()
                w, h = c.read_size
                nbytes = w * h * 3
                base = d * self.slot_bytes
                with torch.cuda.stream(S.copy):
                    if ring.free[d] is not None:
                        S.copy.wait_event(ring.free[d])
                    e0 = S.event(timing=True) if self.timing else None
                    if e0 is not None:
                        e0.record(S.copy)
                    dst = self._arena[base : base + nbytes]
                    if slot is None:  # decoded on the GPU: lay the tiles into the slot
                        lane.place(decoded, dst.view(h, w, 3), S.copy)
                    else:
                        dst.copy_(self._host[slot].tensor[:nbytes], non_blocking=True)
                    e1 = S.event(timing=self.timing)
                    e1.record(S.copy)
                ring.uploaded[d] = e1
                if slot is not None:
                    self._host[slot].ready = e1
                if e0 is not None:
                    h2d_events.append((item.run, e0, e1, "h2d" if slot is not None else "place"))
                item.run.timer.add("launch", time.perf_counter() - t0)
                row = w * 3
                tiles = item.grid.tiles
                for t, (ox, oy) in zip(c.tile_indices, c.offsets, strict=True):
                    x0, y0 = tiles[t, :2]
                    builder.add(
                        run=item.run, group=item.group, geometry=geometry, slot=d,
                        offset=base + int(oy) * row + int(ox) * 3, stride=row,
                        origin=(float(x0), float(y0)), section=item.section,
                        tile=item.tile_base + int(t),
                    )  # fmt: skip
                    ring.pending[d] += 1
                    item.run.pending += 1
                    if builder.full():
                        launch()
                drain_h2d()
            launch()
            while inflight:
                collect(inflight.popleft())
        for run, e0, e1, stage in h2d_events:
            e1.synchronize()
            run.timer.add(f"gpu_{stage}", e0.elapsed_time(e1) / 1000)
        tracker.drain()

    bar = None  # set by the runtime: a tqdm-like object with update(n)

    def close(self) -> None:
        """Stop the reader processes and free the shared ring; device buffers go with the
        object (the runtime drops it)."""
        self._warmed.wait()  # no buffer goes while the warm-up thread uses it
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self._lane_probe is not None:
            self._lane_probe.result()  # let it finish, then close what it built
            self.adopt_lane()
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        self._host = []
        self.graphs.close()
        self.groups = []
        self._arena = None
