"""Bounded walk of a TIFF's chain of image directories (IFDs), before tifffile parses it.

tifffile follows the next-IFD pointers itself and only detects short cycles (it checks once, at
the 100th page): a cycle of 100 or more IFDs, or a chain of millions of overlapping IFDs in a
small hostile file, makes it loop for hours. :func:`walk_ifd_chain` follows the same pointers with
cycle detection and a page-count cap and raises :class:`~trtwsi.errors.IFDChainError` instead.

Layouts: classic TIFF (``II*\\0`` / ``MM\\0*``: 2-byte entry count, 12-byte entries, 4-byte next
offset), BigTIFF (``II+\\0`` / ``MM\\0+``: 8-byte count, 20-byte entries, 8-byte offsets) and
Hamamatsu NDPI (classic, but the 8 bytes after the entries are a 64-bit next offset, as tifffile
reads them), in both byte orders.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from trtwsi.errors import IFDChainError, InvalidDimensionsError, UnsupportedFormatError

#: Longest IFD chain accepted (main pages; SubIFDs are not part of the chain). Real slides have
#: a handful of pages; OME-TIFF stacks a few thousand (tifffile opens 8000 uniform pages in
#: ~1.4 s on one core, so this bounds the parse to seconds).
MAX_IFDS = 1 << 15

#: Most changes of image size along the chain. tifffile's generic series detection
#: (``pyramidize_series``) is quadratic in the number of series: 1000 pages of distinct sizes
#: take 18 s, 4000 take 110 s. Real slides change size a few dozen times at most.
MAX_SIZE_CHANGES = 128

#: Most IFDs in the chain that lack ImageWidth, ImageLength or data offsets (tifffile rejects
#: each one slowly: 8000 such IFDs took 18 s). A damaged file has a few; more is hostile.
MAX_BAD_IFDS = 16

#: Largest number of entries in one IFD that tifffile accepts (it treats more as corruption).
MAX_IFD_ENTRIES = 4096

_NDPI_TAG = 65420  # Hamamatsu FileFormat: present in every NDPI IFD


@dataclass(frozen=True)
class IFDChain:
    """Result of :func:`walk_ifd_chain`.

    ``byteorder``: ``"<"`` or ``">"``; ``bigtiff`` / ``ndpi``: layout; ``offsets``: file offsets of
    the IFDs in chain order (stops at a zero pointer or at one that leaves the file, as tifffile
    does); ``width0`` / ``height0``: ImageWidth / ImageLength of IFD 0 (None when absent).
    """

    byteorder: str
    bigtiff: bool
    ndpi: bool
    offsets: tuple[int, ...]
    width0: int | None
    height0: int | None


def _ifd_tags(f, bo: str, off: int, n: int, bigtiff: bool) -> dict[int, int]:
    """Tags of the IFD at ``off`` with ``n`` entries: code → its inline scalar SHORT/LONG/LONG8
    value, or -1 for any other tag (arrays, out-of-line or other types)."""
    esize = 20 if bigtiff else 12
    f.seek(off + (8 if bigtiff else 2))
    raw = f.read(min(n, MAX_IFD_ENTRIES) * esize)
    tags = {}
    for i in range(len(raw) // esize):
        e = raw[i * esize : (i + 1) * esize]
        if bigtiff:
            code, typ, count = struct.unpack(bo + "HHQ", e[:12])
            val = e[12:]
        else:
            code, typ, count = struct.unpack(bo + "HHI", e[:8])
            val = e[8:]
        if count != 1:
            tags.setdefault(code, -1)
            continue
        if typ == 3:
            tags[code] = struct.unpack(bo + "H", val[:2])[0]
        elif typ in (4, 13):
            tags[code] = struct.unpack(bo + "I", val[:4])[0]
        elif typ in (16, 18) and bigtiff:
            tags[code] = struct.unpack(bo + "Q", val[:8])[0]
        else:
            tags.setdefault(code, -1)
    return tags


def walk_ifd_chain(path: str | os.PathLike, max_ifds: int = MAX_IFDS) -> IFDChain:
    """Follow the IFD chain of the TIFF at ``path`` from its header, reading only IFD headers.

    Raises :class:`IFDChainError` when an IFD points back to one already visited (a cycle), the
    chain is longer than ``max_ifds``, has more than :data:`MAX_BAD_IFDS` IFDs without size or
    data tags, or changes image size more than :data:`MAX_SIZE_CHANGES` times (each would make
    tifffile's parse take minutes to hours); :class:`InvalidDimensionsError` when IFD 0 declares
    a zero width or height (the next IFD would otherwise silently become the slide);
    :class:`UnsupportedFormatError` when the file does not start with a TIFF header.
    A pointer past the end of the file, or a short read, ends the chain (tifffile then reports
    what it can parse).
    """
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:2] == b"II":
            bo = "<"
        elif head[:2] == b"MM":
            bo = ">"
        else:
            raise UnsupportedFormatError(f"{str(path)!r}: no TIFF byte-order mark ({head[:4]!r})")
        if len(head) < 8:
            raise IFDChainError(f"{str(path)!r}: TIFF header cut short ({len(head)} bytes)")
        version = struct.unpack(bo + "H", head[2:4])[0]
        if version == 42:
            bigtiff = False
            first = struct.unpack(bo + "I", head[4:8])[0]
        elif version == 43:
            if len(head) < 16:
                raise IFDChainError(f"{str(path)!r}: BigTIFF header cut short ({len(head)} bytes)")
            bigtiff = True
            first = struct.unpack(bo + "Q", head[8:16])[0]
        else:
            raise UnsupportedFormatError(f"{str(path)!r}: TIFF version {version} is not 42 or 43")
        cfmt, csize = (bo + "Q", 8) if bigtiff else (bo + "H", 2)
        esize = 20 if bigtiff else 12
        nfmt, nsize = (bo + "Q", 8) if bigtiff else (bo + "I", 4)
        offsets: list[int] = []
        seen: set[int] = set()
        ndpi = False
        width0 = height0 = None
        bad = changes = 0
        last_size = None
        off = first
        while off and off + csize <= size:
            if off in seen:
                raise IFDChainError(
                    f"{str(path)!r}: IFD {len(offsets)} (next pointer of IFD at byte "
                    f"{offsets[-1]}) points back to the IFD at byte {off}, IFD "
                    f"{offsets.index(off)} — a cycle in the image directory chain; the file is "
                    "damaged (export or copy it again)"
                )
            if len(offsets) >= max_ifds:
                raise IFDChainError(
                    f"{str(path)!r}: more than {max_ifds} image directories (IFDs) in the chain — "
                    "the chain is damaged or hostile (real slides have a few dozen at most)"
                )
            f.seek(off)
            raw = f.read(csize)
            if len(raw) < csize:
                break
            n = struct.unpack(cfmt, raw)[0]
            if n > MAX_IFD_ENTRIES:
                break  # tifffile stops at such an IFD as corrupt; so do we
            tags = _ifd_tags(f, bo, off, n, bigtiff)
            size_now = (tags.get(256), tags.get(257))
            if size_now[0] is None or size_now[1] is None or not (273 in tags or 324 in tags):
                bad += 1
                if bad > MAX_BAD_IFDS:
                    raise IFDChainError(
                        f"{str(path)!r}: more than {MAX_BAD_IFDS} image directories without "
                        "image size or data offsets in the chain — the file is damaged or hostile"
                    )
            elif size_now != last_size:
                changes += 1
                last_size = size_now
                if changes > MAX_SIZE_CHANGES:
                    raise IFDChainError(
                        f"{str(path)!r}: the image size changes more than {MAX_SIZE_CHANGES} "
                        "times along the image directory chain (real slides: a few dozen "
                        "images at most) — the file is damaged or hostile"
                    )
            if not offsets:
                ndpi = not bigtiff and bo == "<" and _NDPI_TAG in tags
                width0, height0 = tags.get(256), tags.get(257)
                if width0 == 0 or height0 == 0:
                    raise InvalidDimensionsError(
                        f"{str(path)!r}: the first image directory declares an empty image "
                        f"({width0}x{height0} px); the file is damaged — refusing to read the next "
                        "image as if it were the slide"
                    )
                if ndpi:
                    nfmt, nsize = "<Q", 8
            seen.add(off)
            offsets.append(off)
            f.seek(off + csize + n * esize)
            raw = f.read(nsize)
            if len(raw) < nsize:
                break
            off = struct.unpack(nfmt, raw)[0]
            if off >= size:
                break
    return IFDChain(bo, bigtiff, ndpi, tuple(offsets), width0, height0)
