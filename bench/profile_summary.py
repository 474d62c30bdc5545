"""Summarize a py-spy speedscope profile: per thread, the functions with the most samples.

``python bench/profile_summary.py PROFILE.json [--top 40] [--match TEXT]``

py-spy writes one profile per thread (``--subprocesses``: per process and thread). For each one
with at least ``--min`` samples this prints the sample count and the ``--top`` functions by
inclusive samples (a function counts once per sample however deep it recurs), import machinery
left out. ``--match`` keeps only samples whose stack has a frame whose file or name contains
TEXT (e.g. ``pipeline.py``). With ``py-spy record --idle`` samples are wall time (waiting
included); without it, CPU; with ``--gil``, time holding the GIL. Divide by the sampling rate
(``-r``) for seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys


def summarize(doc: dict, top: int = 40, minimum: int = 30, match: str | None = None) -> list:
    """``[(profile name, samples, [(frame label, count), ...]), ...]``, largest first."""
    frames = doc["shared"]["frames"]
    labels = [
        f"{f['name']} {f.get('file', '').rsplit('/', 1)[-1]}:{f.get('line', '')}" for f in frames
    ]
    out = []
    for prof in doc["profiles"]:
        stacks = [s for s in prof.get("samples", []) if s]
        if match:
            stacks = [s for s in stacks if any(match in labels[i] for i in s)]
        if len(stacks) < minimum:
            continue
        counts: collections.Counter = collections.Counter()
        for s in stacks:
            counts.update({labels[i] for i in s if "importlib" not in labels[i]})
        out.append((prof.get("name", "?"), len(stacks), counts.most_common(top)))
    return sorted(out, key=lambda p: -p[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--min", type=int, default=30, help="skip threads with fewer samples")
    ap.add_argument("--match", default=None)
    args = ap.parse_args(argv)
    with open(args.profile) as f:
        doc = json.load(f)
    for name, n, rows in summarize(doc, args.top, args.min, args.match):
        print(f"== {name}: {n} samples")
        for label, count in rows:
            print(f"  {count:6d}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
