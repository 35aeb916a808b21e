"""Run the architecture matrix and commit what it found: docs/results/architectures.json.

    python scripts/architecture_matrix.py

runs ``tests/model/test_architectures.py`` (tiny random-weight models of every family, through
tunelab's own training, planning, export, serving and chat code) with ``--matrix-out``, and adds
the provenance every published result carries. The README's support table is rendered from the
file (``scripts/published.py``, kind ``architectures``); a cell is "yes" only when every check
of it passed in that run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from provenance import provenance  # noqa: E402

OUT = ROOT / "docs" / "results" / "architectures.json"


def main() -> int:
    import architectures

    record = provenance()
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "matrix.json"
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/model/test_architectures.py", "-q",
             "-p", "no:cacheprovider", f"--matrix-out={raw}"], cwd=ROOT)
        if not raw.is_file():
            sys.exit(f"the matrix run wrote no result (pytest exit {completed.returncode})")
        cells = json.loads(raw.read_text())["cells"]
    result = {**record, "pytest_exit": completed.returncode, "families": architectures.LABELS,
              "window": architectures.WINDOW, "cells": cells}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} (pytest exit {completed.returncode})")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
