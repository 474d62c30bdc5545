"""Seeded fuzzing of small real slides: every outcome is a typed trtwsi error or a success.

Seed files are written by real writers: a tiled-JPEG SVS-like TIFF (tifffile, Aperio
description, thumbnail strip page, reduced level), a big-endian BigTIFF (tifffile, deflate
tiles, SubIFD level), a stripped LZW TIFF (tifffile), a JPEG and a PNG (OpenCV), and a
Hamamatsu NDPI (the conftest NDPI writer around OpenCV JPEGs with restart markers). Each case
mutates one seed deterministically (``random.Random(case index)``): header bytes, IFD-chain
pointers, IFD entry values / types / counts, tile data bytes, truncation.

For each case a child process (two children share the cases; each is capped at baseline + 1 GiB
of address space with RLIMIT_AS and 10 s of CPU per case) runs: ``open_slide`` → ``info()`` →
``find_sections`` → ``read_region`` over every tile of level 0 (at most 256 regions) → a
sparse read (``only=`` two parts of a region of at most 512², as a pipeline chunk reads its
tiles' windows) → for JPEG-tiled levels, the first 16 of those regions and the sparse region
as ``compressed_region`` decoded by :class:`~trtwsi.read.jpeg_batch.JpegBatchDecoder` on the
CPU (the GPU lane's path). The outcome
bucket is ``ok`` / ``ok+tile_errors`` or the name of the trtwsi error raised; any other
exception, a timeout, a crash or a hang of a child fails the test with the case that caused it.

``TRTWSI_FUZZ_CASES`` sets the number of cases (default 2000, about 30 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
N_CASES = int(os.environ.get("TRTWSI_FUZZ_CASES", "2000"))
N_WORKERS = 2
#: Wall-clock bound of one case in the child (SIGALRM → "timeout" bucket: a test failure).
CASE_TIMEOUT_S = 10.0
#: Address space allowed to a child above its baseline after imports.
CHILD_HEADROOM_BYTES = 1 << 30


# --- seed files (real writers) ---------------------------------------------------------------
def write_seeds(d: Path) -> list[Path]:
    import cv2
    import tifffile

    from tests.slide.conftest import downsample, jpeg_with_restarts, texture, write_ndpi

    img = texture(256, 384, seed=11)
    img[40:200, 60:300] //= 2  # a darker "tissue" block for sections()
    svs = d / "seed.svs"
    head = "Aperio Image Library v12.0.15\r\n"
    with tifffile.TiffWriter(svs) as tw:
        tw.write(
            img,
            tile=(128, 128),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head
            + "384x256 [0,0 384x256] (128x128) JPEG/RGB Q=70|AppMag = 20|MPP = 0.5",
        )
        tw.write(
            downsample(img, 4),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "96x64 -> 96x64",
        )
        tw.write(
            downsample(img, 2),
            tile=(128, 128),
            compression="jpeg",
            photometric="rgb",
            metadata=None,
            description=head + "192x128",
        )
    big = d / "seed_big.tif"
    with tifffile.TiffWriter(big, bigtiff=True, byteorder=">") as tw:
        tw.write(
            img, tile=(64, 64), compression="zlib", photometric="rgb", subifds=1, metadata=None
        )
        tw.write(
            downsample(img, 2),
            tile=(64, 64),
            compression="zlib",
            photometric="rgb",
            subfiletype=1,
            metadata=None,
        )
    strip = d / "seed_strip.tif"
    tifffile.imwrite(
        strip, img[:100, :150], rowsperstrip=16, compression="lzw", photometric="rgb", metadata=None
    )
    ndpi = d / "seed.ndpi"  # Hamamatsu layout: 64-bit next-IFD offsets, restart-marker JPEG
    small = img[:128, :192]
    pages = []
    for level, interval in ((small, 8), (downsample(small, 4), 2)):
        jpeg, starts = jpeg_with_restarts(level, interval)
        pages.append(
            {
                "jpeg": jpeg,
                "width": level.shape[1],
                "height": level.shape[0],
                "mcustarts": starts,
                "mag": 20.0,
                "xres": 45454.5,
            }
        )
    write_ndpi(ndpi, pages)
    jpg = d / "seed.jpg"
    cv2.imwrite(str(jpg), img[:90, :120, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])
    png = d / "seed.png"
    cv2.imwrite(str(png), img[:90, :120, ::-1])
    return [svs, big, strip, jpg, png, ndpi]


# --- mutations -------------------------------------------------------------------------------
def _tiff_ifds(b: bytes) -> tuple[str, bool, list[int]]:
    """(byte order, bigtiff, IFD offsets of the main chain) of an intact TIFF."""
    bo = "<" if b[:2] == b"II" else ">"
    big = struct.unpack(bo + "H", b[2:4])[0] == 43
    off = struct.unpack_from(bo + ("Q" if big else "I"), b, 8 if big else 4)[0]
    offs = []
    while off and len(offs) < 64:
        offs.append(off)
        n = struct.unpack_from(bo + ("Q" if big else "H"), b, off)[0]
        end = off + (8 if big else 2) + n * (20 if big else 12)
        off = struct.unpack_from(bo + ("Q" if big else "I"), b, end)[0]
    return bo, big, offs


_INTS = [0, 1, 2, 3, 7, 8, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 30000]


def mutate(data: bytes, kind: str, rng: random.Random) -> tuple[bytes, str]:
    """One seeded mutation of ``data`` (a seed file of type ``kind``: 'tiff' | 'jpeg' | 'png');
    returns (mutated bytes, short description)."""
    b = bytearray(data)
    n = len(b)
    ops = ["flip_header", "flip_data", "truncate", "splice"]
    if kind == "tiff":
        ops += ["ifd_next", "tag_value", "tag_value", "tag_type_count", "first_ifd"]
    else:
        ops += ["dims", "dims"]
    op = rng.choice(ops)
    if op == "flip_header":
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(min(n, 64))
            b[i] = rng.randrange(256)
    elif op == "flip_data":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        return bytes(b[: rng.randrange(n)]), op
    elif op == "splice":  # copy a chunk of the file over another place
        a, c, ln = rng.randrange(n), rng.randrange(n), rng.randint(1, 256)
        chunk = b[a : a + ln]
        b[c : c + len(chunk)] = chunk
        b = b[:n]
    elif kind == "tiff":
        bo, big, offs = _tiff_ifds(data)
        ofmt = bo + ("Q" if big else "I")
        ifd = rng.choice(offs)
        cnt = struct.unpack_from(bo + ("Q" if big else "H"), b, ifd)[0]
        esize = 20 if big else 12
        first = ifd + (8 if big else 2)
        if op == "first_ifd":
            struct.pack_into(ofmt, b, 8 if big else 4, rng.choice([*offs, 0, n - 2, n + 5, 1]))
        elif op == "ifd_next":
            target = rng.choice([*offs, 0, rng.randrange(n), n - 1])
            struct.pack_into(ofmt, b, first + cnt * esize, target)
        else:
            e = first + rng.randrange(cnt) * esize
            if op == "tag_value":
                vpos = e + (12 if big else 8)
                width = 8 if big else 4
                v = rng.choice([*_INTS, n, n - 1, rng.randrange(1 << 32)])
                if width == 4 or rng.random() < 0.5:
                    v &= 0xFFFFFFFF
                    if rng.random() < 0.5:  # a SHORT value sits in the first 2 bytes
                        struct.pack_into(bo + "H", b, vpos, v & 0xFFFF)
                    else:
                        struct.pack_into(bo + "I", b, vpos, v)
                else:
                    struct.pack_into(bo + "Q", b, vpos, v)
            else:  # tag_type_count
                if rng.random() < 0.5:
                    struct.pack_into(bo + "H", b, e + 2, rng.choice([0, 1, 2, 3, 4, 5, 12, 16, 99]))
                else:
                    c = rng.choice([0, 1, 2, 1000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])
                    struct.pack_into(bo + ("Q" if big else "I"), b, e + 4, c)
        op = f"{op}@ifd{offs.index(ifd)}"
    elif kind == "jpeg":  # dims: patch the SOF height/width
        i = 2
        while i + 9 < n and not (b[i] == 0xFF and b[i + 1] in (0xC0, 0xC2)):
            i += 2 + struct.unpack(">H", b[i + 2 : i + 4])[0]
        w, h = rng.choice([(0, 90), (120, 0), (65535, 65535), (30000, 30000), (1, 1), (121, 91)])
        struct.pack_into(">HH", b, i + 5, h, w)
    else:  # png dims: IHDR width/height (CRC left stale on purpose half the time)
        w, h = rng.choice([(0, 90), (120, 0), (1 << 31, 1), (25000, 25000), (1, 1), (121, 91)])
        struct.pack_into(">II", b, 16, w, h)
        if rng.random() < 0.5:
            import zlib

            struct.pack_into(">I", b, 29, zlib.crc32(bytes(b[12:29])))
    return bytes(b), op


# --- the child -------------------------------------------------------------------------------
def _exercise(path: str) -> str:
    """open → info → sections → every level-0 tile (≤ 256 regions) → a sparse read; returns
    the bucket."""
    from trtwsi.plan.tissue import find_sections
    from trtwsi.slide import open_slide

    s = open_slide(path, threads=1)
    try:
        s.info()
        find_sections(s, max_size=256)
        lv = s.levels[0]
        tw, th = lv.tile_width or 256, lv.tile_height or 256
        tw, th = max(tw, 64), max(th, 64)
        xs, ys = range(0, lv.width, tw), range(0, lv.height, th)
        regions = [(x, y) for y in ys for x in xs]
        if len(regions) > 256:
            regions = regions[:: len(regions) // 256 + 1]
        for x, y in regions:
            s.read_region(x, y, min(tw, lv.width - x), min(th, lv.height - y))
        # a chunk's sparse read (only its tiles' windows): a region of at most 512², two parts
        rw, rh = min(lv.width, 512), min(lv.height, 512)
        only = [(0, 0, min(rw, 100), min(rh, 100)), (rw // 2, rh // 2, rw - rw // 2, rh - rh // 2)]
        s.read_region(0, 0, rw, rh, only=only)
        if s.compressed_region(0, 0, 1, 1) is not None:  # the GPU lane's path, decoded on the CPU
            from trtwsi.read.jpeg_batch import JpegBatchDecoder

            dec = JpegBatchDecoder("cpu")
            for x, y in regions[:16]:
                dec.decode(s.compressed_region(x, y, min(tw, lv.width - x), min(th, lv.height - y)))
            dec.decode(s.compressed_region(0, 0, rw, rh, only=only))
        return "ok+tile_errors" if s.read_errors else "ok"
    finally:
        s.close()


def child_main(seed_paths: list[str], cases: list[int], workdir: str) -> None:
    """Run ``cases`` (indices) and print one JSON line per case (``start`` line first)."""
    import logging
    import resource
    import signal
    import traceback
    import warnings

    import cv2  # noqa: F401 - imported before the address-space cap
    import torch  # noqa: F401 - imported before the address-space cap (the JPEG batch decoder)
    import torchvision.io  # noqa: F401

    import trtwsi.plan.tissue
    import trtwsi.read.jpeg_batch
    import trtwsi.slide.openslide_reader
    import trtwsi.slide.tiff  # noqa: F401
    from trtwsi.errors import TrtwsiError

    warnings.simplefilter("ignore")
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + CHILD_HEADROOM_BYTES,) * 2)

    class CaseTimeout(Exception):
        pass

    def alarm(*_):
        raise CaseTimeout()

    signal.signal(signal.SIGALRM, alarm)
    seeds = [(p, Path(p).read_bytes()) for p in seed_paths]
    for i in cases:
        rng = random.Random(i)
        seed_path, data = seeds[i % len(seeds)]
        suffix = Path(seed_path).suffix
        kind = {".jpg": "jpeg", ".png": "png"}.get(suffix, "tiff")
        mutated, op = mutate(data, kind, rng)
        path = os.path.join(workdir, f"case{os.getpid()}{suffix}")
        with open(path, "wb") as f:
            f.write(mutated)
        print(json.dumps({"start": i}), flush=True)
        t0 = time.monotonic()
        detail = ""
        signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
        try:
            bucket = _exercise(path)
        except CaseTimeout:
            bucket = "TIMEOUT"
        except TrtwsiError as e:
            bucket = type(e).__name__
        except BaseException as e:
            bucket = f"UNTYPED:{type(e).__name__}"
            detail = traceback.format_exc()[-1500:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        ms = round((time.monotonic() - t0) * 1000, 1)
        print(
            json.dumps(
                {
                    "case": i,
                    "seed": Path(seed_path).name,
                    "op": op,
                    "bucket": bucket,
                    "ms": ms,
                    "detail": detail,
                }
            ),
            flush=True,
        )


# --- the test --------------------------------------------------------------------------------
def test_fuzz_mutated_slides(tmp_path):
    seeds = write_seeds(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.monotonic()
    procs = []
    for w in range(N_WORKERS):
        cases = list(range(w, N_CASES, N_WORKERS))
        code = (
            "import json, sys\nfrom tests.slide.test_fuzz import child_main\n"
            "a = json.loads(sys.argv[1])\nchild_main(a['seeds'], a['cases'], a['work'])\n"
        )
        arg = json.dumps({"seeds": [str(p) for p in seeds], "cases": cases, "work": str(work)})
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code, arg],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = 60 + N_CASES * 0.2
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        outs.append((p.returncode, out, err))
    elapsed = time.monotonic() - t0

    buckets: Counter = Counter()
    by_op: dict[str, Counter] = {}
    bad = []
    slowest = (0.0, None)
    for rc, out, err in outs:
        last_start = None
        done = set()
        for line in out.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                last_start = rec["start"]
                continue
            done.add(rec["case"])
            buckets[rec["bucket"]] += 1
            by_op.setdefault(rec["op"].split("@")[0], Counter())[rec["bucket"]] += 1
            slowest = max(slowest, (rec["ms"], rec["case"]))
            if rec["bucket"].startswith(("UNTYPED", "TIMEOUT")):
                bad.append(rec)
        if rc != 0:
            bad.append({"case": last_start, "bucket": f"CHILD_EXIT:{rc}", "detail": err[-2000:]})
    total = sum(buckets.values())
    print(
        f"\nfuzz: {total} cases in {elapsed:.1f} s ({N_WORKERS} children); slowest case "
        f"{slowest[1]} {slowest[0]} ms"
    )
    for k, v in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28s} {v}")
    for op, c in sorted(by_op.items()):
        print(f"  [{op}] " + ", ".join(f"{k}={v}" for k, v in c.most_common()))
    assert not bad, "\n".join(json.dumps(r)[:2500] for r in bad[:10])
    assert total == N_CASES


@pytest.mark.parametrize("kind", ["tiff", "jpeg", "png"])
def test_mutations_are_deterministic(tmp_path, kind):
    seeds = write_seeds(tmp_path)
    path = {"tiff": seeds[0], "jpeg": seeds[3], "png": seeds[4]}[kind]
    data = path.read_bytes()
    a = [mutate(data, kind, random.Random(i)) for i in range(20)]
    b = [mutate(data, kind, random.Random(i)) for i in range(20)]
    assert a == b
    assert any(m != data for m, _ in a)
    assert np.mean([m == data for m, _ in a]) < 0.2
