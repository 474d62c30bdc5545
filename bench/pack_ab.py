"""One results JSON from a ``bench/gpu_ab.sh`` run (its ``results.tgz`` or that unpacked).

    python bench/pack_ab.py RESULTS --what "..." --tree a="this tree (...)" --tree b="REV" \\
        [--tests "..."] --out bench/results/pipeline-<gpu>-ab-<topic>.json

Takes the ``slides-<run>.json`` of every ``--tree`` run (in the order given), the device and
host of the first, and ``gpu-tests.txt``'s last line unless ``--tests`` says it; writes
``{bench, date, gpu, host, model, batch, goals, what, gpu_tests, runs: {run: {tree,
slides}}}`` and prints each slide's wall time and tissue Gpx/s (fresh / again).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path


def _files(results: Path) -> dict[str, bytes]:
    """The ``slides-*.json`` and ``gpu-tests.txt`` of a results.tgz or folder, by file name
    (read from the archive, never extracted: no path in it is trusted)."""

    def keep(name: str) -> bool:
        return name == "gpu-tests.txt" or (name.startswith("slides-") and name.endswith(".json"))

    if results.is_dir():
        return {p.name: p.read_bytes() for p in results.iterdir() if keep(p.name) and p.is_file()}
    out = {}
    with tarfile.open(results) as t:
        for m in t.getmembers():
            name = Path(m.name).name
            if m.isfile() and keep(name):
                out[name] = t.extractfile(m).read()
    return out


def pack(results: Path, trees: dict[str, str], what: str, tests: str | None) -> dict:
    files = _files(results)
    runs = {}
    for name, tree in trees.items():
        data = files.get(f"slides-{name}.json")
        if data is None:
            raise SystemExit(f"slides-{name}.json is not in {results}: did run {name!r} finish?")
        runs[name] = {"tree": tree, "slides": json.loads(data)["slides"]}
    first = json.loads(files[f"slides-{next(iter(trees))}.json"])
    if tests is None and "gpu-tests.txt" in files:
        lines = [
            x for x in files["gpu-tests.txt"].decode(errors="replace").splitlines() if x.strip()
        ]
        tests = lines[-1] if lines else None
    doc = {k: first.get(k) for k in ("bench", "date", "gpu", "host", "model", "batch", "goals")}
    doc.update(what=what, gpu_tests=tests, runs=runs)
    return doc


def summary(doc: dict) -> list[str]:
    out = []
    for name, run in doc["runs"].items():
        for size, s in run["slides"].items():
            again = s.get("again") or {}
            out.append(
                f"{name:8} {size:5} {s['seconds']} / {again.get('seconds')} s  "
                f"{s['tissue_gpx_per_s']} / {again.get('tissue_gpx_per_s')} tissue Gpx/s"
            )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="results.tgz of gpu_ab.sh, or its unpacked folder")
    ap.add_argument("--tree", action="append", required=True, metavar="RUN=DESCRIPTION")
    ap.add_argument("--what", required=True, help="the machine, the session, the run order")
    ap.add_argument("--tests", help="what the GPU tests gave (default: gpu-tests.txt's last line)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in a.tree)
    doc = pack(a.results, trees, a.what, a.tests)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print("\n".join(summary(doc)))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
