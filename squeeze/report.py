"""JSON out: one format for every report and record squeeze writes (``--json`` files, ``squeeze.json``,
``config.json``) and for JSON printed on stdout.

Two-space indent, a trailing newline, and anything JSON does not know (paths, dtypes) as its
``str``; files are replaced atomically so a reader never sees half a report. Also the peak memory
every report carries (:func:`peak_rss_mb`), here so that reporting it imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB: the kernel's high-water mark of its
    address space (``VmHWM``, KiB). Not ``ru_maxrss``: Linux carries that across ``exec``, so a
    child forked by a large parent (``squeeze bench``'s measuring processes) starts at the
    parent's size. ``ru_maxrss`` (KiB on Linux) where /proc has no VmHWM."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` to ``path`` through a temp file in the same folder, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(to_json(obj))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def print_json(obj) -> None:
    print(to_json(obj), end="")
