"""trtwsi: ultralytics YOLO detectors over whole-slide images, as fast as the GPU allows.

Public API (imported lazily so `import trtwsi` stays light and GPU modules load only when used)::

    trtwsi.open_slide(src) -> Slide
    trtwsi.Model(weights, classes=None, min_conf=0.25, iou=0.45, backend="auto", fallback_to_pt=True)
    trtwsi.Predictor(slide, models=[...], ...).run(section=None, region=None) -> Results
    with trtwsi.Runtime(models, device="cuda") as rt:      # one per GPU, many slides
        for outcome in rt.stream(paths): outcome.results / outcome.error
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "open_slide": "trtwsi.slide",
    "Slide": "trtwsi.slide",
    "Level": "trtwsi.slide",
    "Section": "trtwsi.plan.tissue",
    "find_sections": "trtwsi.plan.tissue",
    "TileGrid": "trtwsi.plan.grid",
    "Model": "trtwsi.engines.model",
    "Predictor": "trtwsi.predictor",
    "Runtime": "trtwsi.runtime",
    "SlideRequest": "trtwsi.runtime",
    "SlideOutcome": "trtwsi.runtime",
    "SlideOptions": "trtwsi.plan.slide_plan",
    "Results": "trtwsi.results",
    "Detections": "trtwsi.results",
    "TrtwsiError": "trtwsi.errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "synthetic":
        return importlib.import_module("trtwsi.synthetic")
    raise AttributeError(f"module 'trtwsi' has no attribute {name!r}")
