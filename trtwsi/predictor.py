"""Predictor: the one-slide façade, ``Predictor(slide, models).run()`` = plan → Runtime → merge →
Results.

It opens the slide, builds (on first use) a :class:`~trtwsi.runtime.Runtime` for its models and
device, and runs the slide through it. Use a :class:`~trtwsi.runtime.Runtime` directly to run
many slides: it keeps engines, rings and reader processes alive between them.
"""

from __future__ import annotations

from collections.abc import Sequence

from trtwsi.errors import UsageError
from trtwsi.plan.slide_plan import SlideOptions
from trtwsi.runtime import Runtime, pick_device, pick_pipeline
from trtwsi.runtime.runtime import check_compile, default_batch
from trtwsi.slide import Slide, open_slide

__all__ = ["Predictor"]


class Predictor:
    """Run one or more YOLO detectors over a slide.

    Args:
        slide: path, array or Slide (see :func:`trtwsi.open_slide`).
        models: Model objects or .pt paths. Models with the same input size share reads and
            preprocessing; each model keeps its own ``min_conf`` / ``iou`` / classes.
        overlap: tile overlap, ratio in [0, 1) or pixels (model px).
        mpp: microns per pixel of the models' input (None: level-0 pixels as they are).
        batch: tiles per forward pass (None: :func:`~trtwsi.runtime.runtime.default_batch`). The GPU
            pipeline pads the last batch to this size (fixed shapes for CUDA graphs/engines).
        workers: reader threads (default: CPU count).
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N".
        timing: collect per-stage seconds into ``Results.timings``.
        progress: show a tqdm progress bar over all tiles of the run (total known up front).
        merge: dict of options for :func:`trtwsi.merge.merge_detections` (method, metric,
            threshold, class_aware) — defaults chosen by measurement, see trtwsi/merge.py.
        min_tissue: drop tiles whose tissue fraction (from the section mask) is below this.
        slide_mpp: override the slide's own µm/px.
        max_det: per-tile cap on detections.
        gpu_pipeline: use the GPU pipeline (True), the reference path (False), or the pipeline
            whenever the device is CUDA and CuPy is installed (None).
        readers: how the GPU pipeline reads: ``"auto"``, ``"threads"`` or ``"processes"``.
        threads: torch intra-op threads (process-wide); None: torch's setting.
        decode: where JPEG tiles are decoded on the GPU pipeline: ``"auto"``, ``"gpu"``,
            ``"cpu"`` (see :class:`~trtwsi.runtime.Runtime`).
        compile: compile the PyTorch models with ``torch.compile`` (CUDA only; see
            :class:`~trtwsi.runtime.Runtime`): the model runs about 1.9× faster after a
            one-time compile when the runtime starts (whole slides did not, yet).
        engine_cache: a dict shared by several Predictors/Runtimes in which loaded engines are
            kept and reused (keyed by model, device, precision and batch size).
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
        threads: int | None = None,
        decode: str = "auto",
        compile: bool = False,
    ):
        from trtwsi.engines.model import Model

        self.slide: Slide = open_slide(slide, mpp=slide_mpp)
        if not models:
            raise UsageError("Predictor needs at least one model (a trtwsi.Model or a .pt path)")
        self.models = [m if isinstance(m, Model) else Model(m) for m in models]
        if batch is not None and batch < 1:
            raise UsageError(f"batch must be >= 1, got {batch}")
        self.overlap = overlap
        self.mpp = mpp
        self.merge_opts = dict(merge or {})
        self.min_tissue = min_tissue
        self.progress = progress
        self.device = pick_device(device)
        check_compile(compile, self.device, "Predictor")  # now: the Runtime comes later
        self.gpu_pipeline = pick_pipeline(self.device, gpu_pipeline)
        self.batch = (
            int(batch)
            if batch is not None
            else default_batch(self.device, self.gpu_pipeline, self.models)
        )
        self._runtime_args = dict(
            device=self.device,
            batch=self.batch,
            workers=workers,
            gpu_pipeline=self.gpu_pipeline,
            readers=readers,
            max_det=max_det,
            timing=timing,
            engine_cache=engine_cache,
            threads=threads,
            decode=decode,
            compile=compile,
            planners=1,
            # One slide: nothing to plan ahead of, and a fresh planner process would reopen the
            # slide on the critical path (measured +0.27 s on a 1 Gpx slide, H200 host).
            plan_processes=False,
        )
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        """The Runtime this Predictor runs on (built on first use, closed by :meth:`close`)."""
        if self._runtime is None:
            self._runtime = Runtime(self.models, **self._runtime_args)
        return self._runtime

    def run(self, section: int | None = None, region: tuple[int, int, int, int] | None = None):
        """Detect on all tissue sections (default), one section (index in reading order), or a
        level-0 ``region`` ``(x, y, w, h)``. Returns :class:`trtwsi.results.Results`."""
        options = SlideOptions(
            overlap=self.overlap,
            mpp=self.mpp,
            section=section,
            region=region,
            min_tissue=self.min_tissue,
            merge=self.merge_opts,
        )
        return self.runtime.run(self.slide, options, progress=self.progress)

    def close(self) -> None:
        """Release the runtime (reader processes, shared buffers, engines it loaded)."""
        if self._runtime is not None:
            self._runtime.close()
            self._runtime = None

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
