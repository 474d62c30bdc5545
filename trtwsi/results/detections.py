"""The Detections table: one numpy array per column, level-0 slide px.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from trtwsi.errors import ExportError

__all__ = ["COLUMNS", "Detections"]

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
        objects with ``name`` and ``names`` (class names by id, e.g. :class:`trtwsi.engines.model.Model`)
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
