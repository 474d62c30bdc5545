"""CUDA graphs of the host-launched steps of a batch, so a full batch costs a few Python calls.

Around the engine (itself a CUDA-graph replay or a TensorRT enqueue), a batch launches its
steps from Python: the metadata uploads and the preprocess kernel before it; the decode memset,
the decode and NMS kernels (with their scratch tensors) and the result downloads after it.
That is about 30 calls per batch into torch and CuPy, each of which may hand the GIL to another
thread of the process (seam merges, readers, planners, the caller's own) and wait up to
``sys.getswitchinterval()`` to get it back. :class:`LaunchGraphs` captures each step group
once per key (input-size group, read geometry, output slot: everything the calls bake into
kernel arguments and pointers) and replays it after: one call.

Only what the buffers' fixed addresses make safe is captured: the pipeline's static metadata
buffers, chunk arena, engine input and per-slot pinned result buffers. A step whose input
pointer may move (an engine without a static output) is guarded: the graph replays only while
the guard value (the pointer at capture) is unchanged; otherwise the caller's steps run
uncaptured, as before (no recapture: an engine whose output moves would otherwise pay a
capture per batch). Partial batches (padding count baked into the kernels) always run as
before.

Captures use one memory pool per :class:`LaunchGraphs`, shared by its graphs: their scratch
tensors may alias, which is safe because every graph replays on the one compute stream, one
after another.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

__all__ = ["MAX_GRAPHS", "LaunchGraphs"]

#: graphs kept per pipeline; keys beyond it run uncaptured (a stream of slides of many
#: different read geometries; each geometry needs about 3 graphs per output slot)
MAX_GRAPHS = 96


class LaunchGraphs:
    """Captured step groups of one pipeline, by key.

    Args:
        device: the CUDA device (``torch.device``) the steps run on.
        enabled: False: :meth:`launch` always runs the steps as they are (the A/B baseline).
    """

    def __init__(self, device, enabled: bool = True):
        self.device = device
        self._graphs: dict[Hashable, tuple[object, Hashable]] = {}
        self._pool = None
        self._stream = None  # the capture stream, made on the first capture
        #: captures made, replays, step groups run uncaptured (counters for tests and benches)
        self.captures = self.replays = self.uncaptured = 0
        #: why capturing stopped (None while it works)
        self.off: str | None = None if enabled else "launch graphs were turned off"

    @property
    def enabled(self) -> bool:
        """Graphs are captured and replayed (False once turned off or a capture failed)."""
        return self.off is None

    def launch(self, key: Hashable, guard: Hashable, steps: Callable[[], None]) -> None:
        """Enqueue ``steps`` on the current stream: replay its graph of ``key`` (captured now
        on first use), or call ``steps()`` itself.

        ``steps`` must enqueue device work only (no host synchronization, no reads of device
        values) and must depend on nothing but ``key`` and device memory at fixed addresses;
        ``guard`` is a value that changes when one of those addresses may have: while it
        differs from the one at capture, ``steps`` runs uncaptured.
        """
        got = self._graphs.get(key) if self.enabled else None
        if got is not None and got[1] == guard:
            got[0].replay()
            self.replays += 1
            return
        if not self.enabled or got is not None or len(self._graphs) >= MAX_GRAPHS:
            self.uncaptured += 1
            steps()
            return
        self._capture(key, guard, steps)

    def _capture(self, key: Hashable, guard: Hashable, steps: Callable[[], None]) -> None:
        import torch

        current = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            # a side stream that nothing else uses: capture mode holds no other work, and the
            # graph's replay on the current stream comes after what is queued there. The device
            # guard: capture_begin takes the current device's stream, and the pipeline thread's
            # current device is 0 whatever GPU the runtime is on
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    steps()
                finally:
                    graph.capture_end()
        except Exception as e:  # an op that cannot be captured: run uncaptured from now on
            self.off = f"capture failed ({type(e).__name__}: {e})"
            warnings.warn(
                f"CUDA-graph capture of a batch's launches failed ({type(e).__name__}: {e}); "
                "launching them one by one",
                RuntimeWarning,
                stacklevel=3,
            )
            self._graphs.clear()
            with torch.cuda.stream(current):
                self.uncaptured += 1
                steps()
            return
        self._graphs[key] = (graph, guard)
        self.captures += 1
        graph.replay()
        self.replays += 1

    def close(self) -> None:
        """Drop the graphs and their memory pool."""
        self._graphs.clear()
        self._pool = None
