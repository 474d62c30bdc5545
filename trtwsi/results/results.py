"""Results of one slide run and how they are saved: QuPath GeoJSON, CSV, JSON, overlay image.

:meth:`Results.save` picks the format from the extension — ``.geojson``, ``.csv``, ``.json``,
``.png``/``.jpg``/``.jpeg`` — and writes atomically (:mod:`trtwsi._util.atomic`): an existing file
is refused unless ``overwrite=True``; missing parent directories are created.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trtwsi._util.atomic import atomic_write, check_output_path
from trtwsi.errors import ExportError, UnsupportedOutputFormatError
from trtwsi.results.detections import COLUMNS, Detections, _float32_text
from trtwsi.results.overlay import _save_image, draw_overlay
from trtwsi.results.writers import write_csv, write_geojson

__all__ = ["SUPPORTED_EXTENSIONS", "Results"]

SUPPORTED_EXTENSIONS = (".geojson", ".csv", ".json", ".png", ".jpg", ".jpeg")

_RESULTS_FORMAT = "trtwsi.results"
_RESULTS_FORMAT_VERSION = 1


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from numpy scalars/arrays, paths, dataclasses, tuples, sets; non-finite
    floats become None (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _version() -> str:
    try:
        from trtwsi import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Results:
    """Everything one run produced.

    Attributes:
        detections: the merged :class:`Detections` (level-0 px).
        timings: seconds per stage (``"read"``, ``"infer"``, …, ``"total"``).
        errors: problems that did not stop the run, one dict each (e.g. a skipped tile:
            ``{"type", "message", "level", "tile", "region"}``).
        slide: the slide's :class:`~trtwsi.slide.base.SlideInfo` as a dict (``path``, ``format``,
            ``width``, ``height``, ``mpp``, ``levels``, ``properties``).
        models: one dict per model (``name``, ``weights``, ``sha256``, ``classes``, ``min_conf``,
            ``iou``, ``backend``, ``reason``, …), in model-index order.
        params: run parameters (``tile``, ``overlap``, ``mpp``, ``merge``, …).
        sections: the tissue sections run (``index``, ``bbox`` level-0 ``(x, y, w, h)``,
            ``area``); empty for a region run.
        n_tiles: tiles processed.
        created: ISO-8601 local time with offset.
        version: trtwsi version that produced it.
        thumbnail: optional RGB uint8 thumbnail of the whole slide, used by overlay exports when
            no slide is given (not stored in the JSON export).
    """

    detections: Detections
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: list[dict] = dataclasses.field(default_factory=list)
    slide: dict = dataclasses.field(default_factory=dict)
    models: list[dict] = dataclasses.field(default_factory=list)
    params: dict = dataclasses.field(default_factory=dict)
    sections: list[dict] = dataclasses.field(default_factory=list)
    n_tiles: int = 0
    created: str = dataclasses.field(default_factory=_now)
    version: str = dataclasses.field(default_factory=_version)
    thumbnail: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    # --- summary -----------------------------------------------------------------------------
    @property
    def total_seconds(self) -> float:
        """``timings["total"]``, else the sum of the stage timings."""
        if "total" in self.timings:
            return float(self.timings["total"])
        return float(sum(self.timings.values()))

    def summary(self) -> str:
        """Human-readable summary: slide, counts per class per model, tiles, time, errors."""
        lines = []
        s = self.slide or {}
        if s:
            mpp = s.get("mpp")
            mpp_s = f", {mpp:.4g} µm/px" if isinstance(mpp, (int, float)) else ""
            lines.append(
                f"slide: {s.get('path') or '<array>'} ({s.get('width')}×{s.get('height')} px"
                f"{mpp_s})"
            )
        det = self.detections
        lines.append(f"detections: {len(det)}")
        backends = {m.get("name"): m.get("backend") for m in self.models if isinstance(m, Mapping)}
        for model, per_class in det.counts().items():
            be = backends.get(model)
            lines.append(f"  {model}" + (f" [{be}]" if be else "") + f": {sum(per_class.values())}")
            w = max((len(c) for c in per_class), default=0)
            for c, k in per_class.items():
                lines.append(f"    {c:<{w}}  {k}")
        t = self.total_seconds
        rate = f", {self.n_tiles / t:.1f} tiles/s" if t > 0 and self.n_tiles else ""
        lines.append(f"tiles: {self.n_tiles} in {t:.2f} s{rate}")
        stages = [(k, v) for k, v in self.timings.items() if k != "total"]
        if stages:
            lines.append("time per stage: " + ", ".join(f"{k} {v:.2f} s" for k, v in stages))
        lines.append(f"errors: {len(self.errors)}")
        for e in self.errors[:5]:
            lines.append(f"  - {e.get('message', e) if isinstance(e, Mapping) else e}")
        if len(self.errors) > 5:
            lines.append(f"  … and {len(self.errors) - 5} more")
        return "\n".join(lines)

    def __repr__(self) -> str:
        per = ", ".join(
            f"{c}: {k}" for d in self.detections.counts().values() for c, k in d.items() if k
        )
        name = Path(str(self.slide.get("path"))).name if self.slide.get("path") else "<array>"
        return (
            f"<Results {name}: {len(self.detections)} detections ({per or 'none'}), "
            f"{self.n_tiles} tiles, {self.total_seconds:.2f} s, {len(self.errors)} errors>"
        )

    # --- saving ------------------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike,
        overwrite: bool = False,
        slide=None,
        *,
        max_size: int = 2048,
    ) -> Path:
        """Write the results; the format follows the extension (case-insensitive):

        - ``.geojson``: QuPath-compatible FeatureCollection, one detection Feature per row.
        - ``.csv``: header + one row per detection (:data:`CSV_COLUMNS`).
        - ``.json``: everything (metadata + detection columns); read back with :meth:`load`.
        - ``.png`` / ``.jpg`` / ``.jpeg``: the slide thumbnail (longer side <= ``max_size``)
          with the boxes in class colours and a legend; needs ``slide`` (a
          :class:`~trtwsi.slide.base.Slide`) or :attr:`thumbnail`.

        Atomic; refuses an existing file unless ``overwrite=True`` (OutputExistsError); creates
        missing parent directories. Returns the path written.
        """
        path = Path(path)
        ext = path.suffix.lower()
        writers = {
            ".geojson": self._save_geojson,
            ".csv": self._save_csv,
            ".json": self._save_json,
        }
        if ext in (".png", ".jpg", ".jpeg"):
            check_output_path(path, overwrite)  # fail before the thumbnail is read
            img = self.overlay(slide=slide, max_size=max_size)
            return _save_image(path, img, overwrite)
        if ext not in writers:
            raise UnsupportedOutputFormatError(
                f"cannot save results as {ext or 'a file without extension'!r} ({path}): "
                f"supported extensions are {', '.join(SUPPORTED_EXTENSIONS)}"
            )
        with atomic_write(path, "w", overwrite=overwrite, newline="") as f:
            writers[ext](f)
        return path

    def _save_geojson(self, f) -> None:
        write_geojson(self.detections, f)

    def _save_csv(self, f) -> None:
        write_csv(self.detections, f)

    def to_dict(self) -> dict:
        """The JSON document :meth:`save` writes for ``.json`` (plain Python types)."""
        det = self.detections
        cols = {c: getattr(det, c).tolist() for c in COLUMNS}
        cols["score"] = [float(v) for v in _float32_text(det.score)]
        meta = {
            "format": _RESULTS_FORMAT,
            "format_version": _RESULTS_FORMAT_VERSION,
            "version": self.version,
            "created": self.created,
            "slide": self.slide,
            "models": self.models,
            "params": self.params,
            "sections": self.sections,
            "n_tiles": self.n_tiles,
            "timings": self.timings,
            "errors": self.errors,
        }
        out = _jsonable(meta)
        out["detections"] = {
            "count": len(det),
            "model_names": list(det.model_names),
            "class_names": [list(c) for c in det.model_class_names],
            "columns": cols,
        }
        return out

    def _save_json(self, f) -> None:
        json.dump(self.to_dict(), f, allow_nan=False, separators=(",", ":"))
        f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        """Read a ``.json`` written by :meth:`save` (the thumbnail is not stored in it)."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise UnsupportedOutputFormatError(
                f"Results.load reads the .json export of Results.save; got {path.name!r} "
                "(GeoJSON, CSV and images do not hold the whole results)"
            )
        with open(path, encoding="utf-8") as fh:
            try:
                doc = json.load(fh)
            except json.JSONDecodeError as e:
                raise ExportError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("format") != _RESULTS_FORMAT:
            raise ExportError(
                f'{path} is not a trtwsi results file (no "format": {_RESULTS_FORMAT!r} key)'
            )
        if int(doc.get("format_version", 0)) > _RESULTS_FORMAT_VERSION:
            raise ExportError(
                f"{path} has results format version {doc['format_version']}, newer than this "
                f"trtwsi ({_version()}) reads ({_RESULTS_FORMAT_VERSION}); upgrade trtwsi"
            )
        d = doc["detections"]
        cols = {c: np.asarray(d["columns"][c], dtype=dt) for c, dt in COLUMNS.items()}
        det = Detections(**cols, class_names=d["class_names"], model_names=d["model_names"])
        return cls(
            detections=det,
            timings=doc.get("timings", {}),
            errors=doc.get("errors", []),
            slide=doc.get("slide", {}),
            models=doc.get("models", []),
            params=doc.get("params", {}),
            sections=doc.get("sections", []),
            n_tiles=int(doc.get("n_tiles", 0)),
            created=doc.get("created", ""),
            version=doc.get("version", ""),
        )

    # --- overlay -----------------------------------------------------------------------------
    def overlay(self, slide=None, max_size: int = 2048, legend: bool = True) -> np.ndarray:
        """RGB uint8 thumbnail with the detection boxes drawn in class colours.

        The thumbnail is ``slide.thumbnail(max_size)`` when ``slide`` is given, else
        :attr:`thumbnail`. Boxes are scaled from level-0 px by thumbnail size / slide size and
        drawn at least 1 px (a box smaller than a thumbnail pixel becomes a dot).
        """
        if slide is not None:
            thumb = slide.thumbnail(max_size)
            sw, sh = slide.width, slide.height
        elif self.thumbnail is not None:
            thumb = self.thumbnail
            sw, sh = self.slide.get("width"), self.slide.get("height")
            if not sw or not sh:
                raise ExportError(
                    "the overlay needs the slide size (Results.slide['width'/'height']) to scale "
                    "the boxes onto Results.thumbnail"
                )
        else:
            raise ExportError(
                "an overlay image needs the slide: pass slide=open_slide(...) to save(), or set "
                "Results.thumbnail"
            )
        img = np.ascontiguousarray(np.asarray(thumb, dtype=np.uint8)[..., :3]).copy()
        return draw_overlay(img, self.detections, (sw, sh), legend=legend)
