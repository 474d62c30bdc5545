"""Runtime: one per device, long-lived; owns engines, streams, rings and reader processes, and
runs slides through them (see :mod:`trtwsi.runtime.runtime`)."""

from trtwsi.runtime.runtime import Runtime, SlideOutcome, SlideRequest, pick_device, pick_pipeline

__all__ = ["Runtime", "SlideOutcome", "SlideRequest", "pick_device", "pick_pipeline"]
