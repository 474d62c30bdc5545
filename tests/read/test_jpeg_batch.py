"""Batch JPEG decode of slide regions (trtwsi.read.jpeg_batch) against the slide's own reader.

On the CPU the decoder runs torchvision's libjpeg: every path but nvJPEG itself (tables
splicing, grid layout, clipping at the level's edges, sparse and corrupt tiles, the per-tile CPU
fallback). The ``gpu`` tests run the same regions through nvJPEG and measure the difference.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from tests.slide.conftest import patch_tag, segment_location, set_segment_bytecount
from trtwsi.read.jpeg_batch import JpegBatchDecoder, jpeg_batch_unavailable
from trtwsi.slide import open_slide
from trtwsi.slide.jpeg_stream import check_stream, read_frame, splice_tables

torchvision = pytest.importorskip("torchvision")

# (x, y, w, h) level-0 px on the 1500×1000 test slides: whole, inner, across the top-left
# corner, across the bottom-right corner (partial file tiles), outside, one px
REGIONS = [
    (0, 0, 1500, 1000),
    (100, 37, 700, 500),
    (-50, -20, 300, 300),
    (1300, 800, 400, 400),
    (3000, 3000, 100, 100),
    (511, 255, 1, 1),
]


def _abbreviate(stream: bytes) -> tuple[bytes, bytes]:
    """Split a complete JPEG into (tables, abbreviated tile) the way Aperio/libtiff store them:
    DQT and DHT into the tables stream; JFIF and Adobe markers dropped."""
    i, tables, rest = 2, [b"\xff\xd8"], [b"\xff\xd8"]
    while stream[i + 1] != 0xDA:
        n = (stream[i + 2] << 8) | stream[i + 3]
        m, seg = stream[i + 1], stream[i : i + 2 + n]
        if m in (0xDB, 0xC4):
            tables.append(seg)
        elif m not in (0xE0, 0xEE):
            rest.append(seg)
        i += 2 + n
    return b"".join([*tables, b"\xff\xd9"]), b"".join([*rest, stream[i:]])


@pytest.fixture(scope="module")
def aperio_rgb_tif(tmp_path_factory, src):
    """Aperio-style tiles: libjpeg-turbo (imagecodecs) encodes each 256² tile with R, G, B
    components (no colour transform, 4:4:4), the tables go into JPEGTables, photometric RGB,
    no JFIF marker: what tifffile decodes with ``colorspace=RGB``."""
    import imagecodecs
    import tifffile

    h, w = src.shape[:2]
    tiles, tables = [], None
    for r in range(0, h, 256):
        for c in range(0, w, 256):
            t = np.zeros((256, 256, 3), np.uint8)
            part = src[r : r + 256, c : c + 256]
            t[: part.shape[0], : part.shape[1]] = part
            full = imagecodecs.jpeg8_encode(
                t, level=90, colorspace="RGB", outcolorspace="RGB", subsampling="444"
            )
            tb, rest = _abbreviate(bytes(full))
            assert tables in (None, tb)
            tables = tb
            tiles.append(rest)
    path = tmp_path_factory.mktemp("aperio") / "rgb.tif"
    tifffile.imwrite(
        path, iter(tiles), shape=(h, w, 3), dtype="uint8", tile=(256, 256),
        compression="jpeg", photometric="rgb", extratags=[(347, 7, len(tables), tables, True)],
    )  # fmt: skip
    patch_tag(path, "PhotometricInterpretation", 2)  # tifffile writes YCbCr for JPEG
    return path


def _fixture(request, name):
    if name.startswith("vips"):
        pytest.importorskip("pyvips")
    return request.getfixturevalue(name)


FILES = ["jpeg_subifd_tif", "vips_pyramid_tif", "svs_file", "aperio_rgb_tif"]
IDS = ["tifffile", "vips", "svs", "aperio-rgb"]


def _passes(stream, width: int = 24, height: int = 16) -> bool:
    try:
        check_stream(stream, width, height)
    except ValueError:
        return False
    return True


def _gpu_reason():
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return jpeg_batch_unavailable("cuda")


def _check(path, device, level=0, regions=REGIONS, tol=None, cpu_tiles=False):
    """Decode every region on ``device``; compare with ``read_region``; return the diffs."""
    slide = open_slide(path, threads=1)
    dec = JpegBatchDecoder(device)
    ds = slide.levels[level].downsample
    diffs = []
    assert slide._whole_jpeg_tiles(level)
    for x, y, w, h in regions:
        x, y = int(x * ds) if level else x, int(y * ds) if level else y
        region = slide.compressed_region(x, y, w, h, level=level)
        got = dec.decode(region)
        a = got.to_numpy()
        b = slide.read_region(x, y, w, h, level=level)
        assert a.shape == b.shape
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        if tol is None:
            assert d.max() == 0, (path, (x, y, w, h), d.max())
        diffs.append(d)
        n = region.rows * region.cols
        assert (got.cpu_tiles, got.device_tiles) == ((n, 0) if cpu_tiles else (0, n))
    assert slide.read_errors == []
    return diffs


def test_splice_and_frame():
    tables = b"\xff\xd8\xff\xdb\x00\x04\x00\x00\xff\xd9"
    tile = b"\xff\xd8\xff\xc0\x00\x11\x08\x01\x00\x02\x00\x03\x01\x22\x00\x02\x11\x01\x03\x11\x01\xff\xd9"
    s = splice_tables(tables, tile)
    assert s == tables[:-2] + tile[2:]
    assert splice_tables(None, tile) == tile
    f = read_frame(s)
    assert (f.width, f.height, f.marker) == (512, 256, 0xC0)
    assert f.components == ((1, 2, 2), (2, 1, 1), (3, 1, 1)) and f.subsampled
    with pytest.raises(ValueError, match="SOI"):
        splice_tables(tables, b"\x00" + tile)
    with pytest.raises(ValueError, match="JPEGTables"):
        splice_tables(tables[:-2], tile)


def test_read_frame_fuzz():
    """Truncated, bit-flipped and random streams: a frame or ValueError, nothing else."""
    import imagecodecs

    img = np.zeros((16, 24, 3), np.uint8)
    good = imagecodecs.jpeg8_encode(img, level=80)
    assert (read_frame(good).width, read_frame(good).height) == (24, 16)
    rng = np.random.default_rng(0)
    cases = [good[:n] for n in range(len(good))]
    for _ in range(2000):
        b = bytearray(good)
        for i in rng.integers(0, len(b), rng.integers(1, 6)):
            b[i] = int(rng.integers(0, 256))
        cases.append(bytes(b))
    cases += [b"\xff\xd8" + rng.bytes(int(rng.integers(0, 300))) for _ in range(500)]
    check_stream(good, 24, 16)
    with pytest.raises(ValueError, match="tile 32x16"):
        check_stream(good, 32, 16)
    with pytest.raises(ValueError, match="tile 16x16"):  # a frame larger than the tile
        check_stream(good, 16, 16)
    for c in cases:
        try:
            f = read_frame(c)
        except ValueError:
            continue
        assert 0 <= f.width < 65536 and len(f.components) < 256
        _passes(c)  # a frame or ValueError, never another error
    assert sum(_passes(c) for c in cases[: len(good)]) == 0  # no truncation passes


@pytest.mark.parametrize("fixture", FILES, ids=IDS)
def test_cpu_decode_matches_reader(fixture, request):
    """torchvision's libjpeg on the spliced streams gives the reader's pixels exactly, at
    level 0 and a reduced level: tables spliced (libvips writes JPEGTables and R,G,B
    components), YCbCr 4:2:0 (tifffile), partial edge tiles, regions beyond the level."""
    path = _fixture(request, fixture)
    _check(path, "cpu")
    if len(open_slide(path).levels) > 1:
        _check(
            path, "cpu", level=1, regions=[(0, 0, 375, 250), (-10, 5, 200, 300), (300, 200, 80, 80)]
        )


@pytest.mark.parametrize("fixture", ["jpeg_subifd_tif", "svs_file"])
def test_only_reads_and_decodes_the_tiles_its_parts_touch(fixture, request):
    """``compressed_region(only=)``: tiles no part touches are not read (None: decoded as
    fill); inside the parts the pixels are the reader's (torchvision's libjpeg on the CPU)."""
    slide = open_slide(_fixture(request, fixture), threads=1)
    dec = JpegBatchDecoder("cpu")
    x, y, w, h = -50, 20, 1200, 900
    parts = [(70, 0, 200, 150), (600, 500, 300, 380)]
    full = slide.compressed_region(x, y, w, h)
    region = slide.compressed_region(x, y, w, h, only=parts)
    assert (region.rows, region.cols) == (full.rows, full.cols)
    kept = sum(s is not None for s in region.streams)
    assert 0 < kept < sum(s is not None for s in full.streams)
    got = dec.decode(region).to_numpy()
    want = slide.read_region(x, y, w, h)
    for px, py, pw, ph in parts:
        np.testing.assert_array_equal(
            got[py : py + ph, px : px + pw], want[py : py + ph, px : px + pw]
        )
    assert slide.read_errors == []


def test_components_follow_the_file(aperio_rgb_tif, jpeg_subifd_tif):
    """Stored-RGB JPEG (Aperio) is handed out but is no ``jpeg_level``: the GPU lane leaves it
    to the CPU readers (nvJPEG would apply the YCbCr transform)."""
    a = open_slide(aperio_rgb_tif)
    t = open_slide(jpeg_subifd_tif)
    ra, rt = a.compressed_region(0, 0, 256, 256), t.compressed_region(0, 0, 256, 256)
    assert ra.components == "rgb" and not read_frame(ra.streams[0]).subsampled
    assert rt.components == "ycbcr" and read_frame(rt.streams[0]).subsampled
    assert not a.jpeg_level(0) and t.jpeg_level(0)


def test_not_jpeg_levels(deflate_pages_tif, ndpi_file):
    """Deflate tiles and NDPI restart-interval strips are not handed out as JPEG streams."""
    for p in (deflate_pages_tif, ndpi_file):
        s = open_slide(p)
        assert not s.jpeg_level(0)
        assert s.compressed_region(0, 0, 64, 64) is None


def test_corrupt_and_sparse_tiles(jpeg_subifd_tif, tmp_path):
    """A tile of junk bytes fails the batch: the others still decode on the decoder, the bad
    one goes to the CPU reader, which records the error and fills it as ``read_region``
    does. A sparse tile (byte count 0) is fill."""
    path = tmp_path / "bad.tif"
    shutil.copy(jpeg_subifd_tif, path)
    off, _ = segment_location(path, 7)  # row 1, col 1 of the 6×4 tile grid
    with open(path, "r+b") as f:
        f.seek(off + 2)
        f.write(b"\x00junk" * 8)
    set_segment_bytecount(path, 2, 0)  # row 0, col 2: sparse
    slide = open_slide(path, threads=1)
    region = slide.compressed_region(0, 0, 1500, 1000)
    with pytest.warns(RuntimeWarning, match="could not be read"):
        got = JpegBatchDecoder("cpu").decode(region)
    assert got.cpu_tiles == 1 and got.device_tiles == 24 - 2
    assert [e.tile for e in slide.read_errors] == [(1, 1)]
    a = got.to_numpy()
    ref = open_slide(path, threads=1)
    with pytest.warns(RuntimeWarning):
        b = ref.read_region(0, 0, 1500, 1000)
    assert np.array_equal(a, b)
    assert (a[256:512, 256:512] == 255).all() and (a[:256, 512:768] == 255).all()
    assert a[:256, :256].std() > 10  # the good tiles kept their pixels


def test_bad_huffman_table_fails_the_batch(jpeg_subifd_tif, tmp_path):
    """A tile whose structure passes ``check_stream`` but whose Huffman table is bogus: the
    decoder itself fails, the batch is retried tile by tile, and only that tile goes to the
    CPU reader (recorded, filled)."""
    path = tmp_path / "dht.tif"
    shutil.copy(jpeg_subifd_tif, path)
    off, cnt = segment_location(path, 9)  # row 1, col 3
    with open(path, "r+b") as f:
        f.seek(off)
        data = f.read(cnt)
        dht = data.find(b"\xff\xc4")
        f.seek(off + dht + 5)
        f.write(b"\xff" * 16)  # 16 code-length counts of 255: more codes than can exist
    slide = open_slide(path, threads=1)
    region = slide.compressed_region(0, 0, 1500, 1000)
    assert _passes(region.streams[9], 256, 256)
    with pytest.warns(RuntimeWarning, match="could not be read"):
        got = JpegBatchDecoder("cpu").decode(region)
    assert got.cpu_tiles == 1 and got.device_tiles == 23
    assert [e.tile for e in slide.read_errors] == [(1, 3)]
    a = got.to_numpy()
    assert (a[256:512, 768:1024] == 255).all() and a[:256, :256].std() > 10


def test_oversized_frame_goes_to_the_cpu_reader(jpeg_subifd_tif, tmp_path):
    """A tile whose frame header claims 8192² px is not handed to the batch decoder (which
    would allocate what the header says); the CPU reader gets it, with its own checks."""
    path = tmp_path / "big.tif"
    shutil.copy(jpeg_subifd_tif, path)
    off, cnt = segment_location(path, 4)
    with open(path, "r+b") as f:
        f.seek(off)
        sof = f.read(cnt).find(b"\xff\xc0")
        f.seek(off + sof + 5)
        f.write(b"\x20\x00\x20\x00")  # height, width = 8192
    slide = open_slide(path, threads=1)
    region = slide.compressed_region(0, 0, 1500, 1000)
    assert read_frame(region.streams[4]).width == 8192 and not _passes(region.streams[4], 256, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the CPU reader may report it
        got = JpegBatchDecoder("cpu").decode(region)
    assert got.cpu_tiles == 1 and got.device_tiles == 23


@pytest.mark.gpu
@pytest.mark.parametrize("fixture", FILES, ids=IDS)
def test_gpu_decode_close_to_reader(fixture, request):
    """nvJPEG vs libjpeg-turbo on the same streams: the measured difference is printed and
    bounded (IDCT and chroma upsampling differ by design; a wrong colour transform, a
    shifted tile or a lost tile would be off by tens of levels)."""
    why = _gpu_reason()
    if why:
        pytest.skip(why)
    path = _fixture(request, fixture)
    rgb = not open_slide(path).jpeg_level(0)  # stored RGB: every tile to the CPU reader
    diffs = _check(path, "cuda", tol=not rgb, cpu_tiles=rgb)
    d = np.concatenate([x.ravel() for x in diffs])
    print(f"{fixture}: max {d.max()}, mean {d.mean():.4f}, p99.9 {np.percentile(d, 99.9)}")
    # measured on an H200 (these sinusoid textures, YCbCr 4:2:0): max 41, mean 1.07, p99.9 6
    assert d.mean() < 1.5
    assert np.percentile(d, 99.9) <= 8
    assert d.max() <= 64


@pytest.mark.gpu
def test_gpu_corrupt_tile(jpeg_subifd_tif, tmp_path):
    why = _gpu_reason()
    if why:
        pytest.skip(why)
    path = tmp_path / "bad.tif"
    shutil.copy(jpeg_subifd_tif, path)
    off, _ = segment_location(path, 7)
    with open(path, "r+b") as f:
        f.seek(off + 2)
        f.write(b"\x00junk" * 8)
    slide = open_slide(path, threads=1)
    with pytest.warns(RuntimeWarning, match="could not be read"):
        got = JpegBatchDecoder("cuda").decode(slide.compressed_region(0, 0, 1500, 1000))
    assert got.cpu_tiles == 1 and got.device_tiles == 23
    a = got.to_numpy()
    assert (a[256:512, 256:512] == 255).all() and a[:256, :256].std() > 10
    assert [e.tile for e in slide.read_errors] == [(1, 1)]
