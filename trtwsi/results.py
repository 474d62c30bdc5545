"""Detections table, Results, and exporters (QuPath GeoJSON, CSV, JSON, overlay image).

Coordinates everywhere are **level-0 slide pixels** (the full-resolution image; QuPath's pixel
coordinates), boxes ``(x1, y1, x2, y2)`` with ``x2 >= x1``, ``y2 >= y1``.

:class:`Detections` is a columnar table (one numpy array per column):

======== ======= =======================================================================
column   dtype   meaning
======== ======= =======================================================================
x1 y1    float64 top-left corner, level-0 px
x2 y2    float64 bottom-right corner, level-0 px
score    float32 confidence in [0, 1]
class_id int32   class index *within its model* (``model_class_names[model][class_id]``)
model    int16   index into ``model_names`` / ``model_class_names``
section  int32   tissue section index (reading order), -1 if none (e.g. a region run)
======== ======= =======================================================================

Class names: ``model_class_names[m]`` lists model ``m``'s classes by id. ``class_names`` is
those lists concatenated in model order, indexed by ``global_class_id = class_offsets[model] +
class_id`` — with one model simply the model's class names, indexed by ``class_id``.

:meth:`Results.save` picks the format from the extension — ``.geojson``, ``.csv``, ``.json``,
``.png``/``.jpg``/``.jpeg`` — and writes atomically (:mod:`trtwsi._atomic`): an existing file
is refused unless ``overwrite=True``; missing parent directories are created.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trtwsi._atomic import atomic_write, check_output_path, write_bytes_atomic
from trtwsi.errors import TrtwsiError

__all__ = [
    "COLUMNS",
    "CSV_COLUMNS",
    "PALETTE",
    "SUPPORTED_EXTENSIONS",
    "Detections",
    "ExportError",
    "Results",
    "UnsupportedOutputFormatError",
]

#: Columns of :class:`Detections` and their dtypes, in order.
COLUMNS: dict[str, np.dtype] = {
    "x1": np.dtype(np.float64),
    "y1": np.dtype(np.float64),
    "x2": np.dtype(np.float64),
    "y2": np.dtype(np.float64),
    "score": np.dtype(np.float32),
    "class_id": np.dtype(np.int32),
    "model": np.dtype(np.int16),
    "section": np.dtype(np.int32),
}

#: Header of the CSV export (``model`` is the model's name there, not its index).
CSV_COLUMNS = (
    "x1",
    "y1",
    "x2",
    "y2",
    "width",
    "height",
    "score",
    "class_id",
    "class_name",
    "model",
    "section",
)

SUPPORTED_EXTENSIONS = (".geojson", ".csv", ".json", ".png", ".jpg", ".jpeg")

#: Class colours (RGB), assigned in order of first appearance of a class name (see class_colors).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 225, 25),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
    (0, 0, 0),
)

_RESULTS_FORMAT = "trtwsi.results"
_RESULTS_FORMAT_VERSION = 1


class ExportError(TrtwsiError, ValueError):
    """Results cannot be written (or read back) as asked."""


class UnsupportedOutputFormatError(ExportError):
    """The output path's extension names no format trtwsi writes."""


# ------------------------------------------------------------------------------------------
# Detections
# ------------------------------------------------------------------------------------------
def _names_lists(class_names, n_models_hint: int | None = None) -> list[list[str]]:
    """Normalize ``list[str]`` (one model) or ``list[list[str]]`` (per model) to the latter."""
    if class_names is None:
        return [[] for _ in range(n_models_hint or 1)]
    cn = list(class_names)
    if cn and all(isinstance(c, str) for c in cn):
        return [[str(c) for c in cn]]
    out = []
    for c in cn:
        if isinstance(c, str):
            raise ExportError(
                "class_names must be a list of names (one model) or a list of lists of names "
                f"(one per model), got a mix: {class_names!r}"
            )
        out.append([str(x) for x in c])
    return out or [[]]


