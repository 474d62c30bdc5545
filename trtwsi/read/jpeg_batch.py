"""Decode the JPEG tiles of a slide region in one batch on the GPU (nvJPEG, via torchvision).

A :class:`~trtwsi.slide.jpeg_stream.CompressedRegion` (the region's file tiles as complete
JPEG streams, read by ``pread`` in the calling thread) goes to
``torchvision.io.decode_jpeg(list, device=…)`` in one call. On CUDA torchvision uses nvJPEG's
hardware decoder where the GPU has one (A100, H100/H200: baseline JPEG) and its CUDA decoder
otherwise, so the pixels never cross PCIe and the CPU does no entropy decoding. The tiles are
then stacked and laid out as the region in HWC uint8 on the device (two copies, on the GPU).

Per-tile fallback, so nothing is lost: if the batch call fails (one bad tile fails the whole
call), the tiles are decoded one by one; a tile that still fails, a tile whose bytes could not
be read, or a tile of an unexpected size is read on the CPU by the slide's own reader
(``CompressedRegion.cpu_read``), which records a real decode error (``Slide.read_errors``) and
fills the tile exactly as a CPU read would. Sparse tiles are ``fill``.

Colour: ``"ycbcr"`` tiles decode to RGB (nvJPEG's YCbCr → RGB). ``"rgb"`` tiles (Aperio
stores the JPEG components as R, G, B with no transform) are decoded with the components
unchanged on the CPU (torchvision's libjpeg); on CUDA they go to the CPU reader, because nvJPEG
applied the YCbCr transform to them even with ``ImageReadMode.UNCHANGED`` (measured on an H200:
82 levels off on average; the RGB mode applies it by design). nvJPEG's IDCT and chroma
upsampling differ from libjpeg-turbo's by a few levels per pixel: see
``tests/read/test_jpeg_batch.py`` and the README for the measured difference.

The same code runs on ``device="cpu"`` (torchvision's libjpeg), which is how the CPU tests
drive every path but nvJPEG itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (which has no batched
# nvJPEG decode of a list of streams yet); the calls work, so keep the notice out of users' logs.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

__all__ = ["DecodedRegion", "JpegBatchDecoder", "jpeg_batch_unavailable"]


def jpeg_batch_unavailable(device) -> str | None:
    """Why :class:`JpegBatchDecoder` cannot decode on ``device`` (a string), or None: decodes
    a small JPEG there and compares it with libjpeg-turbo's pixels (within 8 levels)."""
    try:
        import imagecodecs
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as e:
        return f"torchvision is not importable ({type(e).__name__}: {e})"
    try:
        yy, xx = np.mgrid[0:32, 0:48]
        img = np.stack([xx * 5, yy * 7, (xx + yy) * 3], -1).astype(np.uint8)
        data = imagecodecs.jpeg8_encode(img, level=95)
        ref = imagecodecs.jpeg8_decode(data)
        out = decode_jpeg(
            [torch.frombuffer(bytearray(data), dtype=torch.uint8)],
            mode=ImageReadMode.RGB,
            device=torch.device(device),
        )[0]
        got = out.permute(1, 2, 0).cpu().numpy()
    except Exception as e:
        return f"torchvision.io.decode_jpeg on {device} failed ({type(e).__name__}: {str(e)[:200]})"
    if got.shape != ref.shape or int(np.abs(got.astype(int) - ref).max()) > 8:
        return f"torchvision.io.decode_jpeg on {device} decoded a test image wrongly"
    return None


@dataclass
class DecodedRegion:
    """A region decoded on the device: ``grid`` is the tile grid's pixels, uint8
    ``(rows·th, cols·tw, 3)`` on the device (None when no tile touches the level), laid at
    ``origin`` (x, y) in region px; ``valid``/``shape``/``fill`` as in
    :class:`~trtwsi.slide.jpeg_stream.CompressedRegion`. ``device_tiles``/``cpu_tiles``:
    how many tiles each decoder did."""

    grid: object
    origin: tuple[int, int]
    valid: tuple[int, int, int, int]
    shape: tuple[int, int]
    fill: int
    device_tiles: int = 0
    cpu_tiles: int = 0

    def copy_into(self, out) -> None:
        """Write the region into ``out``: a uint8 ``(h, w, 3)`` tensor on the grid's device
        (e.g. a view of a device chunk slot), on the current stream."""
        h, w = self.shape
        if tuple(out.shape) != (h, w, 3):
            raise ValueError(f"out has shape {tuple(out.shape)}, the region is {(h, w, 3)}")
        x0, y0, x1, y1 = self.valid
        if (x0, y0, x1, y1) != (0, 0, w, h) or self.grid is None:
            out.fill_(self.fill)
        if self.grid is None or x1 <= x0 or y1 <= y0:
            return
        ox, oy = self.origin
        out[y0:y1, x0:x1].copy_(self.grid[y0 - oy : y1 - oy, x0 - ox : x1 - ox])

    def to_numpy(self) -> np.ndarray:
        """The region as a host ``(h, w, 3)`` uint8 array (tests, debugging)."""
        import torch

        dev = self.grid.device if self.grid is not None else "cpu"
        out = torch.empty((*self.shape, 3), dtype=torch.uint8, device=dev)
        self.copy_into(out)
        return out.cpu().numpy()


