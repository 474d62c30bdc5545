"""Test-only crash injection for batch workers (kept out of the package).

A process started with this folder on ``PYTHONPATH`` imports this module at start-up. When
``TRTWSI_TEST_CRASH_ONCE=NAME:MARKER`` is set, the batch worker that gets slide ``NAME`` exits at
once (``os._exit(86)``) if the file ``MARKER`` does not exist yet, after creating it: one crash,
then the retry runs normally. Works for spawned local workers and Ray workers alike, since both
start fresh interpreters with the environment.
"""

import os

_HOOK = os.environ.get("TRTWSI_TEST_CRASH_ONCE")

if _HOOK:
    from pathlib import Path

    from trtwsi.batch import runner as _runner

    _original = _runner.SlideRunner.stream

    def _crash_once(self, jobs):
        name, _, marker = _HOOK.partition(":")

        def checked():
            for job in jobs:
                if job.name == name and marker and not os.path.exists(marker):
                    Path(marker).write_text(f"crashed pid {os.getpid()}\n")
                    os._exit(86)  # the worker dies while its runtime holds this slide
                yield job

        return _original(self, checked())

    _runner.SlideRunner.stream = _crash_once
