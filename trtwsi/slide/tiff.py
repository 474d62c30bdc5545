"""TIFF-family slides (Aperio SVS, Hamamatsu NDPI, OME-TIFF, pyramidal and plain TIFF) via tifffile.

Opening parses the TIFF structure with :mod:`tifffile` (lazily: no pixel is decoded). Reading a
region decodes **only** the file tiles (or strips) it touches, in runs of adjacent tiles handed to
a :class:`~concurrent.futures.ThreadPoolExecutor` owned by the slide (a single-tile region, or
``threads=1``, decodes in the calling thread). Raw tile bytes are read with ``os.pread`` on a
private file descriptor (thread-safe, no shared file position; one read per run of contiguous
tiles), decoded by imagecodecs (GIL released) — 8-bit RGB/YCbCr JPEG tiles directly by
``jpeg8_decode`` into a per-thread tile buffer, everything else through tifffile's
``page.decode`` — converted with :func:`trtwsi.slide.color.to_rgb_uint8` and copied straight into
the caller's ``out`` view (the region is never allocated twice).

Which image is the slide
    ``TiffFile.series``: the largest series that is not a label, macro, thumbnail or map image;
    its ``levels`` are the pyramid (SubIFDs, consecutive reduced pages, SVS/NDPI/OME layouts).
    Of a level holding several planes (focal planes, OME channels/Z/T) the first plane is read.

Layouts
    - tiled or stripped, chunky or planar (``PlanarConfiguration=2``), any compression that
      tifffile + imagecodecs decode (JPEG with JPEGTables, NDPI JPEG restart-marker tiles,
      deflate, LZW, zstd, webp, JPEG 2000 …). Zero-byte (sparse) tiles read as ``fill`` (255).
    - uncompressed strips: only the rows (and, for narrow regions, the bytes of each row) the
      region touches are read, so a plain multi-gigabyte TIFF stays region-readable.
    - photometric: RGB, YCbCr (JPEG), min-is-black, min-is-white (inverted), palette (colormap).
      CMYK, CIELab and uncompressed YCbCr raise :class:`UnsupportedFormatError` at open.
    - volumetric tiles (``TileDepth > 1``) fall back to tifffile's ``asarray`` of the page
      (refused above ``FALLBACK_MAX_BYTES``).

Errors (decided at open, never by allocating): a path that is not a regular file (FIFO,
device, directory) → :class:`NotARegularFileError`; an IFD chain that loops or runs past
:data:`~trtwsi.slide.tiff_ifd.MAX_IFDS` pages (walked from the header before tifffile parses it)
→ :class:`IFDChainError`; IFD 0 declaring a zero width/height → :class:`InvalidDimensionsError`;
a strip or tile that would decode to more than :data:`~trtwsi.slide.array.MAX_ARRAY_PIXELS` px →
:class:`ImageTooLargeError`; a file that is not a TIFF →
:class:`UnsupportedFormatError`; a broken structure (truncated file: tile data past the end of
the file; tile/strip offsets that do not match the declared dimensions; absurd dimensions such as
10⁷ × 10⁷ px declared over a few kilobytes of data) → :class:`CorruptSlideError`; a compression
or photometric interpretation that cannot be decoded → :class:`UnsupportedFormatError`. A tile
whose bytes fail to decode at read time → :class:`TileReadError` through ``Slide._tile_failed``
(recorded and filled with 255, or raised with ``on_error="raise"``). Limit: libjpeg treats
damage *inside* the entropy-coded data of a JPEG tile (bytes zeroed or cut after the header) as a
warning and returns plausible-looking garbage, which cannot be told from pixels; only tiles that
fail to decode (bad markers/headers, junk, short byte counts, unreadable bytes) are reported.

Over 500 lines on purpose: one reader for the whole TIFF family, whose header checks (bounded
sizes, offsets, IFD chains: the hostile-file defences) and tile decoding share the parsed layout.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trtwsi.errors import (
    CorruptSlideError,
    ImageTooLargeError,
    SlideError,
    TileReadError,
    UnsupportedFormatError,
)
from trtwsi.slide.array import MAX_ARRAY_PIXELS
from trtwsi.slide.base import Level, OnError, Slide, level_downsample, level_parts, region_parts
from trtwsi.slide.color import to_rgb_uint8
from trtwsi.slide.files import check_regular_file
from trtwsi.slide.tiff_ifd import walk_ifd_chain
from trtwsi.slide.tiff_meta import (
    PLAUSIBLE_MPP,  # noqa: F401 - re-exported (openslide_reader, users)
    _absurd_ome,
    _ome_length_um,
    _plausible_mpp,
    _positive,
    _resolution_mpp,
)

#: Series names (tifffile's) that are never the slide image.
ASSOCIATED_SERIES = frozenset({"label", "macro", "thumbnail", "map", "overview"})

#: A compressed tile/strip decoding to more than this many bytes cannot be read region by region.
MAX_SEGMENT_BYTES = 1 << 31

#: A segment over 256 MiB whose declared decoded size exceeds its stored bytes this many times is
#: an absurd header (no codec compresses real pixels that well), not a real image.
ABSURD_RATIO = 1_000_000

#: ``threads=None`` → min(CPU count, this). Tile decode threads share the GIL between tiles; on
#: the 16-core GPU host, 8 threads read fastest and 16 are 2-3× slower (bench/results/read-*16c*).
DEFAULT_MAX_THREADS = 8

#: Work units per pool thread in one region read (runs of adjacent tiles of one tile row).
CHUNKS_PER_THREAD = 4

#: Largest page the tifffile ``asarray`` fallback decodes whole (bytes).
FALLBACK_MAX_BYTES = 1 << 30

_CONVERT_HINT = (
    "convert it to a tiled pyramidal TIFF, e.g. "
    "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg --Q 90`"
)

_PHOTOMETRIC_OK = {0, 1, 2, 3, 6}  # miniswhite, minisblack, rgb, palette, ycbcr (jpeg only)
_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}


@dataclass
class _LevelIO:
    """How to read one pyramid level (one TIFF page) segment by segment."""

    page: object  # tifffile.TiffPage
    width: int
    height: int
    seg_w: int  # tile width, or image width for strips
    seg_h: int  # tile length, or rows per strip
    n_across: int
    n_down: int
    tiled: bool
    planes: tuple[int, ...]  # sample planes to read (planar config 2); (0,) for chunky
    per_plane: int  # segments per sample plane
    offsets: np.ndarray  # int64, one per segment
    counts: np.ndarray  # int64, one per segment
    kind: str  # "segments" | "raw-rows" | "fallback"
    photometric: int
    lut: np.ndarray | None = None  # palette colormap, (N, 3) uint8
    raw_dtype: np.dtype | None = None  # for raw-rows: byte-ordered sample dtype
    samples: int = 1  # samples per pixel (contig)
    jpeg: dict | None = None  # direct imagecodecs.jpeg8_decode kwargs (8-bit RGB/YCbCr JPEG tiles)
    jpeg_header: bytes | None = None  # NDPI: JPEG header to prepend to each restart interval


def _needed(io: _LevelIO, x: int, y: int, w: int, h: int, parts: np.ndarray) -> np.ndarray:
    """Bool ``(rows, cols)`` over the segments of level px region ``x, y, w, h`` (inside the
    level): True where a part touches (``parts``: level-px ``(x0, y0, x1, y1)`` boxes inside
    the region, :func:`~trtwsi.slide.base.level_parts`)."""
    c0, r0 = x // io.seg_w, y // io.seg_h
    c1, r1 = (x + w - 1) // io.seg_w, (y + h - 1) // io.seg_h
    need = np.zeros((r1 - r0 + 1, c1 - c0 + 1), bool)
    for px0, py0, px1, py1 in parts.tolist():
        need[
            py0 // io.seg_h - r0 : (py1 - 1) // io.seg_h - r0 + 1,
            px0 // io.seg_w - c0 : (px1 - 1) // io.seg_w - c0 + 1,
        ] = True
    return need


class TiffSlide(Slide):
    """A TIFF-family whole-slide image read tile-parallel with tifffile + imagecodecs.

    Args:
        path: the .svs / .ndpi / .ome.tif / .tif file.
        mpp: microns per level-0 pixel; overrides what the file says (``None``: from the file).
        on_error: "record" (bad tiles filled with 255, listed in ``read_errors``) or "raise".
        threads: decode threads of this slide's pool (``None``: ``os.cpu_count()``, at most
            :data:`DEFAULT_MAX_THREADS`; 1: no pool, tiles decoded in the calling thread).

    Attributes: ``format`` is one of ``'aperio-svs'``, ``'hamamatsu-ndpi'``, ``'ome-tiff'``,
    ``'pyramidal-tiff'``, ``'tiff'``; ``levels`` (level 0 first; ``downsample`` = mean of the
    level-0/level width and height ratios, as OpenSlide computes it); ``mpp`` (µm per level-0
    pixel or None); ``properties`` (str keys, JSON-able values: ``vendor``, ``objective_power``,
    ``mpp_x``, ``mpp_y``, ``mpp_ignored`` (an absurd MPP in the file, treated as unknown),
    ``ome_ignored`` (why absurd OME-XML was not used), ``tiff.ifd_count``, ``tiff.*`` tags,
    ``aperio.*``, ``hamamatsu.*``, ``ome.*``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mpp: float | None = None,
        on_error: OnError = "record",
        threads: int | None = None,
    ):
        super().__init__(on_error=on_error)
        self._fd: int | None = None
        self._tif = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False
        if threads is None:
            threads = min(os.cpu_count() or 1, DEFAULT_MAX_THREADS)
        if int(threads) < 1:
            raise ValueError(f"threads must be >= 1 (or None for the CPU count), got {threads!r}")
        if mpp is not None and not (float(mpp) > 0 and math.isfinite(float(mpp))):
            raise ValueError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
        self.threads = int(threads)
        self.path = Path(path)
        self._fallback_cache: dict[int, np.ndarray] = {}
        self._fallback_lock = threading.Lock()
        self._tls = threading.local()  # per-thread JPEG tile buffers
        try:
            self._open(mpp)
        except BaseException:
            self.close()
            raise

    # --- opening ---------------------------------------------------------------------------
    def _open(self, mpp: float | None) -> None:
        import tifffile

        path = check_regular_file(self.path)  # a FIFO would block the first read forever
        self._filesize = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            raise UnsupportedFormatError(
                f"{str(path)!r} is not a TIFF file: its first bytes are {head!r}, a TIFF starts with "
                "b'II*\\x00' or b'MM\\x00*' (BigTIFF: '+'). Check the file, or open other formats "
                "with OpenSlide (pip install 'trtwsi[openslide]')"
            )
        chain = walk_ifd_chain(path)  # bounded: cycles / endless chains raise IFDChainError
        with _corrupt_on_error(path, self._filesize):
            tif = tifffile.TiffFile(path)
            self._tif = tif
            ome_ignored = _absurd_ome(tif)
            if ome_ignored:  # e.g. SizeT=1e9: tifffile would allocate a list per plane
                tif.close()
                tif = tifffile.TiffFile(path, is_ome=False)
                self._tif = tif
            series = self._main_series(tif)
            pages = [self._as_page(lvl.pages[0]) for lvl in series.levels]
        # a damaged IFD can carry values of any type (bytes, tuples, huge ints): whatever
        # breaks while the levels and properties are built is a corrupt file, not a bug
        with _corrupt_on_error(path, self._filesize):
            self._build(tif, series, pages, chain, ome_ignored)
        file_mpp = self.properties.get("mpp_x")
        self.mpp = float(mpp) if mpp is not None else file_mpp

        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._pread = getattr(os, "pread", None)
        if self._pread is None:  # pragma: no cover - Windows
            self._seek_lock = threading.Lock()

    def _build(self, tif, series, pages, chain, ome_ignored) -> None:
        """Levels, format and properties from the parsed pages (``pages``: level 0 first)."""
        self._io: list[_LevelIO] = []
        w0, h0 = pages[0].imagewidth, pages[0].imagelength
        self.levels = []
        for i, page in enumerate(pages):
            if self.levels and page.imagewidth >= self.levels[-1].width:
                continue  # not a reduced level (duplicate plane): ignore
            io = self._level_io(i, page)
            self._io.append(io)
            self.levels.append(
                Level(
                    width=io.width,
                    height=io.height,
                    downsample=level_downsample(w0, h0, io.width, io.height),
                    tile_width=io.seg_w if io.tiled else None,
                    tile_height=io.seg_h if io.tiled else None,
                )
            )

        if tif.is_svs:
            self.format = "aperio-svs"
        elif tif.is_ndpi:
            self.format = "hamamatsu-ndpi"
        elif tif.is_ome:
            self.format = "ome-tiff"
        elif len(self.levels) > 1:
            self.format = "pyramidal-tiff"
        else:
            self.format = "tiff"

        self.properties = self._read_properties(tif, series, pages[0])
        self.properties["tiff.ifd_count"] = len(chain.offsets)
        if ome_ignored:
            self.properties["ome_ignored"] = ome_ignored

    @staticmethod
    def _as_page(page):
        import tifffile

        if isinstance(page, tifffile.TiffFrame):
            return page.aspage()
        return page

    def _main_series(self, tif):
        candidates = []
        for i, s in enumerate(tif.series):
            if (s.name or "").strip().lower() in ASSOCIATED_SERIES:
                continue
            kf = s.keyframe
            if kf is None or getattr(kf, "imagewidth", 0) <= 0:
                continue
            candidates.append((kf.imagewidth * kf.imagelength, -i, s))
        if not candidates and len(tif.pages) == 0:
            raise CorruptSlideError(
                f"{str(self.path)!r}: no readable image directory (IFD) in this TIFF — its header "
                "points outside the file or at garbage; the file is damaged or truncated"
            )
        if not candidates:
            raise CorruptSlideError(
                f"{str(self.path)!r}: no image found in this TIFF (series: "
                f"{[s.name for s in tif.series]}); the file is damaged or holds only associated images"
            )
        self._series_index = -max(candidates, key=lambda c: c[:2])[1]
        return max(candidates, key=lambda c: c[:2])[2]

    def _level_io(self, level: int, page) -> _LevelIO:
        import tifffile

        where = f"{str(self.path)!r} level {level} (page {page.index})"
        width, height = int(page.imagewidth), int(page.imagelength)
        if width <= 0 or height <= 0:
            raise CorruptSlideError(f"{where}: declared size {width}x{height} px is empty")
        # compression and colour model
        comp = page.compression
        if comp != 1:
            try:
                tifffile.TIFF.DECOMPRESSORS[comp]
            except KeyError:
                name = getattr(comp, "name", str(comp))
                raise UnsupportedFormatError(
                    f"{where}: compression {name} ({int(comp)}) cannot be decoded here "
                    "(no tifffile/imagecodecs codec for it); "
                    f"{_CONVERT_HINT}, or open it with OpenSlide (pip install 'trtwsi[openslide]')"
                ) from None
        phot = int(page.photometric)
        if phot not in _PHOTOMETRIC_OK or (phot == 6 and comp not in _JPEG_COMPRESSIONS):
            raise UnsupportedFormatError(
                f"{where}: photometric interpretation {getattr(page.photometric, 'name', phot)} "
                f"({phot}) with compression {int(comp)} is not supported (RGB, YCbCr-JPEG, "
                f"grayscale and palette are); {_CONVERT_HINT}"
            )
        if page.is_subsampled and comp not in _JPEG_COMPRESSIONS:
            raise UnsupportedFormatError(
                f"{where}: chroma-subsampled YCbCr without JPEG compression is not supported; "
                f"{_CONVERT_HINT}"
            )
        try:
            page.init_decode()  # tifffile's decoder is built lazily and not thread-safely
        except Exception as e:
            raise UnsupportedFormatError(
                f"{where}: cannot decode this page ({e}); {_CONVERT_HINT}"
            ) from e
        if page.dtype is None:
            raise UnsupportedFormatError(
                f"{where}: sample format {page.sampleformat} with {page.bitspersample} bits per "
                f"sample is not supported; {_CONVERT_HINT}"
            )

        spp = int(page.samplesperpixel)
        planar = page.planarconfig == 2 and spp > 1
        tiled = bool(page.is_tiled)
        if tiled:
            seg_w, seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            seg_w, seg_h = width, min(int(page.rowsperstrip or height), height)
        if seg_w <= 0 or seg_h <= 0:
            raise CorruptSlideError(f"{where}: tile/strip size {seg_w}x{seg_h} is invalid")
        n_across, n_down = math.ceil(width / seg_w), math.ceil(height / seg_h)
        per_plane = n_across * n_down
        offsets = np.asarray(page.dataoffsets, dtype=np.int64).ravel()
        counts = np.asarray(page.databytecounts, dtype=np.int64).ravel()
        depth = int(page.imagedepth or 1)
        tiledepth = int(page.tiledepth or 1)
        volumetric = depth > 1 or tiledepth > 1
        expected = (
            per_plane * (spp if planar else 1) * (math.ceil(depth / tiledepth) if tiled else depth)
        )
        what = "tiles" if tiled else "strips"
        if len(offsets) != expected or len(counts) != expected:
            raise CorruptSlideError(
                f"{where}: declares {width}x{height} px in {seg_w}x{seg_h} {what}, i.e. {expected} "
                f"{what}, but has {len(offsets)} offsets and {len(counts)} byte counts — the "
                "header is corrupt (absurd dimensions or a damaged/truncated file)"
            )
        nonempty = (offsets > 0) & (counts > 0)
        if nonempty.any():
            # each bound first: a huge offset + count would wrap around in int64
            big = max(int(offsets[nonempty].max()), int(counts[nonempty].max()))
            end = big if big > self._filesize else int((offsets + counts)[nonempty].max())
            if end > self._filesize:
                raise CorruptSlideError(
                    f"{where}: tile data runs to byte {end} but the file has only "
                    f"{self._filesize} bytes — the file is truncated; copy or export it again"
                )
        itemsize = page.dtype.itemsize
        seg_bytes = seg_w * seg_h * (spp if not planar else 1) * max(itemsize, 1) * tiledepth
        max_count = int(counts[nonempty].max()) if nonempty.any() else 0
        raw_rows = (
            comp == 1
            and not tiled
            and not planar
            and not volumetric
            and page.bitspersample == itemsize * 8
            and page.fillorder == 1
            and page.predictor == 1
        )
        if raw_rows:
            need = seg_w * spp * itemsize
            for s in range(per_plane):
                rows = min(seg_h, height - s * seg_h)
                if nonempty[s] and counts[s] < rows * need:
                    raise CorruptSlideError(
                        f"{where}: uncompressed strip {s} holds {int(counts[s])} bytes but "
                        f"{rows} rows of {width} px need {rows * need} — the header is corrupt"
                    )
        elif seg_bytes > (1 << 28) and max_count and seg_bytes > ABSURD_RATIO * max_count:
            raise CorruptSlideError(
                f"{where}: declares {width}x{height} px ({seg_w}x{seg_h} per {what[:-1]}, "
                f"{seg_bytes} bytes decoded) stored in at most {max_count} bytes per {what[:-1]} — "
                "absurd header dimensions; the file is corrupt"
            )
        elif seg_w * seg_h > MAX_ARRAY_PIXELS:
            raise ImageTooLargeError(
                f"{where}: one {'compressed ' if comp != 1 else ''}{what[:-1]} of {seg_w}x{seg_h} "
                f"= {seg_w * seg_h} px would have to be decoded whole, over the limit of "
                f"{MAX_ARRAY_PIXELS} px (trtwsi.slide.array.MAX_ARRAY_PIXELS); {_CONVERT_HINT}"
            )
        elif seg_bytes > MAX_SEGMENT_BYTES:
            raise UnsupportedFormatError(
                f"{where}: one compressed {what[:-1]} decodes to {seg_bytes} bytes "
                f"({seg_w}x{seg_h} px); regions cannot be read without decoding it whole; "
                f"{_CONVERT_HINT}"
            )

        kind = "raw-rows" if raw_rows else "segments"
        if volumetric:
            kind = "fallback"
            total = depth * width * height * spp * itemsize
            if total > FALLBACK_MAX_BYTES:
                raise UnsupportedFormatError(
                    f"{where}: volumetric layout (depth {depth}, tile depth {tiledepth}) of "
                    f"{total} bytes is too large for the whole-page fallback; {_CONVERT_HINT}"
                )
        lut = None
        if phot == 3:
            cmap = page.colormap
            if cmap is None:
                raise CorruptSlideError(f"{where}: palette image without a ColorMap tag")
            cmap = np.asarray(cmap)
            if cmap.dtype == np.uint16:
                cmap = cmap >> 8
            lut = np.ascontiguousarray(cmap.T.astype(np.uint8))  # (N, 3)
        raw_dtype = None
        if raw_rows:
            raw_dtype = np.dtype(page.parent.byteorder + page.dtype.char)
        jpeg = None
        if (
            int(comp) == 7
            and page.bitspersample == 8
            and not planar
            and spp == 3
            and phot in (2, 6)
            and page.fillorder == 1
        ):
            from tifffile.tifffile import jpeg_decode_colorspace

            colorspace, outcolorspace = jpeg_decode_colorspace(
                page.photometric, page.planarconfig, page.extrasamples, page.is_jfif
            )
            jpeg = {
                "tables": page.jpegtables,
                "colorspace": colorspace,
                "outcolorspace": outcolorspace,
                "shape": (seg_h, seg_w),
            }
        # planar (separate) samples: read the planes that make RGB (or the gray plane)
        planes = tuple(range(3)) if planar and spp >= 3 else (0,)
        return _LevelIO(
            page=page,
            width=width,
            height=height,
            seg_w=seg_w,
            seg_h=seg_h,
            n_across=n_across,
            n_down=n_down,
            tiled=tiled,
            planes=planes,
            per_plane=per_plane,
            offsets=offsets,
            counts=counts,
            kind=kind,
            photometric=phot,
            lut=lut,
            raw_dtype=raw_dtype,
            samples=spp,
            jpeg=jpeg,
            jpeg_header=page.jpegheader if jpeg is not None else None,
        )

    def _read_properties(self, tif, series, page0) -> dict:
        props: dict = {}
        tags = page0.tags
        for name in ("ImageDescription", "Software", "DateTime", "Make", "Model", "Artist"):
            v = tags.valueof(name)
            if isinstance(v, bytes):
                v = v.decode("latin-1", "replace")
            if v:
                props[f"tiff.{name}"] = str(v)[:4096]
        props["tiff.Compression"] = getattr(page0.compression, "name", str(page0.compression))
        props["tiff.Photometric"] = getattr(page0.photometric, "name", str(page0.photometric))
        props["series"] = series.name or ""
        props["associated_images"] = [
            s.name for s in tif.series if (s.name or "").strip().lower() in ASSOCIATED_SERIES
        ]
        mpp_x = mpp_y = None
        mag = None
        if tif.is_svs:
            props["vendor"] = "aperio"
            from tifffile.tifffile import svs_description_metadata

            try:
                meta = svs_description_metadata(page0.description)
            except Exception:
                meta = {}
            for k, v in meta.items():
                props[f"aperio.{k}"] = v if isinstance(v, (int, float, str)) else str(v)
            mpp_x = _plausible_mpp(meta.get("MPP"), props)
            mpp_y = mpp_x
            mag = _positive(meta.get("AppMag"))
        elif tif.is_ndpi:
            props["vendor"] = "hamamatsu"
            for k, v in (page0.ndpi_tags or {}).items():
                if k in ("McuStarts", "McuStartsHighBytes"):
                    continue
                if isinstance(v, np.ndarray):
                    continue
                props[f"hamamatsu.{k}"] = v if isinstance(v, (int, float, str)) else str(v)
            mag = _positive(props.get("hamamatsu.Magnification"))
        elif tif.is_ome:
            props["vendor"] = "ome"
            mpp_x, mpp_y, mag = self._ome_metadata(tif, props)
            mpp_x = _plausible_mpp(mpp_x, props)
            mpp_y = _plausible_mpp(mpp_y, props) if mpp_x is not None else None
        if mpp_x is None:
            mpp_x, mpp_y = _resolution_mpp(page0)
        if mpp_x is not None:
            props["mpp_x"] = float(mpp_x)
            props["mpp_y"] = float(mpp_y if mpp_y is not None else mpp_x)
        if mag is not None:
            props["objective_power"] = float(mag)
        return props

    def _ome_metadata(self, tif, props: dict):
        """(mpp_x, mpp_y, magnification) of the chosen OME Image, from the OME-XML."""
        try:
            root = ET.fromstring(tif.ome_metadata)
        except Exception:
            return None, None, None
        images = [e for e in root.iter() if e.tag.endswith("}Image") or e.tag == "Image"]
        if not images:
            return None, None, None
        idx = self._series_index if self._series_index < len(images) else 0
        image = images[idx]
        props["ome.Image.Name"] = image.get("Name", "")
        pixels = next((e for e in image if e.tag.endswith("Pixels")), None)
        mpp_x = mpp_y = None
        if pixels is not None:
            mpp_x = _ome_length_um(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"))
            mpp_y = _ome_length_um(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"))
            for k in (
                "PhysicalSizeX",
                "PhysicalSizeXUnit",
                "PhysicalSizeY",
                "PhysicalSizeYUnit",
                "Type",
            ):
                if pixels.get(k) is not None:
                    props[f"ome.Pixels.{k}"] = pixels.get(k)
        mag = None
        for e in root.iter():
            if e.tag.endswith("}Objective") and e.get("NominalMagnification"):
                mag = _positive(e.get("NominalMagnification"))
                break
        return mpp_x, (mpp_y or mpp_x), mag

    # --- reading ---------------------------------------------------------------------------
    def _get_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.threads, thread_name_prefix="trtwsi-tiff"
                )
            return self._pool

    def _whole_jpeg_tiles(self, level: int) -> bool:
        """Tiled 8-bit 3-sample chunky JPEG (not NDPI restart-interval strips): tiles that are
        whole JPEG streams once the tables are spliced in."""
        if not 0 <= level < len(self._io):
            return False
        io = self._io[level]
        return (
            io.kind == "segments"
            and io.tiled
            and io.jpeg is not None
            and io.jpeg_header is None
            and io.planes == (0,)
        )

    def jpeg_level(self, level: int) -> bool:
        """True for the levels whose tiles nvJPEG may decode: whole YCbCr JPEG tiles. Not JPEG
        stored as R, G, B components (Aperio's ``colorspace=RGB``): nvJPEG applies the YCbCr
        transform to those (measured: 82 levels off on average), so they stay on the CPU."""
        return self._whole_jpeg_tiles(level) and self._io[level].jpeg["colorspace"] != 2

    def compressed_region(self, x: int, y: int, w: int, h: int, level: int = 0, *, only=None):
        """The JPEG tiles of a region (level-0 ``x, y`` and level-px ``w, h``, as
        :meth:`read_region`) as a :class:`~trtwsi.slide.jpeg_stream.CompressedRegion`, each
        tile a complete stream (``JPEGTables`` spliced in; ``components`` says ``"rgb"`` for
        stored R, G, B); None for levels of other kinds. Reads the tiles' bytes (one ``pread``
        per run of contiguous tiles); decodes nothing. ``only``: as :meth:`read_region`; a
        tile no part touches is not read and comes as None (sparse: decoded as fill)."""
        from trtwsi.slide.jpeg_stream import CompressedRegion, splice_tables

        x, y, w, h, level = self._check_region(x, y, w, h, level)
        if only is not None:
            only = region_parts(only)
        if self._closed:
            raise SlideError(f"{str(self.path)!r}: read from a closed slide (open it again)")
        if not self._whole_jpeg_tiles(level):
            return None
        io = self._io[level]
        lx, ly, x0, y0, x1, y1 = self._level_window(x, y, w, h, level)
        streams: list = []
        if x0 >= x1 or y0 >= y1:  # wholly outside the level: no tiles, all fill (valid is empty)
            c0 = r0 = rows = cols = 0
        else:
            c0, c1 = x0 // io.seg_w, (x1 - 1) // io.seg_w
            r0, r1 = y0 // io.seg_h, (y1 - 1) // io.seg_h
            rows, cols = r1 - r0 + 1, c1 - c0 + 1
            need = np.ones((rows, cols), bool)
            if only is not None:
                parts = level_parts(only, (lx, ly), (x0, y0, x1, y1))
                need = _needed(io, x0, y0, x1 - x0, y1 - y0, parts)
            tables = io.jpeg["tables"]
            for r, row in zip(range(r0, r1 + 1), need, strict=True):
                cs = [c for c, n in zip(range(c0, c1 + 1), row, strict=True) if n]
                got = iter(self._fetch(io, [r * io.n_across + c for c in cs]) if cs else [])
                for n in row:
                    data = next(got) if n else None
                    if data is not None and not isinstance(data, Exception):
                        try:
                            data = splice_tables(tables, data)
                        except ValueError as e:
                            data = e
                    streams.append(data)

        def cpu_read(rx: int, ry: int, rw: int, rh: int) -> np.ndarray:
            out = np.empty((rh, rw, 3), np.uint8)
            self._read_level(level, rx, ry, rw, rh, out)
            return out

        return CompressedRegion(
            level=level,
            shape=(h, w),
            tile=(io.seg_h, io.seg_w),
            rows=rows,
            cols=cols,
            origin=(c0 * io.seg_w - lx, r0 * io.seg_h - ly),
            valid=(x0 - lx, y0 - ly, x1 - lx, y1 - ly),
            streams=streams,
            components="rgb" if io.jpeg["colorspace"] == 2 else "ycbcr",
            fill=self.fill,
            at=(lx, ly),
            cpu_read=cpu_read,
        )

    def _read_level_parts(
        self, level: int, x: int, y: int, w: int, h: int, out: np.ndarray, parts: np.ndarray
    ) -> None:
        """:meth:`~trtwsi.slide.Slide._read_level_parts`: decode only the file tiles that a
        part touches (other pixels of ``out`` stay as they were)."""
        io = self._io[level]
        if io.kind != "segments":  # uncompressed rows and the fallback: the whole region
            self._read_level(level, x, y, w, h, out)
            return
        self._read_level(level, x, y, w, h, out, need=_needed(io, x, y, w, h, parts))

    def _read_level(
        self,
        level: int,
        x: int,
        y: int,
        w: int,
        h: int,
        out: np.ndarray,
        need: np.ndarray | None = None,
    ) -> None:
        """Fill ``out`` (uint8 ``(h, w, 3)`` view) with level pixels ``[y:y+h, x:x+w]``.

        Coordinates are in level ``level`` pixels and lie inside the level (Slide.read_region
        clips). Only the file tiles/strips overlapping the region are read and decoded. Work
        units are runs of adjacent tiles of one tile row (about ``CHUNKS_PER_THREAD`` per pool
        thread), each fetched with one ``pread`` when their bytes are contiguous in the file:
        fewer tasks and syscalls mean fewer GIL hand-offs between decodes. ``need``: bool
        ``(rows, cols)`` over the region's segments (file tiles or strips): decode only those.
        """
        if self._closed:
            raise SlideError(f"{str(self.path)!r}: read from a closed slide (open it again)")
        io = self._io[level]
        if io.kind == "fallback":
            self._read_fallback(level, io, x, y, w, h, out)
            return
        c0, c1 = x // io.seg_w, (x + w - 1) // io.seg_w
        r0, r1 = y // io.seg_h, (y + h - 1) // io.seg_h
        ncols, nrows = c1 - c0 + 1, r1 - r0 + 1
        if io.kind == "raw-rows":
            fn, per = self._read_rows, 1
        else:
            fn = self._read_tiles
            if self.threads == 1:
                per = ncols
            else:
                per = math.ceil(ncols * nrows / (self.threads * CHUNKS_PER_THREAD))
                per = max(1, min(ncols, per))
        if need is None:
            need = np.ones((nrows, ncols), bool)
        chunks = []  # runs of needed segments in each row, cut every ``per`` segments
        for r, row in zip(range(r0, r1 + 1), need, strict=True):
            cols = np.flatnonzero(row) + c0
            for run in np.split(cols, np.flatnonzero(np.diff(cols) != 1) + 1):
                for k in range(0, len(run), per):
                    chunks.append((r, range(int(run[k]), int(run[min(k + per, len(run)) - 1]) + 1)))
        if not chunks:
            return
        if len(chunks) == 1 or self.threads == 1:
            for r, cols in chunks:
                fn(level, io, r, cols, x, y, w, h, out)
            return
        pool = self._get_pool()
        futures = [pool.submit(fn, level, io, r, cols, x, y, w, h, out) for r, cols in chunks]
        first_exc = None
        for f in futures:  # wait for all, even after an error: none may write to out later
            exc = f.exception()
            if exc is not None and first_exc is None:
                first_exc = exc
        if first_exc is not None:
            raise first_exc

    def _pread_bytes(self, count: int, offset: int) -> bytes:
        if self._pread is not None:
            return self._pread(self._fd, count, offset)
        with self._seek_lock:  # pragma: no cover - platforms without os.pread
            os.lseek(self._fd, offset, os.SEEK_SET)
            return os.read(self._fd, count)

    def _fetch(self, io: _LevelIO, indices: list[int]) -> list:
        """Raw bytes of segments ``indices``: a memoryview each, None for sparse (empty)
        segments, or the OSError that prevented reading it. Segments stored (nearly)
        contiguously are read with one ``pread``."""
        offs = io.offsets[indices]
        cnts = io.counts[indices]
        present = (offs > 0) & (cnts > 0)
        result: list = [None] * len(indices)
        if not present.any():
            return result
        lo = int(offs[present].min())
        hi = int((offs + cnts)[present].max())
        total = int(cnts[present].sum())
        try:
            if len(indices) > 1 and hi - lo <= total + (total >> 2) + 65536:
                buf = memoryview(self._pread_bytes(hi - lo, lo))
                for i in np.flatnonzero(present):
                    a, b = int(offs[i]) - lo, int(offs[i] + cnts[i]) - lo
                    result[i] = (
                        buf[a:b] if b <= len(buf) else _short_read(b - a, len(buf) - a, lo + a)
                    )
            else:
                for i in np.flatnonzero(present):
                    off, cnt = int(offs[i]), int(cnts[i])
                    data = self._pread_bytes(cnt, off)
                    result[i] = (
                        memoryview(data) if len(data) == cnt else _short_read(cnt, len(data), off)
                    )
        except (OSError, MemoryError, OverflowError) as e:  # absurd count: a bad tile, not a crash
            for i in np.flatnonzero(present):
                result[i] = e
        return result

    def _read_tiles(self, level, io: _LevelIO, r, cols, x, y, w, h, out) -> None:
        """Decode segments (r, c) for c in ``cols`` and copy their overlap with the region
        (x, y, w, h) into ``out``; a segment that fails is reported and left at ``fill``."""
        seg0 = r * io.n_across
        fetched = [self._fetch(io, [p * io.per_plane + seg0 + c for c in cols]) for p in io.planes]
        ty = r * io.seg_h
        iy0, iy1 = max(ty, y), min(ty + io.seg_h, y + h, io.height)
        for k, c in enumerate(cols):
            tx = c * io.seg_w
            ix0, ix1 = max(tx, x), min(tx + io.seg_w, x + w, io.width)
            dst = out[iy0 - y : iy1 - y, ix0 - x : ix1 - x]
            try:
                planes = []
                for p, datas in zip(io.planes, fetched, strict=True):
                    data = datas[k]
                    if isinstance(data, Exception):
                        raise data
                    if data is None:  # sparse tile
                        break
                    a = self._decode_jpeg(io, data) if io.jpeg is not None else None
                    if a is None:  # general path (and the one that reports JPEG errors)
                        index = p * io.per_plane + seg0 + c
                        decoded, _, _ = io.page.decode(
                            data,
                            index,
                            jpegtables=io.page.jpegtables,
                            jpegheader=io.page.jpegheader,
                        )
                        if decoded is None:
                            break
                        a = decoded[0]  # (rows, cols, samples)
                    if a.shape[0] < iy1 - ty or a.shape[1] < ix1 - tx:
                        raise ValueError(
                            f"decoded {'tile' if io.tiled else 'strip'} has shape {a.shape[:2]}, "
                            f"needs at least {(iy1 - ty, ix1 - tx)}"
                        )
                    planes.append(a[iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx])
                if len(planes) < len(io.planes):
                    dst[...] = self.fill
                    continue
                src = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)
                self._convert_into(io, src, dst)
            except Exception as e:
                self._failed(level, io, r, c, e)
                dst[...] = self.fill

    def _decode_jpeg(self, io: _LevelIO, data) -> np.ndarray | None:
        """8-bit 3-sample JPEG tile → ``(seg_h, seg_w, 3)`` uint8, decoded by libjpeg-turbo
        straight into this thread's reusable tile buffer: one C call (GIL released), no
        allocation, none of tifffile's per-call Python. None when it fails: the caller then
        decodes through tifffile, which handles odd tiles and raises the error to report."""
        import imagecodecs

        bufs = getattr(self._tls, "bufs", None)
        if bufs is None:
            bufs = self._tls.bufs = {}
        key = (io.seg_h, io.seg_w)
        buf = bufs.get(key)
        if buf is None:
            buf = bufs[key] = np.empty((io.seg_h, io.seg_w, 3), np.uint8)
        if io.jpeg_header is not None:
            data = b"".join((io.jpeg_header, data, b"\xff\xd9"))
        try:
            return imagecodecs.jpeg8_decode(data, out=buf, **io.jpeg)
        except Exception:
            return None

    def _read_rows(self, level, io: _LevelIO, r, cols, x, y, w, h, out) -> None:
        """Uncompressed strip ``r``: read just the touched rows (narrow regions: row by row)."""
        ty = r * io.seg_h
        iy0, iy1 = max(ty, y), min(ty + io.seg_h, y + h, io.height)
        dst = out[iy0 - y : iy1 - y]
        offset, count = int(io.offsets[r]), int(io.counts[r])
        try:
            if offset <= 0 or count <= 0:
                dst[...] = self.fill
                return
            px = io.samples * io.raw_dtype.itemsize
            rowbytes = io.width * px
            nrows = iy1 - iy0
            start = offset + (iy0 - ty) * rowbytes
            if w * px * 4 >= rowbytes or nrows == 1:
                if nrows == 1:
                    start += x * px
                    nbytes = w * px
                    data = self._pread_bytes(nbytes, start)
                    if len(data) != nbytes:
                        raise OSError(f"short read: {len(data)} of {nbytes} bytes at {start}")
                    a = np.frombuffer(data, io.raw_dtype).reshape(1, w, io.samples)
                else:
                    nbytes = nrows * rowbytes
                    data = self._pread_bytes(nbytes, start)
                    if len(data) != nbytes:
                        raise OSError(f"short read: {len(data)} of {nbytes} bytes at {start}")
                    a = np.frombuffer(data, io.raw_dtype).reshape(nrows, io.width, io.samples)
                    a = a[:, x : x + w]
                self._convert_into(io, a, dst)
            else:
                buf = np.empty((nrows, w, io.samples), io.raw_dtype)
                flat = buf.reshape(nrows, -1).view(np.uint8)
                nbytes = w * px
                for i in range(nrows):
                    pos = start + i * rowbytes + x * px
                    data = self._pread_bytes(nbytes, pos)
                    if len(data) != nbytes:
                        raise OSError(f"short read: {len(data)} of {nbytes} bytes at {pos}")
                    flat[i] = np.frombuffer(data, np.uint8)
                self._convert_into(io, buf, dst)
        except Exception as e:
            self._failed(level, io, r, 0, e)
            dst[...] = self.fill

    def _read_fallback(self, level, io: _LevelIO, x, y, w, h, out) -> None:
        """Whole-page decode by tifffile (layouts the segment path does not handle), cached."""
        try:
            with self._fallback_lock:
                img = self._fallback_cache.get(level)
                if img is None:
                    a = io.page.asarray(squeeze=False, maxworkers=self.threads)
                    # (separate samples, depth, length, width, contig samples) -> first plane
                    img = np.moveaxis(a[:, 0, :, :, 0], 0, -1) if a.shape[0] > 1 else a[0, 0]
                    self._fallback_cache = {level: img}  # keep one page
            self._convert_into(io, img[y : y + h, x : x + w], out)
        except Exception as e:
            self._failed(level, io, 0, 0, e, region=(0, 0, io.width, io.height))
            out[...] = self.fill

    def _convert_into(self, io: _LevelIO, src: np.ndarray, dst: np.ndarray) -> None:
        """Samples ``src`` ((h, w, C), file dtype) → RGB uint8 written into ``dst`` ((h, w, 3))."""
        if not src.dtype.isnative:
            src = src.astype(src.dtype.newbyteorder("="))
        if io.photometric == 3:  # palette
            idx = src[..., 0]
            dst[...] = io.lut[np.minimum(idx, len(io.lut) - 1)]
            return
        if io.photometric == 0:  # min-is-white: invert
            if src.dtype == np.bool_:
                src = ~src
            elif np.issubdtype(src.dtype, np.integer):
                src = np.iinfo(src.dtype).max - src
            else:
                src = 1.0 - src
        if src.dtype == np.uint8 and src.ndim == 3 and src.shape[2] >= 3:
            dst[...] = src[..., :3]
        elif src.dtype == np.uint8 and src.ndim == 3 and src.shape[2] in (1, 2):
            dst[...] = src[..., :1]
        else:
            dst[...] = to_rgb_uint8(src)

    def _failed(self, level, io: _LevelIO, r, c, cause, region=None) -> None:
        if region is None:
            tx, ty = c * io.seg_w, r * io.seg_h
            region = (tx, ty, min(io.seg_w, io.width - tx), min(io.seg_h, io.height - ty))
        what = f"tile (row {r}, col {c})" if io.tiled else f"strip {r}"
        err = TileReadError(
            f"{str(self.path)!r}: level {level} {what} at level px x={region[0]} y={region[1]} "
            f"w={region[2]} h={region[3]} could not be read ({type(cause).__name__}: {cause}); "
            f"its pixels are filled with {self.fill}. The file is damaged there: re-export or "
            "re-scan the slide if this area matters",
            level=level,
            tile=(r, c),
            region=region,
            cause=cause,
        )
        self._tile_failed(err)

    # --- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Shut the decode pool down and close the file descriptor and tifffile handle."""
        self._closed = True
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is not None:
            pool.shutdown(wait=True)
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        tif, self._tif = getattr(self, "_tif", None), None
        if tif is not None:
            with contextlib.suppress(Exception):
                tif.close()
        self._fallback_cache = {}

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


@contextlib.contextmanager
def _corrupt_on_error(path, filesize: int):
    """Turn any non-trtwsi exception raised while parsing a TIFF into CorruptSlideError
    (MemoryError included: absurd declared sizes)."""
    try:
        yield
    except SlideError:
        raise
    except (Exception, MemoryError) as e:
        raise CorruptSlideError(
            f"{str(path)!r}: the TIFF structure cannot be parsed ({type(e).__name__}: "
            f"{str(e)[:300]}); the file ({filesize} bytes) is truncated or damaged — copy or "
            "export it again"
        ) from e


def _short_read(want: int, got: int, offset: int) -> OSError:
    return OSError(f"short read: {max(got, 0)} of {want} bytes at offset {offset} (file truncated)")
