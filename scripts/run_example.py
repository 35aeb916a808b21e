"""Run a shipped example from the CLI exactly as its README says, and keep what it measured.

    python scripts/run_example.py examples/sentiment

runs ``tunelab train CONFIG --overwrite`` and ``tunelab eval CONFIG`` in a scratch output
directory, each as a new user would, and writes ``EXAMPLE/results/``: the run's
``manifest.json``, ``metrics.jsonl`` and ``eval/<split>.json``, both commands' output, and
``result.json`` (command, git commit, machine, load, wall time of each command, the manifest and
the evaluation without its per-example predictions). The example's README renders its numbers
from ``result.json`` (``scripts/published.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from provenance import provenance  # noqa: E402


def run(command: list[str], log: Path) -> float:
    """Run one CLI command, tee its output to ``log``; its wall time in seconds."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "COLUMNS": "120"})
    if completed.returncode != 0:  # the log goes with the scratch folder: show its end
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"{tail}\n{' '.join(command)} failed (exit {completed.returncode})")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", type=Path, help="an example folder with a config.yaml")
    args = parser.parse_args(argv)
    example = args.example.resolve()
    config = example / "config.yaml"
    origin = provenance()
    results = example / "results"
    with tempfile.TemporaryDirectory(prefix="tunelab-example-") as scratch:
        staging = Path(scratch) / "results"
        staging.mkdir()
        output = f"output_dir={scratch}/runs"
        wall_s = {
            "train": run(["tunelab", "train", str(config), "--overwrite", "--set", output],
                         staging / "train.log"),
            "eval": run(["tunelab", "eval", str(config), "--set", output], staging / "eval.log"),
        }
        runs = sorted((Path(scratch) / "runs").iterdir())
        run_dir = next(path for path in runs if (path / "manifest.json").is_file())
        manifest = json.loads((run_dir / "manifest.json").read_text())
        split_files = sorted((run_dir / "eval").glob("*.json"))
        evaluation = json.loads(split_files[0].read_text())
        for path in [run_dir / "manifest.json", run_dir / "metrics.jsonl", *split_files]:
            target = staging / path.relative_to(run_dir)
            target.parent.mkdir(exist_ok=True)
            shutil.copy(path, target)
        for outcome in evaluation["models"].values():
            outcome.pop("predictions", None)
        origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result = {**origin, "example": str(example.relative_to(ROOT)),
                  "wall_s": {name: round(seconds, 1) for name, seconds in wall_s.items()},
                  "manifest": manifest, "eval": evaluation}
        (staging / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        results.mkdir(exist_ok=True)  # what other scripts keep here (results/assess) stays
        for entry in staging.iterdir():
            target = results / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            shutil.move(str(entry), target)
    print(f"wrote {results} (train {wall_s['train']:.0f} s, eval {wall_s['eval']:.0f} s)")


if __name__ == "__main__":
    main()
