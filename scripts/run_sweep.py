"""Run a shipped sweep from the CLI exactly as the README says, and keep what it measured.

    python scripts/run_sweep.py examples/sentiment/sweep.yaml --workers 2

runs ``tunelab sweep SWEEP --workers N`` and then ``tunelab compare`` on it in a scratch folder,
as a user would, and keeps the small outputs in ``EXAMPLE/results/sweep/<sweep name>/``:
``final.json`` (best trial against the base config on the test split), ``compare.html``,
``trials.json`` (each trial's values, state, objective with its interval, the validation losses
pruning saw, steps trained, start and end) and both commands' output. The sweep's record —
provenance, wall time, trials, final word — goes under its name into
``EXAMPLE/results/sweep/result.json``, which the README renders (``scripts/published.py``, kind
``sweep``). The same sweep without pruning is a second sweep file run the same way
(``sweep-unpruned.yaml``); the renderer sets the two side by side. Weights are not kept.

    python scripts/run_sweep.py examples/sentiment/sweep.yaml --smoke

``--smoke`` (for the test suite) runs the same commands on the sweep shrunk to 2 trials of 2
steps over the example's config shrunk by ``benchmarks/smoke.py`` (the test suite's tiny model,
a few examples), with 1 worker: ``tunelab sweep`` and ``tunelab compare`` run in this process,
the worker is the one subprocess ``tunelab sweep`` starts. What it keeps goes to a temporary
folder, not ``EXAMPLE/results/``.
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

# --smoke: the sweep cut to two short trials (validation loss after each step, for the pruner)
SMOKE_SWEEP = {"trials": 2, "overrides": {"train.max_steps": 2, "train.batch_tokens": 256,
                                          "train.eval_every": 1, "train.save_every": 0,
                                          "train.samples": 0}}


def run(command: list[str], log: Path, cwd: Path, in_process: bool = False) -> float:
    """Run one CLI command from ``cwd`` (``in_process``: in this process, whose folder stays:
    a smoke sweep's config names its output folder), its output to ``log``; its wall time in
    seconds."""
    started = time.perf_counter()
    if in_process:
        returncode = smoke.tunelab(command[1:], log)
    else:
        with open(log, "w") as handle:
            returncode = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                        cwd=cwd, env={**os.environ, "COLUMNS": "120"}).returncode
    if returncode != 0:
        sys.exit(f"{log.read_text()[-3000:]}\n{' '.join(command)} failed (exit {returncode})")
    return time.perf_counter() - started


def smoke_sweep(sweep_file: Path, folder: Path, model_dir: Path, output_dir: Path) -> Path:
    """``sweep_file`` shrunk to ``SMOKE_SWEEP`` over its base config shrunk to a smoke run,
    the sweep's directory and runs in ``output_dir``."""
    import yaml

    raw = yaml.safe_load(sweep_file.read_text())
    base = smoke.smoke_config(sweep_file.parent / raw["base"], folder / "base", model_dir,
                              output_dir=output_dir)
    raw.update(SMOKE_SWEEP, base=str(base), output_dir=str(output_dir))
    path = folder / sweep_file.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def trial_rows(sweep_dir: Path) -> list[dict]:
    """Every trial of the finished sweep as plain data, read back from its Optuna study."""
    from tunelab.experiments.sweep import load_study, open_sweep

    opened = open_sweep(sweep_dir)
    max_steps = opened.sweep.base.train.max_steps
    rows = []
    for trial in load_study(opened).get_trials(deepcopy=False):
        run_dir = Path(trial.user_attrs.get("run_dir", ""))
        rows.append({
            "number": trial.number, "state": trial.state.name.lower(), "params": trial.params,
            "value": trial.value, "ci": trial.user_attrs.get("ci"),
            "val_loss_after": trial.user_attrs.get("val_loss"),
            # What the pruner saw: the validation loss (negated for a maximised objective).
            "reported": {str(step): value for step, value in trial.intermediate_values.items()},
            "steps_trained": _steps_trained(run_dir, trial.intermediate_values),
            "max_steps": max_steps, "worker": trial.user_attrs.get("worker"),
            "retry_of": trial.system_attrs.get("failed_trial"),
            "started": _iso(trial.datetime_start), "ended": _iso(trial.datetime_complete),
            "duration_s": trial.duration.total_seconds() if trial.duration else None})
    return rows


def _steps_trained(run_dir: Path, reported: dict[int, float]) -> int | None:
    """Optimizer steps the trial ran: from its metrics; a pruned trial (whose run directory is
    removed) stopped at the last step it reported."""
    metrics = run_dir / "metrics.jsonl"
    if run_dir.name and metrics.is_file():
        steps = [json.loads(line).get("step", 0) for line in metrics.open() if '"loss"' in line]
        return max(steps, default=0)
    return max(reported, default=None)


def _iso(moment) -> str | None:
    return moment.isoformat(timespec="milliseconds") if moment else None  # Optuna: local time


def trials_wall_s(rows: list[dict]) -> float:
    """From the first trial's start to the last trial's end: the search itself."""
    from datetime import datetime

    starts = [datetime.fromisoformat(row["started"]) for row in rows if row["started"]]
    ends = [datetime.fromisoformat(row["ended"]) for row in rows if row["ended"]]
    return round((max(ends) - min(starts)).total_seconds(), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_file", type=Path, help="a sweep YAML inside an example folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a "
                        "scratch folder, removed)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: 2 tiny trials, 1 worker, results to a "
                             "temporary folder (or --out)")
    parser.add_argument("--out", type=Path, help="with --smoke: the folder for the results")
    args = parser.parse_args(argv)
    sweep_file = recorded = args.sweep_file.resolve()
    results = (smoke.result_path(args.out, "sweep") if args.smoke
               else sweep_file.parent / "results" / "sweep")
    origin = provenance()
    with tempfile.TemporaryDirectory(prefix="tunelab-sweep-") as scratch:
        work = args.keep.resolve() if args.keep else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.smoke:
            args.workers = 1
            sweep_file = smoke_sweep(sweep_file, Path(scratch) / "smoke",
                                     smoke.tiny_model(Path(scratch) / "tiny-model"),
                                     output_dir=work / "runs")
        staging = Path(scratch) / "staging"
        staging.mkdir()
        wall_s = run(["tunelab", "sweep", str(sweep_file), "--workers", str(args.workers)],
                     staging / "sweep.log", cwd=work, in_process=args.smoke)
        load_at_end = [round(x, 2) for x in os.getloadavg()]
        sweep_dir = next(path.parent for path in (work / "runs").glob("*/sweep.json"))
        run(["tunelab", "compare", str(sweep_dir), "--output", str(staging / "compare.html")],
            staging / "compare.log", cwd=work, in_process=args.smoke)
        rows = trial_rows(sweep_dir)
        (staging / "trials.json").write_text(json.dumps(rows, indent=1) + "\n")
        final = json.loads((sweep_dir / "final.json").read_text())
        shutil.copy(sweep_dir / "final.json", staging / "final.json")
        record = json.loads((sweep_dir / "sweep.json").read_text())
        origin["machine"]["load_average_at_end"] = load_at_end
        entry = {**origin, "sweep_file": os.path.relpath(recorded, ROOT),
                 "workers": args.workers, "spec": record["spec"], "metric": record["metric"],
                 "direction": record["direction"],
                 "wall_s": {"sweep_command": round(wall_s, 1), "trials": trials_wall_s(rows)},
                 "trials": rows, "final": final}
        target = results / sweep_dir.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
        write_entry(results / "result.json", sweep_dir.name, entry)
    print(f"wrote {target} (tunelab sweep {wall_s:.0f} s)")


def write_entry(path: Path, name: str, entry: dict) -> None:
    """Put one sweep's record into the shared result file; the file's own provenance is that
    of the first sweep with pruning (the one the README leads with)."""
    result = json.loads(path.read_text()) if path.is_file() else {"sweeps": {}}
    result["sweeps"][name] = entry
    lead = next((e for e in result["sweeps"].values() if e["spec"]["pruner"] != "none"), entry)
    result.update({key: lead[key] for key in ("command", "git_commit", "git_dirty",
                                                 "started_utc", "machine")})
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