class Detections:
    """Columnar table of detections in level-0 slide px (see the module docstring).

    Build with :meth:`from_arrays`, :meth:`empty`, :meth:`concat` or :meth:`from_merged`; or
    directly from columns: ``Detections(x1=..., y1=..., x2=..., y2=..., score=..., class_id=...,
    model=..., section=..., class_names=..., model_names=...)``. ``model``/``section`` may be
    omitted (0 / -1) or given as scalars. ``class_names``: ``list[str]`` for one model or
    ``list[list[str]]`` per model. ``model_names`` defaults to ``"model0", "model1", …``.
    """

    __slots__ = (*COLUMNS, "model_class_names", "model_names")

    def __init__(
        self,
        *,
        x1,
        y1,
        x2,
        y2,
        score,
        class_id,
        model=0,
        section=-1,
        class_names=None,
        model_names: Sequence[str] | None = None,
    ):
        x1 = np.asarray(x1, dtype=np.float64).reshape(-1)
        n = x1.shape[0]
        cols = {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "score": score, "class_id": class_id}
        cols["model"], cols["section"] = model, section
        for name, dt in COLUMNS.items():
            v = np.asarray(cols[name])
            if v.ndim == 0:
                v = np.full(n, v, dtype=dt)
            v = np.ascontiguousarray(v.reshape(-1), dtype=dt)
            if v.shape[0] != n:
                raise ExportError(f"column {name!r} has {v.shape[0]} rows, x1 has {n}")
            object.__setattr__(self, name, v)
        n_models = int(self.model.max()) + 1 if n else 1
        if model_names is not None:
            n_models = max(n_models, len(model_names))
        mcn = _names_lists(class_names, n_models)
        if model_names is None:
            model_names = ["model"] if len(mcn) == 1 else [f"model{i}" for i in range(len(mcn))]
        model_names = [str(m) for m in model_names]
        while len(mcn) < len(model_names):
            mcn.append([])
        if len(mcn) != len(model_names):
            raise ExportError(
                f"{len(mcn)} class-name lists for {len(model_names)} models {model_names}"
            )
        if n and (self.model.min() < 0 or self.model.max() >= len(model_names)):
            raise ExportError(
                f"model indices must be in 0..{len(model_names) - 1} (models {model_names}), got "
                f"{int(self.model.min())}..{int(self.model.max())}"
            )
        self.model_class_names: list[list[str]] = mcn
        self.model_names: list[str] = model_names

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        boxes,
        scores,
        class_ids,
        *,
        model=0,
        section=-1,
        class_names=None,
        model_names: Sequence[str] | None = None,
    ) -> Detections:
        """From ``boxes`` ``(N, 4)`` ``(x1, y1, x2, y2)`` level-0 px, ``scores`` ``(N,)``,
        ``class_ids`` ``(N,)``; ``model``/``section``: ``(N,)`` arrays or scalars."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return cls(
            x1=b[:, 0],
            y1=b[:, 1],
            x2=b[:, 2],
            y2=b[:, 3],
            score=scores,
            class_id=class_ids,
            model=model,
            section=section,
            class_names=class_names,
            model_names=model_names,
        )

    @classmethod
    def empty(cls, class_names=None, model_names: Sequence[str] | None = None) -> Detections:
        """A table with no rows (and the given models / class names)."""
        z = np.zeros(0)
        return cls.from_arrays(
            np.zeros((0, 4)), z, z, class_names=class_names, model_names=model_names
        )

    @classmethod
    def from_merged(cls, parts, models) -> Detections:
        """Detections from per-model merge results (what the Predictor produces).

        ``parts``: iterable of ``(model_index, merge_result, rows)`` where ``merge_result`` is a
        :class:`trtwsi.merge.MergeResult` over ``rows`` ``(M, 7)`` ``(x1, y1, x2, y2, score,
        class, section)`` (the section of an output is its representative row's). ``models``:
        objects with ``name`` and ``names`` (class names by id, e.g. :class:`trtwsi.model.Model`)
        or dicts with ``"name"`` and ``"classes"``.
        """
        names, classes = [], []
        for m in models:
            if isinstance(m, Mapping):
                names.append(str(m["name"]))
                classes.append(list(m.get("classes") or []))
            else:
                names.append(str(m.name))
                classes.append(list(getattr(m, "names", None) or []))
        tables = []
        for mi, merged, rows in parts:
            rows = np.asarray(rows, dtype=np.float64)
            section = rows[merged.keep, 6] if rows.shape[1] > 6 else -1
            tables.append(
                cls.from_arrays(
                    merged.boxes,
                    merged.scores,
                    merged.classes,
                    model=int(mi),
                    section=section,
                    class_names=classes,
                    model_names=names,
                )
            )
        if not tables:
            return cls.empty(classes, names)
        return cls.concat(tables)

    @staticmethod
    def concat(parts: Sequence[Detections]) -> Detections:
        """Rows of all ``parts`` in order. Models are matched by (name, class names); a model
        that differs from every earlier one is appended, and ``model`` indices are remapped."""
        parts = list(parts)
        if not parts:
            return Detections.empty()
        names: list[str] = []
        classes: list[list[str]] = []
        remapped = []
        for p in parts:
            lut = np.empty(len(p.model_names), dtype=np.int16)
            for k, (nm, cn) in enumerate(zip(p.model_names, p.model_class_names, strict=True)):
                for j, (nm2, cn2) in enumerate(zip(names, classes, strict=True)):
                    if nm == nm2 and cn == cn2:
                        lut[k] = j
                        break
                else:
                    names.append(nm)
                    classes.append(list(cn))
                    lut[k] = len(names) - 1
            remapped.append(lut[p.model] if len(p) else p.model)
        cols = {c: np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS}
        cols["model"] = np.concatenate(remapped)
        return Detections(**cols, class_names=classes, model_names=names)

    # --- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.x1.shape[0])

    def __getitem__(self, key) -> Detections | np.ndarray:
        """``det["score"]``: a column; ``det[mask]``, ``det[indices]``, ``det[a:b]``, ``det[i]``:
        the selected rows as a new Detections (same models and class names)."""
        if isinstance(key, str):
            if key not in COLUMNS:
                raise KeyError(f"no column {key!r}; columns are {list(COLUMNS)}")
            return getattr(self, key)
        if isinstance(key, (int, np.integer)):
            key = [int(key)]
        if isinstance(key, np.ndarray) and key.dtype == bool and key.shape != (len(self),):
            raise IndexError(f"boolean mask of shape {key.shape} for {len(self)} detections")
        cols = {c: getattr(self, c)[key] for c in COLUMNS}
        return Detections(**cols, class_names=self.model_class_names, model_names=self.model_names)

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """The columns by name (the arrays themselves, not copies)."""
        return {c: getattr(self, c) for c in COLUMNS}

    @property
    def boxes(self) -> np.ndarray:
        """``(N, 4)`` float64 ``(x1, y1, x2, y2)`` level-0 px (a new array)."""
        return np.stack([self.x1, self.y1, self.x2, self.y2], axis=1)

    @property
    def class_offsets(self) -> np.ndarray:
        """``(n_models,)`` int64: where each model's classes start in :attr:`class_names`."""
        lens = [len(c) for c in self.model_class_names]
        return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)

    @property
    def class_names(self) -> list[str]:
        """Class names indexed by :attr:`global_class_id`: with one model, that model's class
        names by ``class_id``; with several, the models' lists concatenated in model order."""
        return [c for names in self.model_class_names for c in names]

    @property
    def global_class_id(self) -> np.ndarray:
        """``(N,)`` int64 index into :attr:`class_names` (== ``class_id`` with one model)."""
        return self.class_offsets[self.model] + self.class_id

    def names(self) -> np.ndarray:
        """``(N,)`` object array of per-row class names (``"class<id>"`` for an id its model does
        not name)."""
        flat = self.class_names
        out = np.empty(len(self), dtype=object)
        if not len(self):
            return out
        sizes = np.array([len(c) for c in self.model_class_names], dtype=np.int64)
        known = (self.class_id >= 0) & (self.class_id < sizes[self.model])
        lut = np.array([*flat, ""], dtype=object)
        out[known] = lut[self.global_class_id[known]]
        for i in np.flatnonzero(~known):
            out[i] = f"class{int(self.class_id[i])}"
        return out

    def model_name_per_row(self) -> np.ndarray:
        """``(N,)`` object array: the model name of each row."""
        return np.array(self.model_names, dtype=object)[self.model]

    def to_numpy(self) -> np.ndarray:
        """``(N, 6)`` float64 rows ``(x1, y1, x2, y2, score, class_id)`` in level-0 px."""
        out = np.empty((len(self), 6), dtype=np.float64)
        for k, c in enumerate(("x1", "y1", "x2", "y2", "score", "class_id")):
            out[:, k] = getattr(self, c)
        return out

    def to_records(self) -> list[dict]:
        """One dict per row: the columns (Python scalars) plus ``class_name`` and ``model_name``."""
        cols = {c: getattr(self, c).tolist() for c in COLUMNS}
        cols["score"] = [float(v) for v in _float32_text(self.score)]
        cols["class_name"] = self.names().tolist()
        cols["model_name"] = self.model_name_per_row().tolist()
        keys = list(cols)
        return [dict(zip(keys, row, strict=True)) for row in zip(*cols.values(), strict=True)]

    def to_pandas(self):
        """A pandas DataFrame of the columns plus ``class_name`` and ``model_name`` (needs
        pandas, which trtwsi does not depend on)."""
        try:
            import pandas as pd
        except ImportError as e:
            from trtwsi.errors import MissingDependencyError

            raise MissingDependencyError(
                f"Detections.to_pandas needs pandas, which is not importable ({e}); "
                "install it with: pip install pandas (or use to_numpy / to_records)"
            ) from e
        df = pd.DataFrame(self.columns)
        df["class_name"] = self.names()
        df["model_name"] = self.model_name_per_row()
        return df

    def counts(self) -> dict[str, dict[str, int]]:
        """``{model name: {class name: count}}`` (every class of every model, zeros included)."""
        out: dict[str, dict[str, int]] = {}
        names = self.names()
        for m, (mn, classes) in enumerate(
            zip(self.model_names, self.model_class_names, strict=True)
        ):
            sel = names[self.model == m]
            d = dict.fromkeys(classes, 0)
            for nm, k in zip(*np.unique(sel.astype(str), return_counts=True), strict=True):
                d[str(nm)] = int(k)
            out.setdefault(mn, {}).update(d)
        return out

    def merge(self, **kwargs) -> Detections:
        """Cross-tile merge (:func:`trtwsi.merge.merge_detections`, its defaults unless given in
        ``kwargs``), never across models; the section of a merged row is its representative's."""
        from trtwsi.merge import merge_detections

        r = merge_detections(self.boxes, self.score, self.class_id, groups=self.model, **kwargs)
        out = self[r.keep]
        out.x1[:], out.y1[:], out.x2[:], out.y2[:] = r.boxes.T
        return out

    def __repr__(self) -> str:
        per_model = np.bincount(self.model, minlength=len(self.model_names)).tolist()
        models = ", ".join(f"{m}: {k}" for m, k in zip(self.model_names, per_model, strict=True))
        return f"<Detections n={len(self)} ({models})>"


