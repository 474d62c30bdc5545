"""What to read: tissue sections of a slide and the tile grids (with their read chunks)."""

from trtwsi.plan.grid import Chunk, TileGrid, axis_positions
from trtwsi.plan.tissue import Section, find_sections, full_slide_section, reading_order

__all__ = [
    "Chunk",
    "Section",
    "TileGrid",
    "axis_positions",
    "find_sections",
    "full_slide_section",
    "reading_order",
]
