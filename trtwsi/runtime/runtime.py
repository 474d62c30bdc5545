"""Runtime: one per device, long-lived; slides stream through it.

A :class:`Runtime` owns, from construction to :meth:`Runtime.close`, every piece of device and
process state a run needs: the engines (and their CUDA graphs), the GPU pipeline's device
rings and host ring, and its reader processes. A slide owns nothing on the device: it is a plan
of tiles (:class:`~trtwsi.plan.SlidePlan`) that flows through.

:meth:`Runtime.stream` takes slides (paths, open slides or :class:`SlideRequest`) and yields one
:class:`SlideOutcome` per slide, in order. Opening and planning the next slides (tissue
sections, tile grids) runs in planner threads ahead of the GPU; the next slide's reads start as
soon as the current slide's reads end; merging and building a slide's Results runs in a
finisher thread while the GPU works on the next slide. A slide that fails to open, plan or read
fails alone (its outcome carries the error).

Over 500 lines because :meth:`Runtime.stream`'s planner, feeder and finisher threads are
closures over one stream's state; split apart they would pass that state around explicitly.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from trtwsi._util.env import SETTINGS as ENV_SETTINGS
from trtwsi._util.env import env_setting
from trtwsi.errors import ReaderStartError, RuntimeStateError, UsageError
from trtwsi.plan.slide_plan import SlideOptions, plan_slide
from trtwsi.plan.tissue import TISSUE_THUMBNAIL, find_sections
from trtwsi.read.processes import process_readable
from trtwsi.runtime.cpu import ReferenceRunner
from trtwsi.runtime.finish import describe_model, finish_slide
from trtwsi.runtime.gpu.ring import IDLE, SlideRun
from trtwsi.runtime.seams import SeamMerger
from trtwsi.runtime.select import (
    default_batch,
    device_index,
    gpu_tissue_probe,
    pick_device,
    pick_pipeline,
)
from trtwsi.slide import Slide, open_slide

__all__ = [
    "Runtime",
    "SlideOutcome",
    "SlideRequest",
    "default_batch",
    "pick_device",
    "pick_pipeline",
]


@dataclass
class SlideRequest:
    """A slide to stream: ``source`` (path, array or Slide), per-slide ``options`` (None: the
    stream's), ``slide_mpp`` (override the file's µm/px), ``tag`` (returned with the outcome)."""

    source: object
    options: SlideOptions | None = None
    slide_mpp: float | None = None
    tag: object = None


@dataclass
class SlideOutcome:
    """One slide's end: ``results`` (:class:`~trtwsi.results.Results`) or ``error``; ``index``
    in the stream, the request's ``source`` and ``tag``, ``seconds`` from its planning start to
    its Results."""

    index: int
    source: object
    tag: object
    results: object = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def check_compile(compile: bool, device: str, owner: str) -> None:
    """``compile=True`` compiles for a CUDA GPU: UsageError naming the ``owner`` ("runtime",
    "Predictor") and its ``device`` anywhere else."""
    if compile and not device.startswith("cuda"):
        raise UsageError(
            f"compile=True compiles the models for a CUDA GPU; this {owner} is on {device}: "
            "drop compile (--compile), or pick a CUDA device"
        )


def _where(name: str, value: str, env: str) -> str:
    """``"auto"``, ``"gpu"`` or ``"cpu"`` for the option ``name``; ``"auto"`` takes ``$env``
    when it is set. UsageError for anything else."""
    if value == "auto":
        value = env_setting(env) or "auto"
    if value not in ("auto", "gpu", "cpu"):
        raise UsageError(f"{name} must be 'auto', 'gpu' or 'cpu', got {value!r}")
    return value


class Runtime:
    """Models on one device, ready to run any number of slides.

    Args:
        models: :class:`~trtwsi.engines.model.Model` objects or .pt paths.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        batch: tiles per forward (None: :func:`~trtwsi.runtime.runtime.default_batch`).
        workers: reader threads (and reader processes on the GPU pipeline; default: CPUs on the
            GPU pipeline; 2 on the CPU path, where the model, not decoding, takes the time and
            more reader threads only compete with torch's).
        threads: torch intra-op threads (``torch.set_num_threads``, process-wide); None: leave
            torch's setting.
        gpu_pipeline: True / False / None (the pipeline whenever CUDA and CuPy are present).
        readers: ``"auto"``, ``"threads"`` or ``"processes"`` (GPU pipeline reads).
        max_det: per-tile cap on detections. ``timing``: per-stage times in Results.
        engine_cache: a dict in which engines are shared with other runtimes of this process
            (keyed by model, device, precision, batch); engines from it are not closed here.
        planners: threads opening and planning slides ahead of the GPU (None: 4 on the GPU
            pipeline, where planning bounds a stream of small slides; 2 on the CPU). On the GPU
            pipeline each planner reads tissue thumbnails through its own slot of the reader
            processes' ring.
        plan_processes: find tissue sections in spawned processes (:mod:`~trtwsi.runtime.planning`;
            one per planner thread) rather than in planner threads; None: on the GPU pipeline
            on hosts with at least 8 CPUs (where planning bounds a batch of slides).
        pipeline_rings: ring sizes of the GPU pipeline (``host_slots``, ``device_slots``,
            ``depth``; see :class:`~trtwsi.runtime.gpu.pipeline.GpuPipeline`), for tuning/tests.
        tissue: where planner threads find tissue sections: ``"gpu"`` (CuPy on this runtime's
            device, :mod:`~trtwsi.runtime.gpu.tissue`), ``"cpu"`` (OpenCV), or ``"auto"``
            (default; ``$TRTWSI_TISSUE`` overrides it): the GPU on the GPU pipeline when
            ``cupyx.scipy.ndimage`` imports. Planner processes (``plan_processes``) always use
            the CPU; with GPU tissue, ``plan_processes`` defaults to False.
        decode: where JPEG slide tiles are decoded on the GPU pipeline: ``"auto"`` (default;
            ``$TRTWSI_DECODE`` overrides it): split between nvJPEG on the GPU
            (:mod:`~trtwsi.runtime.gpu.jpeg_lane`, via torchvision) and the CPU readers when
            that works here, else the CPU; ``"gpu"`` (the split, or DeviceError); ``"cpu"``.
        compile: compile the PyTorch models' forwards with ``torch.compile`` (CUDA only; see
            :class:`~trtwsi.engines.torch.TorchEngine`): 1.9× the model's tiles/s on an H100
            for a one-time compile in the warm-up (2–8 s with a warm cache, 13–21 s the first
            time on a machine). On the H100 it did not make slides faster yet: the host's launch
            loop and seam merge bound them then (README, "The model compiled").
        seam_merge: where the GPU pipeline merges seams while a slide's tiles come back:
            ``"thread"`` (merge threads of this process; the default) or ``"process"`` (one
            spawned process, :mod:`~trtwsi.runtime.seam_process`, off this process's GIL;
            on a 16-core H100 host the 4 Gpx slide took 3 % less, while its extra busy process
            slowed the readers). None: ``$TRTWSI_SEAM_MERGE``, else ``"thread"``.

    On the GPU pipeline the constructor returns before the engines' warm-up (the process's
    first cuDNN calls, the CUDA-graph capture) is done: it runs in the background, slides are
    planned and read meanwhile, and the first upload waits for it. :meth:`wait_ready` waits
    for it (and raises its error); a failed warm-up also fails the runs.
    """

    def __init__(
        self,
        models: Sequence,
        *,
        device: str = "auto",
        batch: int | None = None,
        workers: int | None = None,
        gpu_pipeline: bool | None = None,
        readers: str = "auto",
        max_det: int = 300,
        timing: bool = True,
        engine_cache: dict | None = None,
        threads: int | None = None,
        planners: int | None = None,
        plan_processes: bool | None = None,
        pipeline_rings: dict | None = None,
        tissue: str = "auto",
        decode: str = "auto",
        compile: bool = False,
        seam_merge: str | None = None,
    ):
        from trtwsi.engines.model import Model

        if not models:
            raise UsageError("a Runtime needs at least one model (a trtwsi.Model or a .pt path)")
        for name in ENV_SETTINGS:  # a bad export fails here, before any model loads
            env_setting(name)
        if batch is not None and (
            isinstance(batch, bool) or not isinstance(batch, int) or batch < 1
        ):
            raise UsageError(f"batch must be a positive int, got {batch!r}")
        t0 = time.perf_counter()
        self.models = [m if isinstance(m, Model) else Model(m) for m in models]
        self._start_timings: dict[str, float] = {"models": time.perf_counter() - t0}
        self.device = pick_device(device)
        self.gpu_pipeline = pick_pipeline(self.device, gpu_pipeline)
        tissue = _where("tissue", tissue, "TRTWSI_TISSUE")
        decode = _where("decode", decode, "TRTWSI_DECODE")
        if decode == "gpu" and not self.gpu_pipeline:
            raise UsageError(
                f"decode='gpu' needs the GPU pipeline; this runtime is on {self.device}"
            )
        self._decode = decode
        check_compile(compile, self.device, "runtime")
        self.compile = bool(compile)
        seam_merge = seam_merge or env_setting("TRTWSI_SEAM_MERGE") or "thread"
        if seam_merge not in ("thread", "process"):
            raise UsageError(f"seam_merge must be 'thread' or 'process', got {seam_merge!r}")
        self.seam_merge = seam_merge
        self._seam_proc = None
        self.batch = (
            int(batch)
            if batch is not None
            else default_batch(self.device, self.gpu_pipeline, self.models)
        )
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise UsageError(f"threads must be a positive int, got {threads!r}")
            import torch

            torch.set_num_threads(threads)
        cores = os.cpu_count() or 1
        self.workers = workers or (cores if self.gpu_pipeline else min(2, cores))
        self.max_det = int(max_det)
        self.timing = timing
        self.readers = readers
        self.planners = max(1, int(planners)) if planners else (4 if self.gpu_pipeline else 2)
        self._cache = engine_cache
        self._own: list = []
        self.engines: list = []
        self._pipe = None
        self._ref = None
        self._gpu_tissue = None
        self._planner_pool = None
        self._thumb_slots = None
        self._lock = threading.Lock()
        self.closed = False
        half = self.device.startswith("cuda")
        bs = self.batch if self.gpu_pipeline else None
        probe = probe_done = None
        if self.gpu_pipeline and tissue != "cpu":
            # importing cupyx.scipy takes about a second: let it overlap the engines' warm-up
            probe = ThreadPoolExecutor(1, thread_name_prefix="trtwsi-probe")
            probe_done = probe.submit(gpu_tissue_probe, device_index(self.device))
        try:
            self._start(half, bs, pipeline_rings, tissue, plan_processes, probe_done)
        except BaseException:
            self.close()
            raise
        finally:
            if probe is not None:
                probe.shutdown(wait=True)

    def _start(self, half, bs, pipeline_rings, tissue, plan_processes, probe_done) -> None:
        t0 = time.perf_counter()
        self.engines = [self._load(m, half, bs) for m in self.models]
        self._start_timings["engines"] = time.perf_counter() - t0
        self._model_info = [describe_model(m, self.device) for m in self.models]
        if self.gpu_pipeline and self.seam_merge == "process":
            from trtwsi.runtime.seam_process import SeamProcess

            try:  # starts in the background; slides queue until it is up
                self._seam_proc = SeamProcess()
            except Exception as e:
                warnings.warn(
                    f"the seam-merge process could not start ({type(e).__name__}: {e}); "
                    "merging seams in threads",
                    RuntimeWarning,
                    stacklevel=3,
                )
        t0 = time.perf_counter()
        if self.gpu_pipeline:
            from trtwsi.runtime.gpu.pipeline import GpuPipeline

            self._pipe = GpuPipeline(
                self.models,
                self.engines,
                self.device,
                batch=self.batch,
                workers=self.workers,
                max_det=self.max_det,
                timing=self.timing,
                readers=self.readers,
                spare_slots=self.planners,
                decode=self._decode,
                **(pipeline_rings or {}),
            )
            self._thumb_slots = queue.SimpleQueue()
            for slot in self._pipe.spare:
                self._thumb_slots.put(slot)
        else:
            self._ref = ReferenceRunner(
                self.models, self.engines, batch=self.batch, workers=self.workers,
                max_det=self.max_det,
            )  # fmt: skip
        self._start_timings["pipeline"] = time.perf_counter() - t0
        self._start_timings["decode_probe"] = getattr(self._pipe, "decode_wait_seconds", 0.0)
        t0 = time.perf_counter()
        self._gpu_tissue = self._pick_tissue(tissue, probe_done)
        self._start_timings["tissue"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if plan_processes is None:
            plan_processes = (
                self.gpu_pipeline and self._gpu_tissue is None and (os.cpu_count() or 1) >= 8
            )
        if plan_processes:
            from trtwsi.runtime.planning import PlannerPool

            try:
                self._planner_pool = PlannerPool(self.planners)
            except ReaderStartError as e:
                warnings.warn(
                    f"{e}; finding tissue in threads instead", RuntimeWarning, stacklevel=3
                )
        self._start_timings["planners"] = time.perf_counter() - t0

    @property
    def start_timings(self) -> dict[str, float | None]:
        """Seconds of each start-up step: ``models``, ``engines``, ``pipeline`` (rings and
        reader processes), ``decode_probe``, ``tissue`` (waiting for the GPU tissue probe),
        ``planners``; ``warm_up``: the engines' warm-up, which runs in the background after
        the constructor returns (None while it runs, 0 without the GPU pipeline); with
        ``compile``, ``compile``: the part of it that compiled the models (None before)."""
        out: dict[str, float | None] = {k: round(v, 4) for k, v in self._start_timings.items()}
        warm = self._pipe.warm_up_seconds if self._pipe is not None else 0.0
        out["warm_up"] = None if warm is None else round(warm, 4)
        if self.compile:
            done = [getattr(e, "compile_seconds", None) for e in self.engines]
            done = [t for t in done if t is not None]
            out["compile"] = round(sum(done), 4) if done else None
        return out

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the engines' background warm-up is done (the runtime's runs wait for it
        themselves; this is for callers that want start-up errors or timings at once).
        Returns False if ``timeout`` seconds passed first.

        Raises:
            DeviceError: the warm-up failed.
        """
        return self._pipe.wait_warm(timeout) if self._pipe is not None else True

    def _pick_tissue(self, tissue: str, probe: Future | None):
        """The GpuTissue planner threads use (from ``probe``), or None for OpenCV on the CPU."""
        if tissue == "cpu" or not self.gpu_pipeline:
            if tissue == "gpu":
                raise UsageError(
                    f"tissue='gpu' needs the GPU pipeline; this runtime is on {self.device}"
                )
            return None
        found = probe.result() if probe is not None else "it was not probed"
        if isinstance(found, str):
            if tissue == "gpu":
                raise UsageError(f"tissue='gpu' cannot run: {found}")
            return None
        return found

    @property
    def tissue(self) -> str:
        """Where planner threads find tissue now: "gpu" or "cpu"."""
        t = self._gpu_tissue
        return "gpu" if t is not None and t.failed is None and self._planner_pool is None else "cpu"

    def _load(self, m, half: bool, batch_size: int | None):
        def load():
            return m.load_engine(
                self.device,
                half=half,
                batch_size=batch_size,
                shape_batch=self.batch,
                compile=self.compile,
            )

        if self._cache is None:
            eng = load()
            self._own.append(eng)
            return eng
        key = (id(m), self.device, half, batch_size, self.batch, self.compile)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not m:  # (the model is kept: its id cannot be reused)
            hit = self._cache[key] = (m, load())
        return hit[1]

    def _thumbnail(self, slide, timer=None):
        """The tissue thumbnail of ``slide`` decoded by the reader processes (in parallel and
        off this process's GIL), or None where this runtime has none (then the planner thread
        reads it). ``timer``: gets ``sections_thumbnail_read``, the seconds of the level reads
        (the rest of ``sections_thumbnail`` is the wait for a slot and the resize)."""
        pool = self._pipe.pool if self._pipe is not None else None
        if pool is None or self._thumb_slots is None or not process_readable(slide):
            return None
        slot = self._thumb_slots.get()
        try:
            read = pool.level_reader(slot, slide)
            if timer is not None:
                read = timer.timed(read, "sections_thumbnail_read")
            return slide.thumbnail(TISSUE_THUMBNAIL, read_level=read)
        finally:
            self._thumb_slots.put(slot)

    @property
    def pipeline(self) -> str:
        return "gpu" if self.gpu_pipeline else "reference"

    @property
    def reader_kind(self) -> str:
        return self._pipe.readers if self._pipe is not None else "threads"

    @property
    def decode(self) -> str:
        """Where slide JPEG tiles are decoded: ``"gpu+cpu"`` or ``"cpu"``."""
        return self._pipe.decode if self._pipe is not None else "cpu"

    # --- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop reader processes, free the rings, close the engines this runtime loaded."""
        if self.closed:
            return
        self.closed = True
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self._gpu_tissue is not None:
            self._gpu_tissue.close()
        if self._planner_pool is not None:
            self._planner_pool.close()
            self._planner_pool = None
        if self._seam_proc is not None:
            self._seam_proc.close()
            self._seam_proc = None
        for e in self._own:
            close = getattr(e, "close", None)
            if close is not None:
                close()
        self._own.clear()
        self.engines = []

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running -------------------------------------------------------------------------------
    def run(self, slide, options: SlideOptions | None = None, *, progress: bool = False):
        """One slide; returns its :class:`~trtwsi.results.Results` (raises its error)."""
        (out,) = list(self.stream([slide], options, progress=progress))
        if out.error is not None:
            raise out.error
        return out.results

    def stream(
        self,
        slides: Iterable,
        options: SlideOptions | None = None,
        *,
        progress: bool = False,
    ) -> Iterator[SlideOutcome]:
        """Run ``slides`` back to back; yields one :class:`SlideOutcome` per slide, in order.

        Each item is a path, an array, an open Slide (used as is, not closed) or a
        :class:`SlideRequest`. ``progress``: a tqdm bar over tiles (its total grows as slides
        are planned; with one slide it is known before the first tile).
        """
        if self.closed:
            raise RuntimeStateError("this Runtime is closed")
        options = options or SlideOptions()
        if not self._lock.acquire(blocking=False):
            raise RuntimeStateError(
                "a Runtime runs one stream at a time; use one Runtime per thread"
            )
        try:
            yield from self._stream(slides, options, progress)
        finally:
            self._lock.release()

    def _stream(self, slides, options, progress) -> Iterator[SlideOutcome]:
        # One bar over every tile of the stream (all sections, all input sizes; models of one
        # input size share tiles). It appears with the first slide's plan, so with one slide its
        # total is known before the first tile runs; later slides add theirs.
        bar = None
        imgsizes = [m.imgsz for m in self.models]
        planners = ThreadPoolExecutor(self.planners, thread_name_prefix="trtwsi-plan")
        finisher = ThreadPoolExecutor(1, thread_name_prefix="trtwsi-finish")
        # seam merges of the tiles that are back, while the rest of the slide (and the next
        # slides) are on the GPU; the finisher merges only what is left
        merger = ThreadPoolExecutor(2, thread_name_prefix="trtwsi-merge")
        done: list[Future] = []  # finisher futures, in slide order
        opened: dict[int, Slide] = {}  # slides this stream opened (closed when finished)
        stop = threading.Event()

        def plan_one(index: int, item) -> SlideRun:
            req = item if isinstance(item, SlideRequest) else SlideRequest(item)
            run = SlideRun(index=index, source=req.source, tag=req.tag)
            run.rows = [[] for _ in self.models]
            run.t_start = time.perf_counter()
            try:
                if isinstance(req.source, Slide) and req.slide_mpp is None:
                    slide = req.source
                else:
                    slide = open_slide(req.source, mpp=req.slide_mpp)
                    opened[index] = slide
                t0 = time.perf_counter()
                opts = req.options or options
                sections = None
                if opts.region is not None:
                    pass  # no tissue detection
                elif self._planner_pool is not None and process_readable(slide):
                    sections = self._planner_pool.sections(slide)
                else:
                    thumb = self._thumbnail(slide, run.timer)
                    t1 = time.perf_counter()
                    if self._gpu_tissue is not None:  # None: failed, CPU below
                        sections = self._gpu_tissue.sections(slide, thumbnail=thumb)
                    if sections is None and thumb is not None:
                        sections = find_sections(slide, thumbnail=thumb)
                    # parts of "sections": the thumbnail (read by the reader processes) and
                    # the tissue detection on it (planner threads read their own thumbnail
                    # inside the detection, so that time is all "tissue")
                    run.timer.add("sections_thumbnail", t1 - t0)
                    run.timer.add("sections_tissue", time.perf_counter() - t1)
                run.plan = plan_slide(slide, imgsizes, opts, sections)
                if self._seam_proc is not None:
                    run.seams = self._seam_proc.merger(
                        run.plan, run.rows, dict(run.plan.options.merge)
                    )
                elif self._pipe is not None:
                    run.seams = SeamMerger(run.plan, run.rows, dict(run.plan.options.merge))
                run.timer.add("open", t0 - run.t_start)
                run.t_planned = time.perf_counter()
                run.timer.add("sections", run.t_planned - t0)  # tissue + tile grids
            except Exception as e:
                run.fail(e)
            return run

        planned: queue.Queue = queue.Queue(maxsize=self.planners + 1)

        def feed() -> None:
            """Planner driver: pulls slides (which may block, e.g. a worker waiting for its
            next job) and queues their planning futures; None marks the end."""
            try:
                for index, item in enumerate(slides):
                    if stop.is_set():
                        break
                    fut = planners.submit(plan_one, index, item)
                    while not stop.is_set():
                        try:
                            planned.put(fut, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as e:  # the slide source itself failed: end the stream
                source_error.append(e)
            finally:
                planned.put(None)

        source_error: list[BaseException] = []

        def runs() -> Iterator:
            """Planned slides in order; :data:`IDLE` while the next one is not ready, so the
            pipeline can finish what it holds instead of blocking."""
            nonlocal bar
            while True:
                try:
                    fut = planned.get_nowait()
                except queue.Empty:
                    yield IDLE
                    continue
                if fut is None:
                    return
                while not fut.done():
                    yield IDLE
                run = fut.result()
                if progress and run.plan is not None:
                    if bar is None:
                        from tqdm.auto import tqdm

                        bar = tqdm(
                            total=run.plan.n_tiles, unit="tile", desc="tiles", dynamic_ncols=True
                        )
                        if self._pipe is not None:
                            self._pipe.bar = bar
                    else:
                        bar.total += run.plan.n_tiles
                        bar.refresh()
                yield run

        def finish(run: SlideRun) -> SlideOutcome:
            out = SlideOutcome(run.index, run.source, run.tag)
            if run.error is None:
                try:
                    timings = run.timer.rounded() if self.timing else {}
                    out.results = finish_slide(
                        run.plan, run.rows, self.models, timings=timings,
                        params=self._params(), model_info=self._model_info, early=run.seams,
                    )  # fmt: skip
                    if self.timing and run.seams is not None:
                        out.results.timings["merge_early"] = round(run.seams.seconds, 6)
                        wait = run.seams.wait_seconds  # (for the seam-merge process)
                        if wait is not None:
                            out.results.timings["merge_wait"] = round(wait, 6)
                except Exception as e:
                    out.error = e
            else:
                out.error = run.error
            if run.seams is not None:
                run.seams.close()  # (a failed slide's rows in the seam-merge process)
            slide = opened.pop(run.index, None)
            if slide is not None:
                slide.close()
            out.seconds = time.perf_counter() - run.t_start
            if out.results is not None:
                out.results.timings["total"] = round(out.seconds, 6)
            return out

        def hand_on(run: SlideRun) -> None:
            done.append(finisher.submit(finish, run))

        def tiles_back(run: SlideRun, tiles) -> None:
            if run.seams is not None and run.seams.returned(tiles):
                merger.submit(run.seams.drain)

        feeder = threading.Thread(target=feed, name="trtwsi-feed", daemon=True)
        feeder.start()
        try:
            if self._pipe is not None:
                yield from self._drive(
                    lambda: self._pipe.run(runs(), hand_on, tiles_back), done, stop
                )
            else:
                for run in runs():
                    while done and done[0].done():
                        yield done.pop(0).result()
                    if run is IDLE:
                        time.sleep(0.002)
                        continue
                    if run.error is None:
                        try:
                            run.rows = self._ref.run(run.plan, run.timer, bar)
                        except Exception as e:
                            run.fail(e)
                    hand_on(run)
                    while done and done[0].done():
                        yield done.pop(0).result()
                while done:
                    yield done.pop(0).result()
            if source_error:
                raise source_error[0]
        finally:
            stop.set()
            if self._pipe is not None:
                self._pipe.bar = None
            planners.shutdown(wait=True, cancel_futures=True)
            finisher.shutdown(wait=True)
            merger.shutdown(wait=True, cancel_futures=True)
            for slide in opened.values():
                slide.close()
            if bar is not None:
                bar.close()

    def _drive(self, work, done: list[Future], stop: threading.Event) -> Iterator[SlideOutcome]:
        """Run the GPU stream (``work``) in a thread, yielding finished slides as they come."""
        worker = ThreadPoolExecutor(1, thread_name_prefix="trtwsi-gpu")
        fut = worker.submit(work)
        try:
            while True:
                if done and done[0].done():
                    yield done.pop(0).result()
                    continue
                if fut.done():
                    fut.result()  # raise what stopped the stream
                    while done:
                        yield done.pop(0).result()
                    return
                futures.wait([fut, *done[:1]], timeout=0.1, return_when=futures.FIRST_COMPLETED)
        finally:
            stop.set()
            worker.shutdown(wait=True)

    def _params(self) -> dict:
        return {
            "batch": self.batch,
            "device": self.device,
            "pipeline": self.pipeline,
            "readers": self.reader_kind,
            "decode": self.decode,
        }

    def __repr__(self) -> str:
        names = ", ".join(m.name for m in self.models)
        return f"<Runtime {self.device} {self.pipeline} batch={self.batch} models=[{names}]>"
