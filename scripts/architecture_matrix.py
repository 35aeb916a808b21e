"""Run the architecture matrix and commit what it found: docs/results/architectures.json.

    python scripts/architecture_matrix.py
    python scripts/architecture_matrix.py --smoke   # 4 Llama checks, to a temporary folder

runs ``tests/model/test_architectures.py`` (tiny random-weight models of every family, through
tunelab's own training, planning, export, serving and chat code) with ``--matrix-out``, and adds
the provenance every published result carries. The README's support table is rendered from the
file (``scripts/published.py``, kind ``architectures``); a cell is "yes" only when every check
of it passed in that run. ``--smoke`` (for the test suite) runs only ``SMOKE_CHECKS``, the Llama
checks that need no trained run of every family (the module's ``family_runs`` trains all nine);
the other cells then read "not run".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import smoke  # noqa: E402
from provenance import provenance  # noqa: E402

OUT = ROOT / "docs" / "results" / "architectures.json"
# pytest -k: the default Llama family's checks that need no family_runs
SMOKE_CHECKS = "llama and not llama3 and (packed_loss or planner_counts or all_linear)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="one family only, the result in a temporary folder")
    parser.add_argument("--out", type=Path, help=f"result file (default {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    import architectures

    out = smoke.result_path(args.out, OUT.name) if args.smoke else args.out or OUT
    record = provenance()
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "matrix.json"
        completed = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/model/test_architectures.py", "-q",
             "-p", "no:cacheprovider", f"--matrix-out={raw}",
             *(["-k", SMOKE_CHECKS] if args.smoke else [])], cwd=ROOT)
        if not raw.is_file():
            sys.exit(f"the matrix run wrote no result (pytest exit {completed.returncode})")
        cells = json.loads(raw.read_text())["cells"]
    result = {**record, "pytest_exit": completed.returncode, "families": architectures.LABELS,
              "window": architectures.WINDOW, "cells": cells}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (pytest exit {completed.returncode})")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
