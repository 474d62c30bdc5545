"""`trtwsi predict SLIDE`: one slide, outputs checked before the run, never a finished run lost.

Order: every output path, format, folder, the slide file and the device are checked first;
then the slide is opened and ``--section`` checked; only then are the models loaded and the
tiles run. If writing still fails at the end (disk full, folder gone), the detections are saved
to a rescue file (:func:`save_outputs`) and the error names it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from trtwsi.app import validate
from trtwsi.errors import OutputWriteError, TrtwsiError, UsageError


def models_from_args(a) -> list:
    from trtwsi.engines.model import Model, load_models_config

    models, trust = [], getattr(a, "trust_weights", False)
    if getattr(a, "models", None):
        models += load_models_config(a.models, trust_weights=trust)
    for w in a.model or []:
        models.append(Model(w, min_conf=a.conf, iou=a.iou, backend=a.backend, trust_weights=trust))
    if not models:
        default = _default_models_config()
        if default is None:
            raise UsageError("no model given: pass --model PATH.pt or --models models.toml")
        models = load_models_config(default, trust_weights=trust)
    return models


def _default_models_config() -> Path | None:
    from trtwsi.app.demo import bundled_models_dir

    p = bundled_models_dir() / "models.toml"
    return p if p.exists() else None


def make_predictor(a, models, slide=None):
    """The Predictor for the options `predict` and `eval` share."""
    from trtwsi.predictor import Predictor

    return Predictor(
        slide if slide is not None else a.slide,
        models,
        overlap=a.overlap,
        mpp=a.mpp,
        batch=a.batch,
        workers=a.workers,
        device=a.device,
        progress=not a.no_progress,
        slide_mpp=a.slide_mpp,
        decode=getattr(a, "decode", "auto"),
        compile=getattr(a, "compile", False),
    )


def rescue_results(res, near: Path) -> Path | None:
    """Save ``res`` as trtwsi JSON (``Results.load`` reads it) in the first folder that takes
    it: next to ``near``, the temp folder, the working folder. None when none did."""
    stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    name = f"{near.stem}.rescue-{stamp}.json"
    for folder in (near.parent, Path(tempfile.gettempdir()), Path.cwd()):
        try:
            return res.save(folder / name)
        except Exception:
            continue
    return None


def save_outputs(res, paths: Sequence[Path], *, overwrite: bool, slide=None) -> list[Path]:
    """Write ``res`` to every path. Interrupted: the files written so far are removed. A write
    that fails: the detections go to a rescue file and OutputWriteError names it (files already
    written are kept and named too)."""
    written: list[Path] = []
    try:
        for p in paths:
            written.append(res.save(p, overwrite=overwrite, slide=slide))
    except Exception as e:
        failed = paths[len(written)]
        rescue = rescue_results(res, Path(paths[0]))
        kept = f"; written: {', '.join(map(str, written))}" if written else ""
        where = (
            f"the detections were saved to {rescue} (load it with trtwsi.Results.load, or save "
            "it again with Results.save)"
            if rescue is not None
            else "no rescue file could be written either (disk full?)"
        )
        raise OutputWriteError(
            f"could not write {failed} ({type(e).__name__}: {e}); {where}{kept}",
            rescue=rescue,
        ) from e
    except BaseException:
        for w in written:
            with contextlib.suppress(OSError):
                os.unlink(w)
        raise
    return written


def mark_stale(paths: Sequence[Path]) -> list[Path]:
    """Rename existing outputs ``X`` to ``X.stale`` (replacing an older ``.stale``): the slide
    they came from failed since, so they no longer describe it."""
    moved = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            dst = p.with_name(p.name + ".stale")
            with contextlib.suppress(OSError):
                os.replace(p, dst)
                moved.append(dst)
    return moved


def cmd_predict_one(a) -> int:
    from trtwsi.results.tile_errors import check_tile_errors
    from trtwsi.slide import open_slide

    slide_path = a.slide[0]
    outs = validate.single_outputs(slide_path, a.out, a.also)
    validate.check_outputs(outs, a.overwrite)
    validate.check_slide_exists(slide_path)
    device = validate.check_device(a.device)
    validate.check_decode(a.decode, device)
    validate.check_compile(a.compile, device)
    t0 = time.perf_counter()
    slide = open_slide(slide_path, mpp=a.slide_mpp)
    try:
        validate.check_section(slide, a.section)
        models = models_from_args(a)
        with make_predictor(a, models, slide=slide) as pred:
            res = pred.run(section=a.section, region=a.region)
        try:
            check_tile_errors(res, a.max_tile_errors, f"slide {slide_path}")
        except TrtwsiError:
            if a.overwrite:
                stale = mark_stale(outs)
                if stale:
                    print(
                        f"trtwsi predict: earlier outputs renamed {', '.join(map(str, stale))}",
                        file=sys.stderr,
                    )
            raise
        written = save_outputs(res, outs, overwrite=a.overwrite, slide=slide)
    finally:
        slide.close()
    print(res.summary())
    for p in written:
        print(f"wrote {p}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0
