"""ProcessReader: worker processes decode regions into a shared ring, identical to direct reads,
and tile errors they meet are recorded on the parent's slide (runs on the CPU: no pinning)."""

import itertools
import warnings

import numpy as np
import pytest

from tests.slide.test_bad_input import W, _corrupt
from trtwsi.errors import TileReadError, TrtwsiError, UsageError
from trtwsi.read.processes import ReaderPool, process_readable, strips
from trtwsi.slide import open_slide
from trtwsi.slide.tiff import TiffSlide


def test_process_reads_equal_direct_reads(svs_file):
    with TiffSlide(svs_file) as s:
        regions = [(0, 0, 700, 500, 0), (300, 200, 256, 256, 0), (-50, -40, 300, 300, 0)]
        if len(s.levels) > 1:
            regions.append((0, 0, 200, 150, 1))
        want = [s.read_region(x, y, w, h, level=lv).copy() for x, y, w, h, lv in regions]
        r = ReaderPool(processes=2, slots=2, slot_bytes=700 * 500 * 3, pin=False)
        try:
            for i, ((x, y, w, h, lv), exp) in enumerate(zip(regions, want, strict=True)):
                got = r.read(i % 2, s, x, y, w, h, lv)
                np.testing.assert_array_equal(got, exp)
            with pytest.raises(TrtwsiError, match="does not fit"):
                r.read(0, s, 0, 0, 1000, 1000, 0)
        finally:
            r.close()


@pytest.mark.parametrize("setting", [None, "1", "2", "16"])
def test_tall_regions_are_read_in_strips_by_several_workers(tmp_path, monkeypatch, setting):
    """Every strip setting ($TRTWSI_READ_STRIPS) reads the same pixels."""
    from trtwsi.synthetic import make_slide

    if setting is None:
        monkeypatch.delenv("TRTWSI_READ_STRIPS", raising=False)
    else:
        monkeypatch.setenv("TRTWSI_READ_STRIPS", setting)
    path = tmp_path / "tall.tif"
    make_slide(path, 1500, 2600, seed=4, n_sections=1)
    with TiffSlide(path) as s:
        cases = [(0, 0, 1500, 2600, 0), (-7, 13, 900, 2300, 0)]
        if len(s.levels) > 1:  # integer downsample: strips; level origin from level-0 coords
            cases.append((10, 30, 700, 1300, 1))
        r = ReaderPool(processes=3, slots=1, slot_bytes=1500 * 2600 * 3, pin=False)
        assert r.strips == {None: "adaptive", "1": 1, "2": 2, "16": 16}[setting]
        try:
            for x, y, w, h, lv in cases:
                want = s.read_region(x, y, w, h, level=lv)
                np.testing.assert_array_equal(r.read(0, s, x, y, w, h, lv), want)
            assert r._reading == 0
        finally:
            r.close()


def test_only_parts_are_read_by_the_strips_that_hold_them(tmp_path, monkeypatch):
    """``only``: each strip gets its parts, clipped and moved to its rows; a strip no part
    touches is never read (its rows keep what the slot held)."""
    from trtwsi.synthetic import make_slide

    monkeypatch.setenv("TRTWSI_READ_STRIPS", "3")
    path = tmp_path / "tall.tif"
    make_slide(path, 1500, 2600, seed=4, n_sections=1)
    with TiffSlide(path) as s:
        want = s.read_region(0, 0, 1500, 2600)
        r = ReaderPool(processes=3, slots=1, slot_bytes=1500 * 2600 * 3, pin=False)
        try:
            r.buffers[0].view((2600, 1500, 3))[...] = 7
            # rows 50..750, all in the first of the strips 0..768, 768..1792, 1792..2600
            parts = [(100, 50, 300, 700), (900, 600, 500, 100)]
            got = r.read(0, s, 0, 0, 1500, 2600, 0, only=parts)
            for x, y, w, h in parts:
                np.testing.assert_array_equal(got[y : y + h, x : x + w], want[y : y + h, x : x + w])
            assert (got[768:] == 7).all()  # the other two strips were not read
        finally:
            r.close()


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_strip_setting_is_refused_before_anything_starts(monkeypatch, value):
    monkeypatch.setenv("TRTWSI_READ_STRIPS", value)
    with pytest.raises(UsageError, match=f"TRTWSI_READ_STRIPS='{value}'.*adaptive"):
        ReaderPool(processes=1, slots=1, slot_bytes=64, pin=False)


