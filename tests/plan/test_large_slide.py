"""Tissue detection on large tiled slides without a pyramid: memory stays bounded.

The slides are real tiled JPEG TIFFs written by tifffile from two pre-encoded 256² tiles
(glass and tissue, encoded by imagecodecs), so a 40000² file takes a second to write.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[2]
T = 256


def write_disc_slide(path: Path, side: int) -> Path:
    """``side``² tiled JPEG TIFF (no pyramid): glass (236 gray) with a disc of pink tissue of
    radius 0.2·side centred at (0.55·side, 0.45·side)."""
    import imagecodecs

    glass = imagecodecs.jpeg8_encode(np.full((T, T, 3), 236, np.uint8), level=80)
    rng = np.random.default_rng(0)
    tis = np.empty((T, T, 3), np.float32)
    tis[...] = (170, 90, 150)
    tis = np.clip(tis + rng.normal(0, 12, tis.shape), 0, 255).astype(np.uint8)
    tissue = imagecodecs.jpeg8_encode(tis, level=80)
    n = -(-side // T)
    cy, cx, r = n * 0.45, n * 0.55, n * 0.2

    def tiles():
        for i in range(n):
            for j in range(n):
                yield tissue if (i + 0.5 - cy) ** 2 + (j + 0.5 - cx) ** 2 < r * r else glass

    tifffile.imwrite(
        path,
        tiles(),
        shape=(side, side, 3),
        dtype=np.uint8,
        tile=(T, T),
        compression="jpeg",
        photometric="rgb",
        bigtiff=side > 50000,
    )
    return path


_CHILD = """
import sys, time
from trtwsi.slide import open_slide
from trtwsi.plan.tissue import find_sections
t0 = time.time()
s = open_slide(sys.argv[1])
secs = find_sections(s)
print("N", len(secs), "BBOX", *secs[0].bbox if secs else (), "ERR", len(s.read_errors))
print("SECS", round(time.time() - t0, 1))
# VmHWM: peak RSS of this process image (ru_maxrss would include the parent's RSS at fork)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("RSS_MIB", hwm // 1024)
"""


def _sections_in_child(path: Path, timeout: float) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = {}
    for line in r.stdout.splitlines():
        key, *vals = line.split()
        out[key] = vals
    print(r.stdout)
    return out


def _check_disc(out: dict, side: int) -> None:
    n, *bbox = (int(v) for v in out["N"][:1] + out["N"][2:6])
    assert n == 1 and int(out["N"][7]) == 0
    x, y, w, h = bbox
    # disc of radius 0.2·side (± a tile and the padding)
    assert abs(x + w / 2 - 0.55 * side) < 2 * T and abs(y + h / 2 - 0.45 * side) < 2 * T
    assert abs(w - 0.4 * side) < 4 * T and abs(h - 0.4 * side) < 4 * T


#: Peak RSS allowed for sections() of a 40000² slide without pyramid (it was 4.7 GB).
PEAK_RSS_MIB_40K = 400


def test_sections_of_40000_square_tiled_slide_bounded_memory(tmp_path):
    side = 40000
    path = write_disc_slide(tmp_path / "big40k.tif", side)
    out = _sections_in_child(path, timeout=600)
    _check_disc(out, side)
    assert int(out["RSS_MIB"][0]) < PEAK_RSS_MIB_40K, out


@pytest.mark.slow
def test_sections_of_100000_square_tiled_slide(tmp_path):
    """Used to raise RegionError (the whole level in one read is over MAX_REGION_PIXELS)."""
    side = 100_000
    path = write_disc_slide(tmp_path / "big100k.tif", side)
    out = _sections_in_child(path, timeout=1200)
    _check_disc(out, side)
    assert int(out["RSS_MIB"][0]) < PEAK_RSS_MIB_40K, out


def test_blocked_reduction_matches_whole_level_read(monkeypatch):
    """Slide._reduced_level (block by block) against cv2.INTER_AREA on the whole level."""
    import cv2

    import trtwsi.slide.base as base
    from trtwsi.slide import ArraySlide

    rng = np.random.default_rng(1)
    img = cv2.resize(
        rng.integers(0, 256, (90, 100, 3), np.uint8), (1000, 900), interpolation=cv2.INTER_CUBIC
    )
    s = ArraySlide(img)  # longer side < 1024: a single level
    monkeypatch.setattr(base, "THUMBNAIL_BLOCK", 100)
    got = s._reduced_level(0, 10)
    want = cv2.resize(img, (100, 90), interpolation=cv2.INTER_AREA)
    assert got.shape == (90, 100, 3)
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)
    monkeypatch.setattr(base, "THUMBNAIL_DIRECT_PIXELS", 1000)
    thumb = s.thumbnail(100)
    assert thumb.shape == (90, 100, 3)
    assert np.abs(thumb.astype(int) - want.astype(int)).max() <= 1
