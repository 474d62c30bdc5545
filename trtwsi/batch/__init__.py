"""Many slides: jobs and keys, the manifest, the coordinator, and the worker pools.

``run_batch(slides, out_dir, models, params, devices=..., ray=...)``: see
:mod:`trtwsi.batch.coordinator` for outputs, the manifest's fields and rerun semantics.
"""

from trtwsi.batch.coordinator import BatchSummary, plan_batch, run_batch
from trtwsi.batch.jobs import (
    SLIDE_SUFFIXES,
    BatchParams,
    SlideJob,
    discover_slides,
    job_key,
    model_spec,
    slide_fingerprint,
    slide_names,
)
from trtwsi.batch.manifest import MANIFEST_NAME, Manifest, latest_slide_records, read_manifest
from trtwsi.batch.runner import SlideRunner

__all__ = [
    "MANIFEST_NAME",
    "SLIDE_SUFFIXES",
    "BatchParams",
    "BatchSummary",
    "Manifest",
    "SlideJob",
    "SlideRunner",
    "discover_slides",
    "job_key",
    "latest_slide_records",
    "model_spec",
    "plan_batch",
    "read_manifest",
    "run_batch",
    "slide_fingerprint",
    "slide_names",
]