class JpegBatchDecoder:
    """Decodes :class:`~trtwsi.slide.jpeg_stream.CompressedRegion` objects on one device.

    Thread-safe (torchvision serialises its nvJPEG calls). Call :meth:`decode` inside the CUDA
    stream the result is to be ordered on; the returned grid is valid on that stream.
    """

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self._fill: dict = {}

    def decode(self, region) -> DecodedRegion:
        """Decode every tile of ``region`` (see the module docstring for the fallbacks)."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        th, tw = region.tile
        n = region.rows * region.cols
        tiles: list = [None] * n
        todo: list[int] = []
        cpu: list[int] = []
        on_gpu = self.device.type == "cuda"
        for k, s in enumerate(region.streams):
            if s is None:
                continue  # sparse: fill
            # unreadable bytes, a malformed stream (nvJPEG may return garbage for it without an
            # error), or stored RGB subsampled (UNCHANGED cannot lay that out): the CPU decides
            ok = (
                not isinstance(s, Exception)
                and not (on_gpu and region.components == "rgb")
                and _frame(s, tw, th, region.components)
            )
            (todo if ok else cpu).append(k)
        mode = ImageReadMode.UNCHANGED if region.components == "rgb" else ImageReadMode.RGB
        datas = [torch.frombuffer(_writable(region.streams[k]), dtype=torch.uint8) for k in todo]
        decoded: list = []
        if datas:
            try:
                decoded = decode_jpeg(datas, mode=mode, device=self.device)
            except RuntimeError:  # one bad tile fails the batch: one by one
                decoded = []
                for d in datas:
                    try:
                        decoded.append(decode_jpeg([d], mode=mode, device=self.device)[0])
                    except RuntimeError:
                        decoded.append(None)
        for k, t in zip(todo, decoded, strict=True):
            if t is None or tuple(t.shape) != (3, th, tw):  # check_stream passed a th × tw frame
                cpu.append(k)
            else:
                tiles[k] = t
        device_tiles = n - len(cpu) - sum(s is None for s in region.streams)
        for k in cpu:
            tiles[k] = self._cpu_tile(region, k)
        fill = self._fill_tile(region.fill, th, tw)
        grid = None
        if n:
            stack = torch.stack([t if t is not None else fill for t in tiles])
            grid = (
                stack.view(region.rows, region.cols, 3, th, tw)
                .permute(0, 3, 1, 4, 2)
                .reshape(region.rows * th, region.cols * tw, 3)
            )
        return DecodedRegion(
            grid=grid,
            origin=region.origin,
            valid=region.valid,
            shape=region.shape,
            fill=region.fill,
            device_tiles=device_tiles,
            cpu_tiles=len(cpu),
        )

    def _cpu_tile(self, region, k: int):
        """Tile ``k`` read by the slide's CPU reader (errors recorded there), ``(3, th, tw)``
        on the device; the part outside the region's valid area stays ``fill``."""
        import torch

        th, tw = region.tile
        rx, ry, rw, rh = region.tile_rect(k)
        host = np.full((th, tw, 3), region.fill, np.uint8)
        if rw > 0 and rh > 0:
            cx, cy = region.tile_corner(k)  # region px; rx, ry are level px
            dx, dy = rx - region.at[0] - cx, ry - region.at[1] - cy
            host[dy : dy + rh, dx : dx + rw] = region.cpu_read(rx, ry, rw, rh)
        return torch.from_numpy(host).to(self.device, non_blocking=False).permute(2, 0, 1)

    def _fill_tile(self, fill: int, th: int, tw: int):
        import torch

        key = (fill, th, tw)
        t = self._fill.get(key)
        if t is None:
            t = self._fill[key] = torch.full(
                (3, th, tw), fill, dtype=torch.uint8, device=self.device
            )
        return t


def _writable(stream) -> bytearray:
    return stream if isinstance(stream, bytearray) else bytearray(stream)


def _frame(stream, width: int, height: int, components: str) -> bool:
    """True when ``stream`` may go to nvJPEG (see :func:`~trtwsi.slide.jpeg_stream.check_stream`)."""
    from trtwsi.slide.jpeg_stream import check_stream

    try:
        frame = check_stream(stream, width, height)
    except ValueError:
        return False
    return len(frame.components) == 3 and not (components == "rgb" and frame.subsampled)
