"""Dimensions and completeness of ordinary image files, read from their headers without decoding.

:func:`probe_image` reads the JPEG SOF / PNG IHDR / BMP info header for the declared size, and
checks that the file is complete (JPEG: an EOI marker after the first SOS; PNG: the chunk chain
reaches IEND inside the file), so that a file cut short is refused instead of decoded into a
partly blank image, and a tiny file declaring a gigantic image is refused before OpenCV
allocates it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from trtwsi.errors import CorruptSlideError, TruncatedImageError

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (SOF0-SOF15 less DHT C4, JPG C8, DAC CC).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


@dataclass(frozen=True)
class ImageHeader:
    """``kind``: "jpeg" | "png" | "bmp"; ``width`` / ``height``: declared size in pixels."""

    kind: str
    width: int
    height: int


def _jpeg(path, data: bytes) -> ImageHeader:
    i, n = 2, len(data)
    size = None
    sos = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise CorruptSlideError(
                f"{str(path)!r}: JPEG marker expected at byte {i}, found {data[i]:#04x}; the file "
                "is damaged"
            )
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xD8 or 0xD0 <= m <= 0xD7 or m == 0x01:
            i += 2
            continue
        if m == 0xD9:
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            raise CorruptSlideError(f"{str(path)!r}: JPEG segment {m:#04x} length {length} < 2")
        if m in _SOF and size is None:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            size = (w, h)
        if m == 0xDA:
            sos = i
            break
        i += 2 + length
    if size is None:
        if i + 4 > n or sos is None:
            raise TruncatedImageError(
                f"{str(path)!r}: JPEG ends ({n} bytes) before its frame header (SOF); the file "
                "is truncated — copy or download it again"
            )
        raise CorruptSlideError(f"{str(path)!r}: JPEG without a frame header (SOF)")
    if sos is None or data.rfind(b"\xff\xd9") < sos:
        raise TruncatedImageError(
            f"{str(path)!r}: JPEG of {size[0]}x{size[1]} px has no end-of-image marker (EOI) "
            f"after its scan data ({n} bytes) — the file is truncated and would decode partly "
            "blank; copy or download it again"
        )
    return ImageHeader("jpeg", *size)


def _png(path, f, filesize: int) -> ImageHeader:
    f.seek(8)
    head = f.read(8 + 13)
    if len(head) < 21 or head[4:8] != b"IHDR":
        raise TruncatedImageError(f"{str(path)!r}: PNG without a complete IHDR chunk")
    w, h = struct.unpack(">II", head[8:16])
    pos = 8
    while True:  # walk the chunk chain to IEND (cheap: one 8-byte read per chunk)
        f.seek(pos)
        ch = f.read(8)
        if len(ch) < 8:
            break
        (length,) = struct.unpack(">I", ch[:4])
        if ch[4:8] == b"IEND":
            return ImageHeader("png", w, h)
        pos += 12 + length
        if pos > filesize:
            break
    raise TruncatedImageError(
        f"{str(path)!r}: PNG of {w}x{h} px ends ({filesize} bytes) before its IEND chunk — the "
        "file is truncated and would decode partly blank; copy or download it again"
    )


def probe_image(path: str | os.PathLike) -> ImageHeader | None:
    """Header facts of a JPEG, PNG or BMP file; None for other kinds (left to the decoder).

    Raises :class:`TruncatedImageError` for a JPEG without EOI after its scan or a PNG whose
    chunks stop before IEND, :class:`CorruptSlideError` for a malformed header.
    """
    filesize = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:3] == b"\xff\xd8\xff":
            f.seek(0)
            return _jpeg(path, f.read())
        if head == _PNG_SIG:
            return _png(path, f, filesize)
        if head[:2] == b"BM":
            f.seek(14)
            info = f.read(12)
            if len(info) < 12:
                raise TruncatedImageError(f"{str(path)!r}: BMP header cut short")
            (hsize,) = struct.unpack("<I", info[:4])
            if hsize == 12:
                w, h = struct.unpack("<HH", info[4:8])
            else:
                w, h = struct.unpack("<ii", info[4:12])
            return ImageHeader("bmp", abs(w), abs(h))
    return None