def _random_regions(rng, count: int = 2000):
    """``(unit, top, h, n)``: a tile height, a region's first level row and height, workers."""
    for _ in range(count):
        unit = int(rng.choice([240, 256, 512]))
        top, h = int(rng.integers(-600, 40000)), int(rng.integers(1, 5000))
        yield unit, top, h, int(rng.integers(1, 17))


def test_strips_cover_the_region_and_share_no_tile_row():
    def tile_rows(top, r0, rows, unit):
        return set(range((top + r0) // unit, (top + r0 + rows - 1) // unit + 1))

    for unit, top, h, n in _random_regions(np.random.default_rng(0)):
        parts = strips(top, h, n, unit)
        assert parts[0][0] == 0 and sum(r for _, r in parts) == h
        assert all(r > 0 for _, r in parts) and len(parts) <= n
        assert all(a + r == b for (a, r), (b, _) in itertools.pairwise(parts))
        per = [tile_rows(top, a, r, unit) for a, r in parts]
        assert sum(len(t) for t in per) == len(tile_rows(top, 0, h, unit))  # each decoded once
    # a 3952-row level on 256-row tiles over 16 workers: its 16 touched rows one per strip
    assert len(strips(0, 3952, 16, 256)) == 16
    # the 1 Gpx bench slide's first chunk (3712 rows from row 3220): 16 touched rows, one per
    # strip (before: 15 strips, one of them two rows, the chunk's latency twice a row's)
    assert [r for _, r in strips(3220, 3712, 16, 256)] == [108] + [256] * 14 + [20]
    # cut every 512 rows from its top (before), a 4225-row chunk starting 100 rows into a tile
    # row decoded 25 tile rows for its 17
    assert len(strips(100, 4225, 16, 256)) == 16


def test_weighted_strips_balance_the_work_and_still_share_no_tile_row():
    """With per-row weights the cuts stay on tile rows, cover the region once, and no strip
    holds more than its share plus one row's weight (the nearest boundary to each share)."""
    rng = np.random.default_rng(1)
    for unit, top, h, n in _random_regions(rng):
        rows = -(-(top + h) // unit) - top // unit
        w = rng.integers(0, 20, rows).astype(float) * (rng.random(rows) < 0.8)
        parts = strips(top, h, n, unit, w)
        assert parts[0][0] == 0 and sum(r for _, r in parts) == h and len(parts) <= n
        assert all(a + r == b for (a, r), (b, _) in itertools.pairwise(parts))
        first = top // unit
        load = [w[(top + a) // unit - first : (top + a + r - 1) // unit - first + 1].sum()
                for a, r in parts]  # fmt: skip
        assert sum(load) == w.sum()  # every touched row in exactly one strip
        assert max(load) <= w.sum() / min(n, rows) + w.max() + 1e-9
    with pytest.raises(ValueError, match="one value per touched tile row"):
        strips(0, 512, 2, 256, np.ones(3))


def test_row_weights_count_the_file_tiles_the_parts_reach():
    from trtwsi.read.processes import row_weights

    rng = np.random.default_rng(2)
    for _ in range(300):
        unit, tw = int(rng.choice([240, 256])), int(rng.choice([256, 512]))
        x, top = int(rng.integers(-300, 5000)), int(rng.integers(-300, 5000))
        w, h = int(rng.integers(1, 3000)), int(rng.integers(1, 3000))
        k = int(rng.integers(0, 6))
        px, py = rng.integers(0, w, k), rng.integers(0, h, k)
        parts = np.stack([px, py, rng.integers(1, w - px + 1), rng.integers(1, h - py + 1)], 1)
        first = top // unit
        want = np.zeros(-(-(top + h) // unit) - first)
        for r in range(len(want)):
            cols = set()
            for qx, qy, qw, qh in parts.reshape(-1, 4).tolist():
                if (top + qy) // unit <= first + r <= (top + qy + qh - 1) // unit:
                    cols |= set(range((x + qx) // tw, (x + qx + qw - 1) // tw + 1))
            want[r] = len(cols)
        np.testing.assert_array_equal(row_weights(parts.reshape(-1, 4), x, top, h, unit, tw), want)


def test_tile_errors_in_workers_are_recorded_on_the_parent(tmp_path, svs_file):
    bad = tmp_path / "bad.svs"
    _corrupt(svs_file, bad, "junk", index=7)  # level 0, tile (row 1, col 1)
    with TiffSlide(bad) as s:
        r = ReaderPool(processes=1, slots=1, slot_bytes=W * 1000 * 3, pin=False)
        try:
            with pytest.warns(RuntimeWarning, match=r"tile \(row 1, col 1\)"):
                got = r.read(0, s, 0, 0, W, 1000, 0)
            assert (got[256:512, 256:512] == 255).all()
            assert len(s.read_errors) == 1 and isinstance(s.read_errors[0], TileReadError)
            assert s.read_errors[0].tile == (1, 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r.read(0, s, 0, 0, W, 1000, 0)
            assert len(s.read_errors) == 1  # same tile reported once
        finally:
            r.close()


def test_array_slides_are_not_process_readable():
    s = open_slide(np.zeros((10, 10, 3), np.uint8))
    assert not process_readable(s)


def test_one_pool_reads_several_slides_and_leaves_nothing_behind(tmp_path, svs_file):
    """The pool is slide-agnostic: two slides through one pool, each read equal to a direct
    read; after close() no worker process and no /dev/shm segment is left."""
    import os

    from trtwsi.synthetic import make_slide

    other = tmp_path / "other.tif"
    make_slide(other, 900, 700, seed=5, n_sections=1)
    with TiffSlide(svs_file) as a, TiffSlide(other) as b:
        r = ReaderPool(processes=2, slots=2, slot_bytes=600 * 400 * 3, pin=False)
        pids = [p.pid for p in r._pool._processes.values()]
        shm = r.shm_path
        assert len(pids) == 2 and os.path.exists(shm)
        for _ in range(2):
            for k, sl in enumerate((a, b, a)):
                want = sl.read_region(11, 7, 600, 400, level=0)
                np.testing.assert_array_equal(r.read(k % 2, sl, 11, 7, 600, 400, 0), want)
        r.close()
    assert not os.path.exists(shm)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_thumbnails_decoded_by_the_pool_equal_the_slides_own(tmp_path, svs_file):
    """Slide.thumbnail(read_level=pool.level_reader(...)): the block-reduced path (a level over
    THUMBNAIL_DIRECT_PIXELS, integer downsample), the direct path, and a level of non-integer
    downsample (read by the slide itself) all give the slide's own thumbnail, bit for bit."""
    from trtwsi.plan import find_sections
    from trtwsi.slide.base import THUMBNAIL_DIRECT_PIXELS
    from trtwsi.synthetic import make_slide

    big = tmp_path / "big.tif"
    make_slide(big, 4400, 4000, seed=5, n_sections=2, levels=1)
    assert THUMBNAIL_DIRECT_PIXELS < 4400 * 4000
    r = ReaderPool(processes=2, slots=1, slot_bytes=4096 * 4096 * 3, pin=False, wait=False)
    try:
        for path, sizes in ((big, (2048, 512)), (svs_file, (2048, 300, 64))):
            with open_slide(path) as s:
                for n in sizes:
                    want = s.thumbnail(n)
                    got = s.thumbnail(n, read_level=r.level_reader(0, s))
                    np.testing.assert_array_equal(got, want)
        with open_slide(big) as s:
            thumb = s.thumbnail(2048, read_level=r.level_reader(0, s))
            got, want = find_sections(s, thumbnail=thumb), find_sections(s)
            assert [(x.bbox, x.area) for x in got] == [(x.bbox, x.area) for x in want]
            assert len(want) == 2
            for a, b in zip(got, want, strict=True):
                np.testing.assert_array_equal(a.mask, b.mask)
            with pytest.raises(TrtwsiError, match="thumbnail must be"):
                find_sections(s, thumbnail=thumb[:-1])
    finally:
        r.close()


def test_a_pool_started_without_waiting_reads_and_closes(svs_file):
    r = ReaderPool(processes=2, slots=1, slot_bytes=300 * 200 * 3, pin=False, wait=False)
    try:
        with open_slide(svs_file) as s:
            np.testing.assert_array_equal(
                r.read(0, s, 10, 20, 300, 200, 0), s.read_region(10, 20, 300, 200)
            )
        r.ready()  # (a second wait returns at once)
    finally:
        r.close()
    assert r.shm_path is None


def test_submitted_reads_are_decoded_in_submission_order_and_wait_for_every_strip(
    tmp_path, svs_file
):
    """submit() returns before the pixels are there; one worker decodes the reads first come,
    first served; result() gives each slot's pixels once; a slide the workers cannot open
    raises from result() after every strip ended, and leaves no read counted in flight."""
    import shutil

    from trtwsi.errors import RuntimeStateError

    with TiffSlide(svs_file) as s:
        r = ReaderPool(processes=1, slots=3, slot_bytes=700 * 500 * 3, pin=False)
        try:
            regions = [(0, 0, 700, 500), (100, 50, 640, 480), (3, 9, 512, 300)]
            pending, done = [], []
            for k, (x, y, w, h) in enumerate(regions):
                p = r.submit(k, s, x, y, w, h, 0)
                for f in p.futures:
                    f.add_done_callback(lambda _f, k=k: done.append(k))
                pending.append(p)
            assert r._reading == 3
            for p, (x, y, w, h) in zip(pending, regions, strict=True):
                np.testing.assert_array_equal(p.result(), s.read_region(x, y, w, h))
            assert done == sorted(done) and set(done) == {0, 1, 2}
            assert r._reading == 0
            with pytest.raises(RuntimeStateError, match="twice"):
                pending[0].result()
            assert r._reading == 0

            gone = tmp_path / "gone.svs"
            shutil.copy(svs_file, gone)
            with TiffSlide(gone) as g:
                gone.unlink()  # open here; the worker's open fails
                p = r.submit(0, g, 0, 0, 700, 500, 0)
                with pytest.raises(FileNotFoundError):
                    p.result()
                assert all(f.done() for f in p.futures) and r._reading == 0
        finally:
            r.close()


def test_a_submit_that_fails_midway_waits_for_its_queued_strips_and_raises_its_error(
    tmp_path, monkeypatch
):
    """The pool refusing a strip (e.g. shut down) after others were queued: submit() waits
    for those, counts no read in flight, and raises the refusal, not a later error."""
    from trtwsi.synthetic import make_slide

    path = tmp_path / "tall.tif"
    make_slide(path, 1500, 2600, seed=4, n_sections=1)
    with TiffSlide(path) as s:
        r = ReaderPool(processes=2, slots=1, slot_bytes=1500 * 2600 * 3, pin=False)
        try:
            real, queued = r._pool.submit, []

            def submit(*a, **k):
                if queued:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                queued.append(real(*a, **k))
                return queued[-1]

            monkeypatch.setattr(r._pool, "submit", submit)
            with pytest.raises(RuntimeError, match="after shutdown"):
                r.submit(0, s, 0, 0, 1500, 2600, 0)
            assert len(queued) == 1 and queued[0].done() and r._reading == 0
            monkeypatch.setattr(r._pool, "submit", real)
            np.testing.assert_array_equal(
                r.read(0, s, 0, 0, 1500, 2600, 0), s.read_region(0, 0, 1500, 2600)
            )
        finally:
            r.close()
