"""Where a benchmark result came from: command, git commit, machine, load.

Every result file under ``benchmarks/results/`` carries this block, so a number in a README can
be traced to the script, the commit and the conditions that produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def provenance() -> dict:
    """The command line, the commit (and whether the tree had uncommitted changes), the machine
    and the load average when the run started."""
    return {
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src",
                               "benchmarks")),
        "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def machine() -> dict:
    """CPU model, core count, library versions and the load average right now."""
    import torch

    description = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "python": platform.python_version(),
                   "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    for name in ("transformers", "peft"):
        try:
            description[name] = __import__(name).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name()
    return description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
