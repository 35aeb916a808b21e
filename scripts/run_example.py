"""Run a shipped example from the CLI exactly as its README says, and keep what it measured.

    python scripts/run_example.py examples/sentiment

runs ``tunelab train CONFIG --overwrite`` and ``tunelab eval CONFIG`` in a scratch output
directory, each as a new user would, and writes ``EXAMPLE/results/``: the run's
``manifest.json``, ``metrics.jsonl`` and ``eval/<split>.json``, both commands' output, and
``result.json`` (command, git commit, machine, load, wall time of each command, the manifest and
the evaluation without its per-example predictions). The example's README renders its numbers
from ``result.json`` (``scripts/published.py``).

    python scripts/run_example.py examples/sentiment --smoke

``--smoke`` runs the same two commands in seconds, for the test suite: on the example's config
shrunk by ``benchmarks/smoke.py`` (the test suite's tiny model, the first lines of each data
file, two steps), in this process (``tunelab.cli`` rather than a new interpreter per command),
and writes what it kept to a temporary folder instead of ``EXAMPLE/results/``.
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
import smoke  # noqa: E402
from provenance import provenance  # noqa: E402


def run(command: list[str], log: Path, in_process: bool = False) -> float:
    """Run one CLI command (``in_process``: in this process), its output to ``log``; its wall
    time in seconds."""
    started = time.perf_counter()
    if in_process:
        returncode = smoke.tunelab(command[1:], log)
    else:
        with open(log, "w") as handle:
            returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                        cwd=ROOT, env={**os.environ, "COLUMNS": "120"}).returncode
    if returncode != 0:  # the log goes with the scratch folder: show its end
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"{tail}\n{' '.join(command)} failed (exit {returncode})")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", type=Path, help="an example folder with a config.yaml")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: tiny model and data, in this "
                             "process, results to a temporary folder (or --out)")
    parser.add_argument("--out", type=Path, help="with --smoke: the folder for the results")
    args = parser.parse_args(argv)
    example = args.example.resolve()
    config = example / "config.yaml"
    origin = provenance()
    results = smoke.result_path(args.out, "results") if args.smoke else example / "results"
    with tempfile.TemporaryDirectory(prefix="tunelab-example-") as scratch:
        if args.smoke:
            model = smoke.tiny_model(Path(scratch) / "tiny-model")
            config = smoke.smoke_config(config, Path(scratch) / "config", model)
        staging = Path(scratch) / "results"
        staging.mkdir()
        output = f"output_dir={scratch}/runs"
        wall_s = {
            "train": run(["tunelab", "train", str(config), "--overwrite", "--set", output],
                         staging / "train.log", args.smoke),
            "eval": run(["tunelab", "eval", str(config), "--set", output], staging / "eval.log",
                        args.smoke),
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
        results.mkdir(parents=True, exist_ok=True)  # what others keep here (assess/) stays
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
