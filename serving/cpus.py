"""How many CPUs this process may use. Standard library only, so the command line can ask before
torch (and its OpenMP) loads."""

from __future__ import annotations

import math
import os
from pathlib import Path


def cpu_quota() -> int:
    """CPUs this process may use: the cgroup quota (containers) and the affinity mask, not the
    machine's core count."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
