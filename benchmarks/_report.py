"""Helpers the benchmark scripts share for their reports in results.md."""
from __future__ import annotations

import json
import os
import platform
from typing import Any


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_section(path: str, section: str, begin: str, end: str) -> None:
    """Put `section` (which starts with `begin` and ends with `end`) into `path` in
    place of an earlier one between the same markers; keep everything else."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    b, e = text.find(begin), text.find(end)
    if b >= 0 and e > b:
        new = text[:b] + section.rstrip("\n") + "\n" + text[e + len(end):].lstrip("\n")
    else:
        new = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section
    with open(path, "w") as f:
        f.write(new)


def write_data(results_md: str, name: str, payload: Any) -> str:
    """Write ``payload`` as ``data/<name>.json`` beside ``results_md`` (what
    ``plot_results.py`` draws the figures from); return the path."""
    folder = os.path.join(os.path.dirname(os.path.abspath(results_md)), "data")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
    return path
