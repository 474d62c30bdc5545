"""The machine a benchmark ran on, for its results JSON (shared by the bench/ modules)."""

from __future__ import annotations

import os
import platform
import re
import socket
from pathlib import Path


def host_info(runs_on: str) -> dict:
    """Host CPU model, usable cores, memory, Python and OS; ``runs_on`` names what was timed."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cores": cores,
        "memory_gib": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": f"CPU: {cpu}, {cores} cores ({runs_on} runs on the host)",
    }


def machine_name(info: dict) -> str:
    """A file-name slug for the machine, e.g. ``amd-epyc-2c``."""
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")[:40] or "cpu"
    return f"{slug}-{info['cores']}c"


def update_results(path: Path, update: dict, machine: dict, derive=None) -> Path:
    """Merge ``update`` into the results JSON at ``path`` (other sections kept), add what
    ``derive(merged data) -> dict`` computes from the merged data (e.g. speedups over every
    recorded case), stamp the machine and time, and write it atomically (tmp file + rename)."""
    import json
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(update)
    if derive is not None:
        data.update(derive(data))
    data["machine"] = machine
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path
