"""Detections, Results and their writers (QuPath GeoJSON, CSV, JSON, overlay), and evaluation."""

from trtwsi.errors import ExportError, UnsupportedOutputFormatError
from trtwsi.results.detections import COLUMNS, Detections
from trtwsi.results.overlay import PALETTE, class_colors, draw_overlay
from trtwsi.results.results import SUPPORTED_EXTENSIONS, Results
from trtwsi.results.writers import CSV_COLUMNS, write_csv, write_geojson

__all__ = [
    "COLUMNS",
    "CSV_COLUMNS",
    "PALETTE",
    "SUPPORTED_EXTENSIONS",
    "Detections",
    "ExportError",
    "Results",
    "UnsupportedOutputFormatError",
    "class_colors",
    "draw_overlay",
    "write_csv",
    "write_geojson",
]
