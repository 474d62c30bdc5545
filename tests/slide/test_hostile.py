"""Hostile and broken slides: IFD cycles, FIFOs, absurd metadata, zero-size IFDs, level scale.

Every file is written by a real writer (tifffile, OpenCV) and then damaged byte by byte where a
case needs it; nothing is mocked.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.slide.conftest import texture
from trtwsi.errors import (
    CorruptSlideError,
    IFDChainError,
    InvalidDimensionsError,
    NotARegularFileError,
    SlideNotFoundError,
    UnsupportedFormatError,
)
from trtwsi.slide import open_slide
from trtwsi.slide.files import check_regular_file
from trtwsi.slide.tiff_ifd import walk_ifd_chain

REPO = Path(__file__).resolve().parents[2]


def _pages(path: Path, n: int, *, bigtiff=False, byteorder="<", size=16) -> Path:
    """``n`` small RGB pages written by tifffile (each a reduced copy, so levels are distinct)."""
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder=byteorder) as tw:
        for i in range(n):
            tw.write(texture(size, size, seed=i), photometric="rgb", metadata=None, tile=(16, 16))
    return path


def _ifd_offsets(path: Path) -> tuple[list[int], str, bool]:
    with tifffile.TiffFile(path) as t:
        offs = [p.offset for p in t.pages]
        return offs, t.byteorder, t.is_bigtiff


def _set_next(path: Path, ifd: int, target: int) -> None:
    """Point the next-IFD pointer of the IFD at byte ``ifd`` to ``target`` (in place)."""
    b = bytearray(path.read_bytes())
    bo = "<" if b[:2] == b"II" else ">"
    big = struct.unpack(bo + "H", b[2:4])[0] == 43
    if big:
        n = struct.unpack_from(bo + "Q", b, ifd)[0]
        struct.pack_into(bo + "Q", b, ifd + 8 + 20 * n, target)
    else:
        n = struct.unpack_from(bo + "H", b, ifd)[0]
        struct.pack_into(bo + "I", b, ifd + 2 + 12 * n, target)
    path.write_bytes(bytes(b))


def _open_in_child(path: Path, timeout: float = 60) -> tuple[str, float]:
    """open_slide(path) in a fresh interpreter; (outcome, seconds). A hang fails the test."""
    code = (
        "import sys\nfrom trtwsi.slide import open_slide\n"
        "try:\n    s = open_slide(sys.argv[1]); print('OK', s.levels)\n"
        "except Exception as e:\n    print('ERR', type(e).__name__, e)\n"
    )
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"open_slide({path.name}) hung for more than {timeout} s")
    return r.stdout.strip() or r.stderr[-2000:], time.monotonic() - t0


# --- IFD chain ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bigtiff", "byteorder"), [(False, "<"), (False, ">"), (True, "<"), (True, ">")]
)
def test_long_ifd_cycle_raises_promptly(tmp_path, bigtiff, byteorder):
    """150 IFDs whose last points back to the first: tifffile only checks for cycles at page 100,
    so it walked forever; the bounded walk raises IFDChainError in well under a second."""
    path = _pages(tmp_path / "cycle.tif", 150, bigtiff=bigtiff, byteorder=byteorder, size=8)
    offs, _, _ = _ifd_offsets(path)
    _set_next(path, offs[-1], offs[0])
    t0 = time.monotonic()
    with pytest.raises(IFDChainError, match="cycle"):
        walk_ifd_chain(path)
    assert time.monotonic() - t0 < 2
    out, secs = _open_in_child(path)
    assert out.startswith("ERR IFDChainError"), out
    assert secs < 30


@pytest.mark.parametrize("where", ["self", "middle"])
def test_short_ifd_cycles(tmp_path, where):
    path = _pages(tmp_path / "c.tif", 3)
    offs, _, _ = _ifd_offsets(path)
    if where == "self":
        _set_next(path, offs[0], offs[0])
    else:
        _set_next(path, offs[2], offs[1])
    with pytest.raises(IFDChainError):
        open_slide(path)
    assert issubclass(IFDChainError, CorruptSlideError)


def test_chain_too_long(tmp_path):
    path = _pages(tmp_path / "long.tif", 20, size=8)
    assert len(walk_ifd_chain(path).offsets) == 20
    with pytest.raises(IFDChainError, match="more than 10"):
        walk_ifd_chain(path, max_ifds=10)


def test_ifd_chain_of_real_slides(svs_file, ndpi_file, ome_file):
    assert len(walk_ifd_chain(svs_file).offsets) == 5
    chain = walk_ifd_chain(ndpi_file)
    assert chain.ndpi and len(chain.offsets) == 3
    assert walk_ifd_chain(ome_file).width0 == 1500


def test_ifd0_width_zero_is_not_replaced_by_next_level(tmp_path):
    """IFD 0 declaring width 0 used to be skipped, and the next (reduced) page opened as the slide."""
    path = _pages(tmp_path / "w0.tif", 2, size=32)
    with tifffile.TiffFile(path) as t:
        where = t.pages[0].tags["ImageWidth"].valueoffset
        fmt = t.byteorder + {3: "H", 4: "I"}[int(t.pages[0].tags["ImageWidth"].dtype)]
    b = bytearray(path.read_bytes())
    struct.pack_into(fmt, b, where, 0)
    path.write_bytes(bytes(b))
    with pytest.raises(InvalidDimensionsError, match="0x32"):
        open_slide(path)


# --- non-regular files ----------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("name", ["pipe.svs", "pipe.png", "pipe.mrxs"])
def test_fifo_refused_promptly(tmp_path, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    result = {}

    def run():
        try:
            open_slide(fifo)
        except Exception as e:
            result["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(5)
    if t.is_alive():  # unblock the reader so the test process can exit
        with open(fifo, "wb"):
            pass
        pytest.fail("open_slide blocked on a FIFO")
    assert time.monotonic() - t0 < 2
    assert isinstance(result.get("e"), NotARegularFileError), result
    assert "FIFO" in str(result["e"])


def test_check_regular_file(tmp_path):
    f = tmp_path / "a.tif"
    f.write_bytes(b"x")
    assert check_regular_file(f) == f
    with pytest.raises(NotARegularFileError, match="directory"):
        check_regular_file(tmp_path)
    with pytest.raises(SlideNotFoundError):
        check_regular_file(tmp_path / "missing.tif")
    if os.path.exists("/dev/null"):
        with pytest.raises(NotARegularFileError, match="device"):
            open_slide("/dev/null")
    assert issubclass(NotARegularFileError, UnsupportedFormatError)


# --- absurd metadata ------------------------------------------------------------------------
def test_svs_absurd_mpp_is_ignored(tmp_path):
    """MPP = 1e308 (finite, positive) overflowed in tissue detection; now it is 'unknown'."""
    from trtwsi.plan.tissue import find_sections

    path = tmp_path / "absurd.svs"
    img = np.full((512, 768, 3), 240, np.uint8)
    img[100:400, 150:600] = texture(300, 450) // 2
    desc = (
        "Aperio Image Library v12.0.15\r\n768x512 [0,0 768x512] (256x256) JPEG/RGB Q=90"
        "|AppMag = 20|MPP = 1e308"
    )
    tifffile.imwrite(
        path, img, tile=(256, 256), compression="jpeg", description=desc, metadata=None
    )
    s = open_slide(path)
    assert s.format == "aperio-svs"
    assert s.mpp is None
    assert float(s.properties["mpp_ignored"]) == 1e308
    sections = find_sections(s)
    assert len(sections) == 1


def test_ome_absurd_plane_count(tmp_path):
    """OME-XML with SizeT=10^9 made tifffile allocate a 10^9-slot list (MemoryError)."""
    img = texture(64, 64)
    ok = tmp_path / "ok.ome.tif"
    tifffile.imwrite(ok, img, ome=True, photometric="rgb", tile=(32, 32))
    with tifffile.TiffFile(ok) as t:
        xml = t.ome_metadata
    assert 'SizeT="1"' in xml
    bad = tmp_path / "bigT.ome.tif"
    tifffile.imwrite(
        bad,
        img,
        description=xml.replace('SizeT="1"', 'SizeT="1000000000"'),
        metadata=None,
        photometric="rgb",
        tile=(32, 32),
    )
    s = open_slide(bad)
    assert s.dimensions == (64, 64)
    assert "SizeT=1000000000" in s.properties["ome_ignored"]
    np.testing.assert_array_equal(s.read_region(0, 0, 64, 64), img)


# --- level scale ----------------------------------------------------------------------------
def _odd_pyramid(path: Path) -> Path:
    sizes = [(1001, 777), (333, 259), (111, 86)]  # ratios differ between width and height
    base = texture(777, 1001)
    import cv2

    with tifffile.TiffWriter(path) as tw:
        for i, (w, h) in enumerate(sizes):
            img = base if i == 0 else cv2.resize(base, (w, h), interpolation=cv2.INTER_AREA)
            tw.write(
                img,
                tile=(64, 64),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if i else 0,
                metadata=None,
            )
    return path


def test_level_downsample_is_mean_of_width_and_height_ratios(tmp_path):
    s = open_slide(_odd_pyramid(tmp_path / "odd.tif"))
    assert [(lv.width, lv.height) for lv in s.levels] == [(1001, 777), (333, 259), (111, 86)]
    want = [1.0, (1001 / 333 + 777 / 259) / 2, (1001 / 111 + 777 / 86) / 2]
    assert [lv.downsample for lv in s.levels] == pytest.approx(want, rel=1e-12)


def test_level_downsample_matches_openslide(tmp_path):
    openslide = pytest.importorskip("openslide")
    path = _odd_pyramid(tmp_path / "odd.tif")
    ours = [lv.downsample for lv in open_slide(path).levels]
    with openslide.OpenSlide(str(path)) as o:
        assert o.level_dimensions == ((1001, 777), (333, 259), (111, 86))
        assert ours == pytest.approx(list(o.level_downsamples), rel=1e-9)


# --- memory: declared sizes checked from headers before decoding ----------------------------
def _jpeg_declaring(path: Path, w: int, h: int) -> Path:
    """A real 16x16 OpenCV JPEG whose SOF is patched to declare ``w`` x ``h`` (~630 bytes)."""
    import cv2

    b = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes())
    i = 2
    while b[i + 1] not in (0xC0, 0xC2):
        i += 2 + struct.unpack(">H", b[i + 2 : i + 4])[0]
    struct.pack_into(">HH", b, i + 5, h, w)
    path.write_bytes(bytes(b))
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """libvips: a real 25000x25000 RGB PNG (black; ~18 MB at compression 1)."""
    import pyvips

    path = tmp_path_factory.mktemp("huge") / "huge.png"
    pyvips.Image.black(25000, 25000, bands=3).pngsave(str(path), compression=1)
    return path


def _strip_tiff_declaring(path: Path, side: int) -> Path:
    """tifffile: a 4096^2 deflate TIFF in one strip, patched to declare ``side``^2 in one strip."""
    from tests.slide.conftest import patch_tag

    tifffile.imwrite(
        path, np.zeros((4096, 4096, 3), np.uint8), rowsperstrip=4096, compression="zlib"
    )
    for tag in ("ImageWidth", "ImageLength", "RowsPerStrip"):
        patch_tag(path, tag, side)
    return path


def test_huge_declared_images_refused_from_header(tmp_path, huge_png):
    from trtwsi.errors import ImageTooLargeError

    jpg = _jpeg_declaring(tmp_path / "huge.jpg", 30000, 30000)
    assert jpg.stat().st_size < 1000
    with pytest.raises(ImageTooLargeError, match="30000x30000"):
        open_slide(jpg)
    with pytest.raises(ImageTooLargeError, match="25000x25000"):
        open_slide(huge_png)
    with pytest.raises(ImageTooLargeError, match="17000x17000"):
        open_slide(_strip_tiff_declaring(tmp_path / "strip.tif", 17000))


_RLIMIT_CHILD = """
import resource, sys
import cv2, numpy
from trtwsi.slide import open_slide
import trtwsi.slide.tiff
def vm_kib():
    for line in open('/proc/self/status'):
        if line.startswith('VmSize:'):
            return int(line.split()[1])
