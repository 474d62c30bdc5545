"""Metadata helpers of TIFF-family slides: microns per pixel and OME-XML sanity.

Pure functions over tifffile objects and plain values; :mod:`trtwsi.slide.tiff` uses them to fill
``TiffSlide.properties`` (``mpp_x``, ``mpp_y``, ``mpp_ignored``, ``ome_ignored``).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from trtwsi.slide.tiff_ifd import MAX_IFDS

#: MPP read from resolution tags outside this range (µm/px) is ignored: 72/96/300 dpi defaults.
PLAUSIBLE_MPP = (0.01, 50.0)


def _plausible_mpp(v, props: dict) -> float | None:
    """``v`` as µm/px when inside :data:`PLAUSIBLE_MPP`; else None, recording a present but absurd
    value (e.g. ``MPP = 1e308``) as ``props["mpp_ignored"]`` (str) so it is treated as unknown."""
    f = _positive(v)
    lo, hi = PLAUSIBLE_MPP
    if f is not None and lo <= f <= hi:
        return f
    if v is not None:
        props["mpp_ignored"] = str(v)[:64]
    return None


def _absurd_ome(tif) -> str | None:
    """A description of why the OME-XML of ``tif`` must be ignored, or None when it is sane.

    Absurd: an Image whose ``SizeZ × SizeC × SizeT`` planes exceed :data:`MAX_IFDS` (tifffile
    would allocate one list slot per declared plane: SizeT = 10⁹ → MemoryError)."""
    if not tif.is_ome:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
    except Exception:
        return None  # tifffile copes with unparsable OME-XML itself
    for e in root.iter():
        if not (e.tag.endswith("}Pixels") or e.tag == "Pixels"):
            continue
        planes = 1
        for k in ("SizeZ", "SizeC", "SizeT"):
            try:
                v = int(e.get(k, "1"))
            except ValueError:
                return f"OME-XML Pixels {k}={e.get(k)!r} is not an integer"
            planes *= max(v, 1)
        if planes > MAX_IFDS:
            return (
                f"OME-XML declares {planes} planes (SizeZ={e.get('SizeZ')} SizeC={e.get('SizeC')} "
                f"SizeT={e.get('SizeT')}), more than {MAX_IFDS}; read as a plain TIFF"
            )
    return None


def _positive(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f > 0 and math.isfinite(f) else None


_OME_UNITS_UM = {
    "pm": 1e-6,
    "nm": 1e-3,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
}


def _ome_length_um(value, unit) -> float | None:
    v = _positive(value)
    if v is None:
        return None
    scale = _OME_UNITS_UM.get((unit or "µm").strip())
    return None if scale is None else v * scale


def _resolution_mpp(page) -> tuple[float | None, float | None]:
    """µm/px from XResolution/YResolution + ResolutionUnit (inch, centimeter); None if absent,
    unitless, or implausible for a microscope (72/96/300 dpi defaults)."""
    tags = page.tags
    unit = tags.valueof("ResolutionUnit")
    try:
        unit = int(unit) if unit is not None else 2  # TIFF default: inch
    except (TypeError, ValueError):
        return None, None
    per_unit_um = {2: 25400.0, 3: 10000.0}.get(unit)
    if per_unit_um is None:
        return None, None

    def one(name):
        v = tags.valueof(name)
        if v is None:
            return None
        try:
            res = v[0] / v[1] if isinstance(v, tuple) else float(v)
        except (TypeError, ZeroDivisionError, IndexError):
            return None
        if not res > 0:
            return None
        mpp = per_unit_um / res
        lo, hi = PLAUSIBLE_MPP
        return mpp if lo <= mpp <= hi else None

    mx, my = one("XResolution"), one("YResolution")
    if mx is None:
        return None, None
    return mx, (my or mx)
