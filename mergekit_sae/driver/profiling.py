"""The per-step profile of a run (recipe ``profile: true``): the process's peak resident memory.

On Linux the peak (``VmHWM``) is reset at the start of each step through
``/proc/self/clear_refs``, so each step reports its own peak; elsewhere the peak since the
process started (``ru_maxrss``) is reported.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new peak-memory window (Linux); False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB since the last reset (or since start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def rss_mib(field: str = "VmRSS") -> float:
    """Current resident memory of this process in MiB (0.0 where it cannot be read).

    ``field`` "RssAnon" counts only anonymous memory (tensors, the scoring model), without the
    file pages of memory-mapped weights, which the kernel can drop at any time."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0