limit = vm_kib() * 1024 + 384 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in sys.argv[1:]:
    try:
        open_slide(path)
        print('OK', path)
    except Exception as e:
        print('ERR', type(e).__name__, path)
"""


def test_huge_declared_images_under_address_space_limit(tmp_path, huge_png):
    """In a child capped at baseline + 384 MiB of address space (RLIMIT_AS), every case ends in a
    typed ImageTooLargeError; before the header checks, OpenCV allocated 2.5 GiB / 1.7 GiB."""
    paths = [
        _jpeg_declaring(tmp_path / "huge.jpg", 30000, 30000),
        huge_png,
        _strip_tiff_declaring(tmp_path / "strip.tif", 17000),
    ]
    r = subprocess.run(
        [sys.executable, "-c", _RLIMIT_CHILD, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    lines = r.stdout.split("\n")
    assert r.returncode == 0, r.stderr[-3000:]
    for p in paths:
        assert f"ERR ImageTooLargeError {p}" in lines, r.stdout + r.stderr[-2000:]


# --- truncated ordinary images --------------------------------------------------------------
@pytest.mark.parametrize(("suffix", "keep"), [(".jpg", 0.02), (".jpg", 0.9), (".png", 0.5)])
def test_truncated_images_raise(tmp_path, suffix, keep):
    import cv2

    from trtwsi.errors import TruncatedImageError

    img = texture(600, 400)
    full = tmp_path / f"full{suffix}"
    assert cv2.imwrite(str(full), img)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TruncatedImageError, match="truncated"):
        open_slide(cut)
    assert open_slide(full).dimensions == (400, 600)  # the whole file still opens


def test_jpeg_with_trailing_bytes_still_opens(tmp_path):
    import cv2

    p = tmp_path / "trail.jpg"
    assert cv2.imwrite(str(p), texture(64, 64))
    p.write_bytes(p.read_bytes() + b"\x00" * 100)
    assert open_slide(p).dimensions == (64, 64)


def test_images_over_opencv_limit_are_typed(tmp_path):
    """Over 2**30 px OpenCV raised an untyped cv2.error; the header check now refuses first."""
    import cv2

    from trtwsi.errors import ImageTooLargeError

    jpg = _jpeg_declaring(tmp_path / "max.jpg", 65535, 65535)
    with pytest.raises(ImageTooLargeError, match="65535x65535"):
        open_slide(jpg)
    b = bytearray(cv2.imencode(".bmp", np.zeros((4, 4, 3), np.uint8))[1].tobytes())
    struct.pack_into("<ii", b, 18, 40000, 40000)  # BITMAPINFOHEADER width, height
    bmp = tmp_path / "huge.bmp"
    bmp.write_bytes(bytes(b))
    with pytest.raises(ImageTooLargeError, match="40000x40000"):
        open_slide(bmp)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_refused_by_readers_directly(tmp_path):
    from trtwsi.slide import ArraySlide
    from trtwsi.slide.tiff import TiffSlide

    fifo = tmp_path / "p.tif"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFileError):
        TiffSlide(fifo)
    with pytest.raises(NotARegularFileError):
        ArraySlide.from_file(fifo)


def test_huge_tile_byte_count_does_not_wrap(tmp_path):
    """Offset + a 2**63-ish byte count wrapped around in int64 and passed the end-of-file check;
    the read then asked pread for exabytes (MemoryError). Found by the fuzz test (NDPI splice)."""
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, texture(32, 32), tile=(32, 32), bigtiff=True, photometric="rgb")
    with tifffile.TiffFile(path) as t:
        entry = t.pages[0].tags["TileByteCounts"].offset  # one tile: one inline value
    b = bytearray(path.read_bytes())
    struct.pack_into("<HQQ", b, entry + 2, 16, 1, (1 << 63) - 1)  # LONG8, count 1, value
    path.write_bytes(bytes(b))
    with pytest.raises(CorruptSlideError, match="truncated"):
        open_slide(path)


def test_many_size_changes_refused_before_tifffile(tmp_path):
    """tifffile's series detection is quadratic in the number of series (1000 pages of distinct
    sizes: 18 s, 4000: 110 s); the walk refuses more than MAX_SIZE_CHANGES size changes."""
    from trtwsi.slide.tiff_ifd import MAX_SIZE_CHANGES

    path = tmp_path / "shapes.tif"
    with tifffile.TiffWriter(path) as tw:
        for i in range(MAX_SIZE_CHANGES + 20):
            tw.write(
                np.zeros((8 + i % 50, 8 + i // 50, 3), np.uint8), photometric="rgb", metadata=None
            )
    t0 = time.monotonic()
    with pytest.raises(IFDChainError, match="size changes"):
        open_slide(path)
    assert time.monotonic() - t0 < 2


def test_many_tagless_ifds_refused_before_tifffile(tmp_path):
    """A real tifffile page followed by 2000 one-tag IFDs (36 KB): tifffile took ~1 s per 2000
    and 18 s per 8000 of them; the walk stops after MAX_BAD_IFDS."""
    path = _pages(tmp_path / "bad.tif", 1)
    b = bytearray(path.read_bytes())
    off = struct.unpack_from("<I", b, 4)[0]
    n = struct.unpack_from("<H", b, off)[0]
    struct.pack_into("<I", b, off + 2 + 12 * n, len(b))
    for i in range(2000):
        o = len(b)
        b += struct.pack("<HHHII", 1, 256, 4, 1, 16)  # only ImageWidth = 16
        b += struct.pack("<I", o + 18 if i < 1999 else 0)
    path.write_bytes(bytes(b))
    t0 = time.monotonic()
    with pytest.raises(IFDChainError, match="without image size"):
        open_slide(path)
    assert time.monotonic() - t0 < 2


def test_thousands_of_uniform_pages_still_open(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3000, 16, 16, 3), np.uint8), photometric="rgb", metadata=None)
    s = open_slide(path)
    assert s.dimensions == (16, 16) and s.properties["tiff.ifd_count"] == 3000


def test_svs_level_downsample_matches_openslide(tmp_path):
    openslide = pytest.importorskip("openslide")
    import cv2

    base = texture(777, 1001)
    head = "Aperio Image Library v12.0.15\r\n"
    path = tmp_path / "odd.svs"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            base,
            tile=(64, 64),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "1001x777 [0,0 1001x777] (64x64) JPEG/RGB Q=70|MPP = 0.5",
        )
        tw.write(
            cv2.resize(base, (120, 93)),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "1001x777 -> 120x93",
        )
        tw.write(
            cv2.resize(base, (333, 259), interpolation=cv2.INTER_AREA),
            tile=(64, 64),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "333x259",
        )
    s = open_slide(path)
    assert s.format == "aperio-svs"
    with openslide.OpenSlide(str(path)) as o:
        assert o.level_dimensions == ((1001, 777), (333, 259))
        assert [lv.downsample for lv in s.levels] == pytest.approx(
            list(o.level_downsamples), rel=1e-9
        )
