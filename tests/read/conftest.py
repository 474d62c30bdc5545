"""The slide-file fixtures of tests/slide (real files written by real writers)."""

from tests.slide.conftest import *  # noqa: F403
