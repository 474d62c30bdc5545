"""Small test slides written by real writers (tifffile, libvips, OpenCV, a hand-made NDPI).

Every file is written once per session under pytest's tmp_path_factory. Level-0 size 1500×1000
is deliberately not a multiple of the 256-px tiles, so the right/bottom file tiles are partial.

Helpers importable by the tests (``from tests.slide.conftest import ...``): :func:`texture`,
:func:`downsample`, :func:`patch_tag`, :func:`segment_location`, :func:`write_ndpi`.
"""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

W, H = 1500, 1000  # level-0 size of the test slides
MPP = 0.25


def texture(h: int, w: int, seed: int = 0, noise: float = 3.0) -> np.ndarray:
    """RGB uint8 ``(h, w, 3)``: smooth sinusoids (JPEG-friendly) + a little Gaussian noise, so that
    every tile differs and a shifted read cannot pass for a correct one."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            128 + 100 * np.sin(xx / 37.0 + yy / 53.0 + seed),
            128 + 100 * np.cos(xx / 23.0 - yy / 91.0),
            128 + 90 * np.sin(yy / 17.0 + xx / 211.0),
        ],
        axis=-1,
    )
    img += rng.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Area-averaged reduction by an integer factor (floor of the size)."""
    h, w = img.shape[:2]
    return cv2.resize(img, (w // factor, h // factor), interpolation=cv2.INTER_AREA)


def patch_tag(path: Path, name: str, value: int, page: int = 0) -> None:
    """Overwrite the (inline, scalar) value of tag ``name`` of page ``page`` in place."""
    with tifffile.TiffFile(path) as t:
        tag = t.pages[page].tags[name]
        fmt = t.byteorder + {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        where = tag.valueoffset
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(struct.pack(fmt, value))


def segment_location(path: Path, index: int, page: int = 0) -> tuple[int, int]:
    """(file offset, byte count) of tile/strip ``index`` of page ``page``."""
    with tifffile.TiffFile(path) as t:
        p = t.pages[page]
        return int(p.dataoffsets[index]), int(p.databytecounts[index])


def set_segment_bytecount(path: Path, index: int, count: int, page: int = 0) -> None:
    """Rewrite entry ``index`` of the TileByteCounts/StripByteCounts array (out-of-line)."""
    with tifffile.TiffFile(path) as t:
        p = t.pages[page]
        tag = p.tags.get("TileByteCounts") or p.tags["StripByteCounts"]
        fmt = t.byteorder + {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        where = tag.valueoffset + index * struct.calcsize(fmt)
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(struct.pack(fmt, count))


# --- a minimal Hamamatsu NDPI writer ---------------------------------------------------------
def jpeg_with_restarts(
    rgb: np.ndarray, interval: int, quality: int = 90
) -> tuple[bytes, list[int]]:
    """Baseline 4:4:4 JPEG with a restart marker every ``interval`` MCUs (as NDPI scanners write),
    and the byte offsets of every restart interval (NDPI McuStarts)."""
    ok, buf = cv2.imencode(
        ".jpg",
        cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
        [
            cv2.IMWRITE_JPEG_QUALITY,
            quality,
            cv2.IMWRITE_JPEG_RST_INTERVAL,
            interval,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ],
    )
    assert ok
    b = buf.tobytes()
    i = 2
    while True:
        marker, length = struct.unpack(">HH", b[i : i + 4])
        if marker == 0xFFDA:
            start = i + 2 + length
            break
        i += 2 + length
    starts, j = [start], start
    while True:
        j = b.find(b"\xff", j)
        m = b[j + 1]
        if 0xD0 <= m <= 0xD7:
            starts.append(j + 2)
        if m == 0xD9:
            break
        j += 2
    return b, starts


def write_ndpi(path: Path, pages: list[dict]) -> None:
    """Write an NDPI file: classic little-endian TIFF whose IFDs carry NDPI's 64-bit extensions
    (8-byte first-IFD offset, 4 high bytes per tag, 8-byte next-IFD offset), one JPEG strip per
    page. ``pages``: dicts with ``jpeg`` (bytes), ``width``, ``height``, ``mcustarts`` (list or
    None), ``mag`` (objective magnification; -1 = macro) and ``xres`` (pixels per centimeter)."""
    out = bytearray(b"II*\x00" + b"\x00" * 8)
    pending: list[int] | None = None
    fmt = {3: "H", 4: "I", 9: "i", 11: "f"}
    for pg in pages:
        data_off = len(out)
        out += pg["jpeg"]
        xres = (round(pg["xres"] * 1000), 1000)
        tags = [
            (256, 4, [pg["width"]]),
            (257, 4, [pg["height"]]),
            (258, 3, [8, 8, 8]),
            (259, 3, [7]),
            (262, 3, [6]),
            (271, 2, b"Hamamatsu\x00"),
            (272, 2, b"C13210\x00"),
            (273, 4, [data_off]),
            (277, 3, [3]),
            (278, 4, [pg["height"]]),
            (279, 4, [len(pg["jpeg"])]),
            (282, 5, [xres]),
            (283, 5, [xres]),
            (296, 3, [3]),  # centimeter
            (305, 2, b"NDP.scan 3.2\x00"),
            (65420, 4, [1]),
            (65421, 11, [pg["mag"]]),
            (65422, 9, [0]),
            (65423, 9, [0]),
            (65424, 9, [0]),
        ]
        if pg.get("mcustarts") is not None:
            tags.append((65426, 4, list(pg["mcustarts"])))
        tags.sort()
        entries = []
        for code, typ, val in tags:
            if typ == 2:
                raw = val
            elif typ == 5:
                raw = b"".join(struct.pack("<II", *v) for v in val)
            else:
                raw = struct.pack(f"<{len(val)}{fmt[typ]}", *val)
            count = len(val)
            if len(raw) <= 4:
                entries.append(struct.pack("<HHI", code, typ, count) + raw.ljust(4, b"\x00"))
            else:
                out += b"\x00" * (len(out) % 2)
                entries.append(struct.pack("<HHII", code, typ, count, len(out)))
                out += raw
        out += b"\x00" * (len(out) % 2)
        ifd = len(out)
        if pending is None:
            struct.pack_into("<Q", out, 4, ifd)
        else:
            for p in pending:
                struct.pack_into("<Q", out, p, ifd)
        out += struct.pack("<H", len(entries)) + b"".join(entries)
        p1 = len(out)
        out += b"\x00" * 8  # next IFD (libtiff reads its low 4 bytes)
        out += b"\x00" * (4 * len(entries))  # high 32 bits of every tag value/offset
        p2 = len(out)
        out += b"\x00" * 8  # next IFD where tifffile reads it for NDPI
        pending = [p1, p2]
    Path(path).write_bytes(bytes(out))


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def src() -> np.ndarray:
    """Level-0 source pixels, RGB uint8 (1000, 1500, 3)."""
    return texture(H, W)


@pytest.fixture(scope="session")
def src_levels(src) -> list[np.ndarray]:
    """[level 0, /2, /4] sources (exactly what the lossless files store)."""
    return [src, downsample(src, 2), downsample(src, 4)]


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


def _tifffile_pyramid(
    path, levels, *, compression, subifds, resolution_mpp=None, compressionargs=None, **kw
):
    res = {}
    if resolution_mpp is not None:
        res = {
            "resolution": (1e4 / resolution_mpp, 1e4 / resolution_mpp),
            "resolutionunit": "CENTIMETER",
        }
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            levels[0],
            tile=(256, 256),
            compression=compression,
            compressionargs=compressionargs,
            subifds=len(levels) - 1 if subifds else None,
            photometric="rgb",
            **res,
            **kw,
        )
        for lv in levels[1:]:
            tw.write(
                lv,
                tile=(256, 256),
                compression=compression,
                subfiletype=1,
                photometric="rgb",
                compressionargs=compressionargs,
            )
    return path


@pytest.fixture(scope="session")
def jpeg_subifd_tif(slide_dir, src_levels) -> Path:
    """tifffile: tiled JPEG (YCbCr 4:2:0, no JPEGTables), 3 levels as SubIFDs, 0.5 µm/px (cm)."""
    return _tifffile_pyramid(
        slide_dir / "jpeg_subifd.tif",
        src_levels,
        compression="jpeg",
        subifds=True,
        compressionargs={"level": 90},
        resolution_mpp=0.5,
    )


@pytest.fixture(scope="session")
def deflate_pages_tif(slide_dir, src_levels) -> Path:
    """tifffile: tiled deflate, 3 levels as consecutive reduced pages (lossless), no resolution."""
    return _tifffile_pyramid(
        slide_dir / "deflate_pages.tif", src_levels, compression="zlib", subifds=False
    )


@pytest.fixture(scope="session")
def lzw_tif(slide_dir, src) -> Path:
    """tifffile: one tiled LZW level, 0.25 µm/px given in dots per inch."""
    path = slide_dir / "lzw.tif"
    tifffile.imwrite(
        path,
        src,
        tile=(256, 256),
        compression="lzw",
        photometric="rgb",
        resolution=(25400 / MPP, 25400 / MPP),
        resolutionunit="INCH",
    )
    return path


@pytest.fixture(scope="session")
def strip_tif(slide_dir, src) -> Path:
    """tifffile: plain uncompressed stripped TIFF (64 rows per strip) at the meaningless 72 dpi."""
    path = slide_dir / "strip.tif"
    tifffile.imwrite(
        path, src, rowsperstrip=64, photometric="rgb", resolution=(72, 72), resolutionunit="INCH"
    )
    return path


@pytest.fixture(scope="session")
def strip_lzw_tif(slide_dir, src) -> Path:
    """tifffile: LZW stripped TIFF, 100 rows per strip (last strip partial)."""
    path = slide_dir / "strip_lzw.tif"
    tifffile.imwrite(path, src, rowsperstrip=100, compression="lzw", photometric="rgb")
    return path


SVS_DESC = (
    "Aperio Image Library v12.0.15\r\n1500x1000 [0,0 1500x1000] (256x256) JPEG/RGB Q=90"
    "|AppMag = 20|StripeWidth = 1000|ScanScope ID = SS1234|Filename = test|Date = 01/02/24"
    "|Time = 10:00:00|MPP = 0.25|Left = 25.0|Top = 18.0"
)


@pytest.fixture(scope="session")
def svs_file(slide_dir, src, src_levels) -> Path:
    """SVS-like (tifffile): baseline + thumbnail + level /4 + label + macro as separate pages, the
    Aperio ImageDescription with ``MPP = 0.25`` and ``AppMag = 20``."""
    path = slide_dir / "aperio.svs"
    kw = {"metadata": None, "photometric": "rgb"}
    head = "Aperio Image Library v12.0.15\r\n"
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            src,
            tile=(256, 256),
            compression="jpeg",
            compressionargs={"level": 90},
            description=SVS_DESC,
            **kw,
        )
        tw.write(
            downsample(src, 8), compression="jpeg", description=head + "1500x1000 -> 187x125", **kw
        )
        tw.write(
            src_levels[2],
            tile=(256, 256),
            compression="jpeg",
            compressionargs={"level": 90},
            description=head + "375x250",
            **kw,
        )
        tw.write(
            texture(100, 200, 7),
            compression="lzw",
            description=head + "label 200x100",
            subfiletype=1,
            **kw,
        )
        tw.write(
            texture(100, 300, 8),
            compression="jpeg",
            description=head + "macro 300x100",
            subfiletype=9,
            **kw,
        )
    return path


@pytest.fixture(scope="session")
def ome_file(slide_dir, src_levels) -> Path:
    """tifffile OME-TIFF (``ome=True``), deflate tiles, SubIFD pyramid, PhysicalSizeX = 250 nm."""
    path = slide_dir / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(
            src_levels[0],
            tile=(256, 256),
            compression="zlib",
            photometric="rgb",
            subifds=2,
            metadata={
                "axes": "YXS",
                "PhysicalSizeX": 250.0,
                "PhysicalSizeXUnit": "nm",
                "PhysicalSizeY": 250.0,
                "PhysicalSizeYUnit": "nm",
            },
        )
        for lv in src_levels[1:]:
            tw.write(lv, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1)
    return path


@pytest.fixture(scope="session")
def vips_pyramid_tif(slide_dir, src) -> Path:
    """libvips: tiled JPEG pyramid (consecutive pages, JPEGTables), 4000 px/mm = 0.25 µm/px."""
    import pyvips

    path = slide_dir / "vips_pyramid.tif"
    pyvips.Image.new_from_array(src).tiffsave(
        str(path),
        tile=True,
        pyramid=True,
        compression="jpeg",
        Q=90,
        tile_width=256,
        tile_height=256,
        xres=1000 / MPP,
        yres=1000 / MPP,
    )
    return path


@pytest.fixture(scope="session")
def vips_plain_tif(slide_dir, src) -> Path:
    """libvips: non-pyramidal stripped deflate TIFF (lossless)."""
    import pyvips

    path = slide_dir / "vips_plain.tif"
    pyvips.Image.new_from_array(src).tiffsave(str(path), compression="deflate")
    return path


@pytest.fixture(scope="session")
def vips_tiled_lzw_tif(slide_dir, src) -> Path:
    """libvips: non-pyramidal tiled LZW TIFF with 128-px tiles (lossless)."""
    import pyvips

    path = slide_dir / "vips_tiled.tif"
    pyvips.Image.new_from_array(src).tiffsave(
        str(path), tile=True, tile_width=128, tile_height=128, compression="lzw"
    )
    return path


NDPI_W, NDPI_H, NDPI_MPP = 1024, 768, 0.22


@pytest.fixture(scope="session")
def ndpi_src() -> list[np.ndarray]:
    img = texture(NDPI_H, NDPI_W, seed=3)
    return [img, downsample(img, 4)]


@pytest.fixture(scope="session")
def ndpi_file(slide_dir, ndpi_src) -> Path:
    """Hamamatsu NDPI (hand-written, readable by tifffile and OpenSlide): JPEG strips with restart
    markers + McuStarts (level 0: 128×8 tiles, level /4: 32×8), a macro image, 0.22 µm/px in
    pixels per centimeter, magnification 20."""
    path = slide_dir / "slide.ndpi"
    pages = []
    for img, interval in zip(ndpi_src, (16, 4), strict=True):
        jpeg, starts = jpeg_with_restarts(img, interval)
        scale = img.shape[1] / NDPI_W
        pages.append(
            {
                "jpeg": jpeg,
                "width": img.shape[1],
                "height": img.shape[0],
                "mcustarts": starts,
                "mag": 20.0,
                "xres": 1e4 / NDPI_MPP * scale,
            }
        )
    macro = texture(100, 160, 9)
    pages.append(
        {
            "jpeg": cv2.imencode(".jpg", macro)[1].tobytes(),
            "width": 160,
            "height": 100,
            "mcustarts": None,
            "mag": -1.0,
            "xres": 300.0,
        }
    )
    write_ndpi(path, pages)
    return path


def expected_region(
    level_img: np.ndarray, x: int, y: int, w: int, h: int, ds: float = 1.0, fill: int = 255
) -> np.ndarray:
    """What ``read_region(x, y, w, h, level)`` must return, given the level's pixels: ``(x, y)`` in
    level-0 px mapped with floor(x / ds), the part outside the level filled with ``fill``."""
    lx, ly = int(np.floor(x / ds)), int(np.floor(y / ds))
    out = np.full((h, w, 3), fill, np.uint8)
    lh, lw = level_img.shape[:2]
    x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
    if x0 < x1 and y0 < y1:
        out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = level_img[y0:y1, x0:x1]
    return out


#: Regions (x, y, w, h) in level-0 px covering every border case of a 1500×1000 slide.
BORDER_REGIONS = [
    (0, 0, 1, 1),  # 1×1 top-left
    (W - 1, H - 1, 1, 1),  # 1×1 bottom-right pixel
    (255, 255, 2, 2),  # 1 px of four tiles
    (-100, -50, 300, 200),  # negative x and y
    (1400, 900, 300, 300),  # past right and bottom (partial edge tiles)
    (-10, 500, 20, 20),  # straddles the left border
    (700, -30, 50, 60),  # straddles the top border
    (200, 100, 1100, 800),  # many tiles
    (-20, -20, W + 40, H + 40),  # the whole slide with a frame
    (W, 0, 10, 10),  # wholly right of the slide
    (0, H + 5, 10, 10),  # wholly below
    (-500, -500, 100, 100),  # wholly top-left
]


VMS_W, VMS_H = 768, 512


@pytest.fixture(scope="session")
def vms_src() -> np.ndarray:
    return texture(VMS_H, VMS_W, seed=4)


@pytest.fixture(scope="session")
def vms_file(slide_dir, vms_src) -> Path:
    """Hamamatsu VMS (not a TIFF: an INI key file + JPEGs with restart markers), which only
    OpenSlide reads. PhysicalWidth 168960 nm over 768 px = 0.22 µm/px. Returns the key file."""
    d = slide_dir / "vms"
    d.mkdir()
    (d / "image.jpg").write_bytes(jpeg_with_restarts(vms_src, 8)[0])
    (d / "map.jpg").write_bytes(jpeg_with_restarts(downsample(vms_src, 8), 4)[0])
    key = d / "slide.vms"
    key.write_text(
        "[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
        "ImageFile=image.jpg\nMapFile=map.jpg\nPhysicalWidth=168960\nPhysicalHeight=112640\n"
        "SourceLens=20\n"
    )
    return key