def _float32_text(v: np.ndarray) -> list[str]:
    """Shortest text that reads back as the same float32 (e.g. ``0.9``, not ``0.899999976…``)."""
    return [str(x) for x in np.asarray(v, dtype=np.float32)]


# ------------------------------------------------------------------------------------------
# colours
# ------------------------------------------------------------------------------------------
def class_colors(model_class_names: Sequence[Sequence[str]]) -> dict[str, tuple[int, int, int]]:
    """RGB colour per class name: :data:`PALETTE` entries in order of first appearance of each
    distinct name (model order, then class id), so the same models always give the same colours
    and a class name shared by two models has one colour; beyond the palette, a colour derived
    from the name's CRC32."""
    out: dict[str, tuple[int, int, int]] = {}
    for names in model_class_names:
        for nm in names:
            if nm in out:
                continue
            k = len(out)
            if k < len(PALETTE):
                out[nm] = PALETTE[k]
            else:
                h = zlib.crc32(nm.encode())
                out[nm] = (64 + (h & 0xBF), 64 + ((h >> 8) & 0xBF), 64 + ((h >> 16) & 0xBF))
    return out


def _color_of(name: str, colors: Mapping[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    if name in colors:
        return colors[name]
    h = zlib.crc32(name.encode())
    return (64 + (h & 0xBF), 64 + ((h >> 8) & 0xBF), 64 + ((h >> 16) & 0xBF))


# ------------------------------------------------------------------------------------------
# JSON helpers
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# writers (module level so other callers can stream a Detections table)
# ------------------------------------------------------------------------------------------
def write_geojson(det: Detections, f) -> None:
    """Write ``det`` to the text stream ``f`` as a QuPath-compatible GeoJSON FeatureCollection.

    Each detection is a Feature whose geometry is a Polygon: the closed ring ``(x1, y1), (x2,
    y1), (x2, y2), (x1, y2), (x1, y1)`` in level-0 px (QuPath's pixel coordinates of the full
    resolution image). ``properties``: ``objectType: "detection"``, ``name`` (class name),
    ``classification: {"name", "color": [r, g, b]}``, ``measurements: {"confidence": score}``,
    ``model`` (model name) and ``section`` (index, -1 if none).

    ``measurements`` is a JSON object (name → number): the form QuPath writes since 0.4 and
    reads in 0.4/0.5 (QuPath 0.3 wrote a list of ``{"name", "value"}``, which newer versions
    still read). QuPath ignores properties it does not know (``model``, ``section``).
    """
    n = len(det)
    bad = ~(
        np.isfinite(det.x1) & np.isfinite(det.y1) & np.isfinite(det.x2) & np.isfinite(det.y2)
    ) | ~np.isfinite(det.score)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ExportError(
            f"detection {i} has a non-finite coordinate or score "
            f"({det.to_numpy()[i].tolist()}); GeoJSON has no NaN/Infinity"
        )
    colors = class_colors(det.model_class_names)
    names = det.names()
    # constant part of the properties per (model, class name)
    frag: dict[tuple[int, str], str] = {}
    for m, nm in set(zip(det.model.tolist(), names.tolist(), strict=True)):
        c = list(_color_of(nm, colors))
        frag[(m, nm)] = (
            '"objectType":"detection","name":'
            + json.dumps(nm)
            + ',"classification":{"name":'
            + json.dumps(nm)
            + ',"color":'
            + json.dumps(c)
            + '},"model":'
            + json.dumps(det.model_names[m])
        )
    f.write('{"type":"FeatureCollection","features":[')
    x1, y1, x2, y2 = (getattr(det, c).tolist() for c in ("x1", "y1", "x2", "y2"))
    scores = _float32_text(det.score)
    models, sections, nms = det.model.tolist(), det.section.tolist(), names.tolist()
    for i in range(n):
        a, b, c, d = repr(x1[i]), repr(y1[i]), repr(x2[i]), repr(y2[i])
        ring = f"[[{a},{b}],[{c},{b}],[{c},{d}],[{a},{d}],[{a},{b}]]"
        f.write(
            ("," if i else "")
            + '\n{"type":"Feature","geometry":{"type":"Polygon","coordinates":['
            + ring
            + ']},"properties":{'
            + frag[(models[i], nms[i])]
            + f',"section":{sections[i]},"measurements":{{"confidence":{scores[i]}}}}}}}'
        )
    f.write("\n]}\n")


def write_csv(det: Detections, f) -> None:
    """Write ``det`` to the text stream ``f`` (opened with ``newline=""``) as CSV: the header
    :data:`CSV_COLUMNS`, then one row per detection (level-0 px; ``model`` = model name;
    floats in their shortest exact text, so they read back bit-identical)."""
    w = csv.writer(f, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    if not len(det):
        return
    x1, y1, x2, y2 = (getattr(det, c) for c in ("x1", "y1", "x2", "y2"))
    w.writerows(
        zip(
            x1.tolist(),
            y1.tolist(),
            x2.tolist(),
            y2.tolist(),
            (x2 - x1).tolist(),
            (y2 - y1).tolist(),
            _float32_text(det.score),
            det.class_id.tolist(),
            det.names().tolist(),
            det.model_name_per_row().tolist(),
            det.section.tolist(),
            strict=True,
        )
    )


def draw_overlay(
    img: np.ndarray, det: Detections, slide_size: tuple[int, int], legend: bool = True
) -> np.ndarray:
    """Draw ``det`` (level-0 px) onto ``img`` (RGB uint8 ``(h, w, 3)``, the whole slide scaled
    to ``img``'s size) in place and return it. ``slide_size``: level-0 ``(width, height)``."""
    import cv2

    h, w = img.shape[:2]
    sx, sy = w / float(slide_size[0]), h / float(slide_size[1])
    colors = class_colors(det.model_class_names)
    names = det.names()
    if len(det):
        tx1 = np.floor(det.x1 * sx).astype(np.int64)
        ty1 = np.floor(det.y1 * sy).astype(np.int64)
        tx2 = np.maximum(np.ceil(det.x2 * sx).astype(np.int64) - 1, tx1)
        ty2 = np.maximum(np.ceil(det.y2 * sy).astype(np.int64) - 1, ty1)
        thick = max(1, round(max(h, w) / 1500))
        rgb = np.array([_color_of(nm, colors) for nm in names.tolist()], dtype=np.uint8)
        order = np.argsort(det.score, kind="stable")  # best boxes drawn last, on top
        small = (tx2 - tx1 <= 2 * thick) & (ty2 - ty1 <= 2 * thick)
        # tiny boxes: fill their few pixels directly (vectorized)
        idx = order[small[order]]
        for dy in range(2 * thick + 1):
            for dx in range(2 * thick + 1):
                m = (tx1[idx] + dx <= tx2[idx]) & (ty1[idx] + dy <= ty2[idx])
                xx, yy = tx1[idx][m] + dx, ty1[idx][m] + dy
                ok = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
                img[yy[ok], xx[ok]] = rgb[idx][m][ok]
        for i in order[~small[order]].tolist():
            c = tuple(int(v) for v in rgb[i])
            cv2.rectangle(img, (int(tx1[i]), int(ty1[i])), (int(tx2[i]), int(ty2[i])), c, thick)
    if legend:
        _draw_legend(img, det, colors)
    return img


def _draw_legend(img: np.ndarray, det: Detections, colors) -> None:
    import cv2

    entries = []
    for model, per_class in det.counts().items():
        for nm, k in per_class.items():
            label = f"{nm} ({k})" if len(det.model_names) == 1 else f"{model}: {nm} ({k})"
            entries.append((label, _color_of(nm, colors)))
    if not entries:
        return
    entries = entries[:20]
    h, w = img.shape[:2]
    scale = float(np.clip(min(h, w) / 1200.0, 0.3, 1.0))
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, th), base = cv2.getTextSize("Mg", font, scale, 1)
    line = th + base + 4
    width = max(cv2.getTextSize(t, font, scale, 1)[0][0] for t, _ in entries) + line + 12
    height = line * len(entries) + 8
    x0, y0 = 4, 4
    x1, y1 = min(w, x0 + width), min(h, y0 + height)
    if x1 <= x0 or y1 <= y0:
        return
    region = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = (0.25 * region + 0.75 * 255).astype(np.uint8)
    for k, (text, color) in enumerate(entries):
        ty = y0 + 4 + k * line
        sw = line - 6
        cv2.rectangle(img, (x0 + 4, ty + 1), (x0 + 4 + sw, ty + 1 + sw), color, -1)
        cv2.putText(img, text, (x0 + 10 + sw, ty + th + 1), font, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _save_image(path: Path, img: np.ndarray, overwrite: bool) -> Path:
    import cv2

    ext = path.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, 90] if ext in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(".jpg" if ext == ".jpeg" else ext, img[..., ::-1], params)
    if not ok:
        raise ExportError(f"OpenCV could not encode the overlay as {ext} for {path}")
    return write_bytes_atomic(path, buf.tobytes(), overwrite=overwrite)
