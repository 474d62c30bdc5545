"""Generated slides with ground truth (tests, benchmarks, the demo) and a simulated tiled
detector (merge tests and benchmark)."""

from trtwsi.synthetic._texture import GLASS_RGB
from trtwsi.synthetic.scene import CLASS_NAMES, Scene
from trtwsi.synthetic.truth import GENERATOR_VERSION, GroundTruth, sidecar_path
from trtwsi.synthetic.writer import make_array, make_slide

__all__ = [
    "CLASS_NAMES",
    "GENERATOR_VERSION",
    "GLASS_RGB",
    "GroundTruth",
    "Scene",
    "make_array",
    "make_slide",
    "sidecar_path",
]
