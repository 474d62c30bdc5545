"""The GPU JPEG lane of the pipeline: chunks decoded by nvJPEG beside the CPU readers.

The pipeline hands a chunk to this lane when the chunk's level is a JPEG level
(:meth:`~trtwsi.slide.base.Slide.jpeg_level`), fewer than ``depth`` lane chunks wait to be
consumed, and the pipeline is :attr:`~JpegLane.starved`: the last chunk it took from the CPU
readers was not decoded yet when it needed it (and at the start). Otherwise the chunk goes to
the CPU readers (processes or threads) as before. So the lane adds decode throughput only where
CPU decode bounds the pipeline (few cores for the GPU); where the CPU keeps up it stays idle and
costs the model nothing (on the 16-core H200 host, sharing the GPU with the lane made a 4 Gpx
slide 10 % slower in one run: nvJPEG, the tile layout and the lane's Python share the GPU and
the GIL with the launches).

A lane chunk needs no host ring slot and crosses PCIe only as compressed bytes: a lane thread
``pread``s the tiles' bytes (:meth:`~trtwsi.slide.base.Slide.compressed_region`), decodes them
on the lane's own stream (:class:`~trtwsi.read.jpeg_batch.JpegBatchDecoder`) and records an
event; when the pipeline consumes the chunk (in order), the copy stream waits on that event and
lays the decoded tiles into the chunk's device slot (:meth:`place`).

Device memory: at most ``depth`` decoded chunks (≤ (4096 + tile)² × 3 bytes each) wait at once,
whatever the slide's size.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

__all__ = ["DECODE_DEPTH", "JpegLane", "start_lane"]

#: Lane chunks decoded ahead of the pipeline's consumption (default).
DECODE_DEPTH = 8
#: Seconds :func:`start_lane`'s probe waits for its go (the engines' warm-up) at most.
GO_TIMEOUT = 600.0


class JpegLane:
    """Decode pipeline chunks on the GPU.

    Args:
        device: the pipeline's CUDA device. ``decode_stream``: the stream decodes run on
            (a ``torch.cuda`` stream). ``depth``: lane chunks in flight at most. ``threads``:
            lane threads (one reads the next chunk's bytes while another decodes).
    """

    def __init__(self, device, decode_stream, depth: int = DECODE_DEPTH, threads: int = 2):
        from trtwsi.read.jpeg_batch import JpegBatchDecoder

        self.decoder = JpegBatchDecoder(device)
        self.stream = decode_stream
        self.depth = max(1, int(depth))
        self.pending = 0  # submitted and not yet placed
        #: True while CPU decode is behind (set by the pipeline as it takes CPU chunks)
        self.starved = True
        self._pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="trtwsi-jpeg")
        #: totals since start: chunks, tiles decoded on the device, tiles the CPU fell back to
        self.chunks = 0
        self.device_tiles = 0
        self.cpu_tiles = 0

    def wants(self, item) -> bool:
        """True when ``item`` (a pipeline chunk) should be decoded here now."""
        if not self.starved or self.pending >= self.depth or item.run.error is not None:
            return False
        return bool(item.run.plan.slide.jpeg_level(item.chunk.level))

    def submit(self, item) -> Future:
        self.pending += 1
        return self._pool.submit(self._decode, item)

    def _decode(self, item):
        """(DecodedRegion, event) of ``item``'s chunk, or None after failing its slide."""
        import torch

        run, c = item.run, item.chunk
        if run.error is not None:
            return None
        t0 = time.perf_counter()
        w, h = c.read_size
        try:
            only = c.windows(item.grid.read_size)  # the chunk's tiles, not its bounding box
            region = run.plan.slide.compressed_region(
                c.region[0], c.region[1], w, h, c.level, only=only
            )
            with torch.cuda.stream(self.stream):
                dec = self.decoder.decode(region)
                done = torch.cuda.Event()
                done.record(self.stream)
        except Exception as e:  # the slide fails alone, as with a CPU read
            run.fail(e)
            return None
        finally:
            run.timer.add("read_gpu", time.perf_counter() - t0)
        return dec, done

    def place(self, result, out, stream) -> None:
        """Lay the decoded chunk ``result`` into ``out`` (uint8 ``(h, w, 3)`` device view) on
        ``stream``, after its decode; the decoded tiles' memory is not reused before that."""
        import torch

        dec, done = result
        self.pending -= 1
        with torch.cuda.stream(stream):
            stream.wait_event(done)
            dec.copy_into(out)
            if dec.grid is not None:
                dec.grid.record_stream(stream)
        self.chunks += 1
        self.device_tiles += dec.device_tiles
        self.cpu_tiles += dec.cpu_tiles

    def dropped(self) -> None:
        """A submitted chunk that will not be placed (its slide failed)."""
        self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def start_lane(device, decode_stream, depth: int = DECODE_DEPTH, go=None) -> Future:
    """Probe nvJPEG and build a :class:`JpegLane` in a thread of its own.

    The probe is slow the first time in a process: importing ``torchvision`` (which imports
    ``torch._dynamo``) took 1.6–2.2 s on a 2-core CPU machine and 5.2 s on a fresh H200 host,
    its first device decode 0.64 s. A pipeline that waited for it started 4.9–7.3 s later
    (H200). So the thread imports at once (no CUDA work: it may overlap an engine's CUDA-graph
    capture), waits for ``go`` (a ``threading.Event``, None: no wait) before its test decode
    on the device, and the pipeline reads with the CPU readers until it adopts the lane.

    Returns:
        a Future of the lane, or of the reason (a string) why nvJPEG cannot decode here
        (:func:`~trtwsi.read.jpeg_batch.jpeg_batch_unavailable`); it never raises. Its
        ``seconds`` attribute is the probe's time without the wait for ``go``.
    """
    fut: Future = Future()

    def probe() -> None:
        t0 = time.perf_counter()
        waited = 0.0
        try:
            from trtwsi.read.jpeg_batch import jpeg_batch_unavailable

            with contextlib.suppress(Exception):  # jpeg_batch_unavailable says why
                import torchvision.io  # noqa: F401  (the slow part, before the wait)
            if go is not None:
                t1 = time.perf_counter()
                ready = go.wait(GO_TIMEOUT)
                waited = time.perf_counter() - t1
                if not ready:  # never wait forever: this thread holds up the interpreter's exit
                    raise TimeoutError(f"no go after {GO_TIMEOUT:.0f} s (warm-up not finished)")
            why = jpeg_batch_unavailable(device)
            result = why if why is not None else JpegLane(device, decode_stream, depth)
        except Exception as e:  # never lose the reason
            result = f"the GPU JPEG lane failed to start ({type(e).__name__}: {e})"
        fut.seconds = time.perf_counter() - t0 - waited
        fut.set_result(result)

    fut.set_running_or_notify_cancel()
    # not a daemon: the interpreter's exit joins it. A daemon thread still inside torchvision's
    # CUDA code at exit aborted the process ("terminate called without an active exception",
    # H200, a script that did not close its Predictor).
    threading.Thread(target=probe, name="trtwsi-jpeg-probe", daemon=False).start()
    return fut
