"""JPEG tiles of a TIFF as complete streams, for decoders that take whole JPEG files (nvJPEG).

A TIFF JPEG tile (compression 7) is often *abbreviated*: its quantization and Huffman tables
are stored once, in the page's ``JPEGTables`` tag (Aperio SVS, libtiff/libvips output), and the
tile stream holds only the frame and scan. :func:`splice_tables` makes one complete stream of
the two (the tables stream without its EOI, then the tile stream without its SOI).

:func:`read_frame` reads the frame header (size, components and their sampling factors) by
walking the markers from the start, bounded by the data's length: a hostile tile gets a
``ValueError``, never a read past its bytes or an endless loop.

:class:`CompressedRegion` is what :meth:`~trtwsi.slide.tiff.TiffSlide.compressed_region`
returns: the file tiles one region of a level needs, their streams, where they land.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CompressedRegion", "JpegFrame", "check_stream", "read_frame", "splice_tables"]

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"

#: Start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
#: Markers without a length field.
_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}


def splice_tables(tables, tile) -> bytearray:
    """One complete JPEG stream from a ``JPEGTables`` stream and an abbreviated tile stream.

    Args:
        tables: the tag's bytes (SOI … tables … EOI), or None/empty when the tile is complete.
        tile: the tile's bytes (SOI … frame and scan … EOI), any bytes-like object.

    Returns a new ``bytearray`` (writable: ``torch.frombuffer`` takes it without a copy).

    Raises:
        ValueError: a stream that does not start (tables: and end) with the right marker.
    """
    tile = memoryview(tile).cast("B")
    if tile[:2] != SOI:
        raise ValueError(f"tile stream starts with {bytes(tile[:2])!r}, not the JPEG SOI marker")
    if not tables:
        return bytearray(tile)
    if not (tables[:2] == SOI and tables[-2:] == EOI):
        raise ValueError("JPEGTables is not a SOI … EOI stream")
    out = bytearray(tables[:-2])
    out += tile[2:]
    return out


@dataclass(frozen=True)
class JpegFrame:
    """The frame header of a JPEG stream.

    ``marker``: the SOF marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive, …);
    ``components``: ``(id, h, v)`` per component (sampling factors).
    """

    marker: int
    precision: int
    width: int
    height: int
    components: tuple[tuple[int, int, int], ...]

    @property
    def subsampled(self) -> bool:
        """True when the components do not all have the same sampling factors."""
        return len({(h, v) for _, h, v in self.components}) > 1


def _segments(b):
    """``(marker, offset, length)`` of each segment of ``b`` (bytes-like, indexable as ints)
    from after SOI up to and including the first scan (SOS) or EOI; fill bytes and standalone
    markers are skipped. Each step moves forward, so the walk is bounded by ``len(b)``.

    Raises:
        ValueError: no SOI, a byte where a marker must be, or a segment that runs past the data.
    """
    n = len(b)
    if n < 4 or b[0] != 0xFF or b[1] != 0xD8:
        raise ValueError("not a JPEG stream (no SOI marker)")
    i = 2
    while i + 4 <= n:
        if b[i] != 0xFF:
            raise ValueError(f"expected a marker at byte {i}, found {b[i]:#04x}")
        m = b[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _STANDALONE:
            i += 2
            continue
        length = (b[i + 2] << 8) | b[i + 3]
        if length < 2 or i + 2 + length > n:
            raise ValueError(f"segment {m:#04x} at byte {i} of length {length} runs past the data")
        yield m, i, length
        if m in (0xDA, 0xD9):
            return
        i += 2 + length


def _frame_at(b, m: int, i: int, length: int) -> JpegFrame:
    """The frame header segment ``m`` at byte ``i`` (``length`` from its length field)."""
    if length < 8:
        raise ValueError(f"frame header of length {length} is too short")
    seg = bytes(b[i + 4 : i + 2 + length])
    nc = seg[5]
    if length < 8 + 3 * nc:
        raise ValueError(f"frame header declares {nc} components in {length} bytes")
    comps = tuple((seg[6 + 3 * k], seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(nc))
    return JpegFrame(
        marker=m,
        precision=seg[0],
        height=(seg[1] << 8) | seg[2],
        width=(seg[3] << 8) | seg[4],
        components=comps,
    )


def read_frame(data) -> JpegFrame:
    """The first frame header of ``data`` (a complete or spliced JPEG stream).

    Raises:
        ValueError: no SOI, a marker or segment length that runs past the data, a scan (SOS)
            before any frame, or no frame at all.
    """
    b = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B")
    for m, i, length in _segments(b):
        if m in _SOF:
            return _frame_at(b, m, i, length)
        if m in (0xDA, 0xD9):
            raise ValueError("scan or end of image before any frame header")
    raise ValueError("no frame header in the data")


def check_stream(data, width: int, height: int) -> JpegFrame:
    """Check the marker structure of a complete baseline/extended/progressive JPEG stream of a
    tile of exactly ``width × height`` px (a TIFF tile's JPEG is always the whole tile; a larger
    frame would make the decoder allocate what the header says, so it is refused here) with 1
    or 3 8-bit components, before a decoder that does not report errors sees it (nvJPEG through
    torchvision returns uninitialised pixels for some malformed streams instead of failing). Walks every segment up to the first scan, and
    requires quantization and Huffman tables (or arithmetic coding), a frame, a scan and the
    EOI marker at the end. Damage *inside* the entropy-coded data is not detectable here, as
    libjpeg does not detect it either.

    Raises:
        ValueError: naming what is wrong.
    """
    b = data if isinstance(data, (bytes, bytearray)) else bytes(data)
    frame, seen = None, set()
    for m, i, length in _segments(b):  # one walk up to the scan
        seen.add(m)
        if m in _SOF and frame is None:
            frame = _frame_at(b, m, i, length)
    if frame is None:
        raise ValueError("no frame header in the data")
    if frame.precision != 8 or len(frame.components) not in (1, 3):
        raise ValueError(
            f"{frame.precision}-bit JPEG with {len(frame.components)} components is not 8-bit gray/RGB"
        )
    if frame.width != width or frame.height != height:
        raise ValueError(f"JPEG frame is {frame.width}x{frame.height}, the tile {width}x{height}")
    if any(not (1 <= h <= 4 and 1 <= v <= 4) for _, h, v in frame.components):
        raise ValueError(f"JPEG sampling factors {frame.components} are invalid")
    if not b.endswith(EOI):
        raise ValueError("JPEG stream does not end with the EOI marker (truncated?)")
    if 0xDA not in seen:
        raise ValueError("JPEG stream has no scan (SOS)")
    if 0xDB not in seen:
        raise ValueError("JPEG stream has no quantization table (DQT)")
    if 0xC4 not in seen and frame.marker < 0xC9:
        raise ValueError("JPEG stream has no Huffman table (DHT)")
    return frame


@dataclass
class CompressedRegion:
    """The JPEG file tiles covering one region of one level, ready for a batch decoder.

    Frames: ``shape`` = (h, w) of the region in level px; the tiles form a grid of
    ``rows × cols`` tiles of ``tile`` = (th, tw) px whose top-left corner lands at ``origin``
    = (x, y) in region px (≤ 0: the grid starts at or before the region). ``valid`` =
    (x0, y0, x1, y1) is the part of the region inside the level (region px); the rest is
    ``fill``.

    ``streams``: row-major, one per tile: a complete JPEG stream (``bytearray``, tables spliced),
    None for a sparse tile (``fill``), or the exception that kept its bytes from being read.
    ``components``: ``"ycbcr"`` (decode to RGB) or ``"rgb"`` (stored RGB, no colour
    transform, as Aperio writes it). ``cpu_read(x, y, w, h)`` decodes level px (inside the
    level) on the CPU into a new ``(h, w, 3)`` uint8 array, recording tile errors as every read
    does: the per-tile fallback.
    """

    level: int
    shape: tuple[int, int]
    tile: tuple[int, int]
    rows: int
    cols: int
    origin: tuple[int, int]
    valid: tuple[int, int, int, int]
    streams: list
    components: str
    fill: int
    at: tuple[int, int]  # the region's top-left in level px (negative: before the level)
    cpu_read: Callable

    def tile_corner(self, k: int) -> tuple[int, int]:
        """Top-left of tile ``k`` in region px."""
        r, c = divmod(k, self.cols)
        return self.origin[0] + c * self.tile[1], self.origin[1] + r * self.tile[0]

    def tile_rect(self, k: int) -> tuple[int, int, int, int]:
        """Level px (x, y, w, h) of tile ``k`` clipped to the region's valid part."""
        th, tw = self.tile
        tx, ty = self.tile_corner(k)
        x0, y0, x1, y1 = self.valid
        ix0, iy0 = max(tx, x0), max(ty, y0)
        ix1, iy1 = min(tx + tw, x1), min(ty + th, y1)
        return ix0 + self.at[0], iy0 + self.at[1], max(0, ix1 - ix0), max(0, iy1 - iy0)
