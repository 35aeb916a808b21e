"""One multitask adapter against three single-task adapters with the same total steps.

    python scripts/multitask_experiment.py            # examples/multitask/config.yaml

Trains, from the CLI as a user would, the multitask config (``train.max_steps`` S over all its
tasks) and, for each task, a single-task run of the same model, method, learning rate and batch
size on that task's data alone for S / (number of tasks) steps: the four runs together take
2·S steps, the three single-task runs S between them. With ``data.mixing: weights`` and equal
weights each task gets a third of the multitask run's tokens, as much as its single-task run.

Each task is then evaluated on its test examples (``tunelab eval``): the multitask adapter (and
the base model, for reference) and the task's single-task adapter. The difference multitask −
single-task is paired on the same test examples (``eval.multitask.paired_difference``: paired
bootstrap of the task's primary metric, corpus metrics resampled as corpus metrics). The cost
is the training tokens, steps and wall time of each run.

Writes ``examples/multitask/results/result.json`` with its provenance (command, commit,
machine, load); the README renders it. Runs are kept under ``--workdir`` and reused when
finished (a run whose manifest says finished is not retrained; an existing eval file is not
recomputed), so an interrupted experiment continues where it stopped.

    python scripts/multitask_experiment.py --smoke   # seconds, result in a temporary folder

``--smoke`` runs the same experiment in seconds, for the test suite: on the config shrunk by
``benchmarks/smoke.py`` (the test suite's tiny model, the first lines of each task's files, one
step per task), every command in this process (``tunelab.cli`` rather than a new interpreter),
runs and result in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import smoke  # noqa: E402
from provenance import provenance  # noqa: E402

from tunelab.config import dump_config, load_config  # noqa: E402
from tunelab.eval.multitask import paired_difference, task_config  # noqa: E402
from tunelab.eval.result import read_eval  # noqa: E402


def cli(args: list[str], log: Path, in_process: bool = False) -> float:
    """Run ``tunelab ARGS`` as a user would (``in_process``, for --smoke: in this process),
    output to ``log``; its wall time in seconds."""
    started = time.perf_counter()
    if in_process:
        returncode = smoke.tunelab(args, log)
    else:
        with open(log, "w") as handle:
            returncode = subprocess.run([sys.executable, "-m", "tunelab", *args], stdout=handle,
                                        stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, "COLUMNS": "120"}).returncode
    if returncode != 0:
        sys.exit(f"tunelab {' '.join(args)} failed (exit {returncode}); see {log}")
    return round(time.perf_counter() - started, 1)


def trained(config_path: Path, run_dir: Path, log: Path, in_process: bool) -> float | None:
    """Train unless the run already finished; the wall time when trained now."""
    manifest = run_dir / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("status") == "finished":
        return None
    return cli(["train", str(config_path), "--overwrite"], log, in_process)


def evaluated(config_path: Path, eval_files: list[Path], log: Path, *, base: bool,
              in_process: bool) -> float | None:
    """Evaluate unless every eval file is there; the wall time when evaluated now."""
    if all(path.is_file() for path in eval_files):
        return None
    return cli(["eval", str(config_path), *([] if base else ["--no-base"])], log, in_process)


def run_cost(run_dir: Path, train_wall_s: float | None, eval_wall_s: float | None) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {"steps": manifest["steps"], "train_tokens": manifest["train_tokens"],
            "train_s": manifest["train_s"], "run_wall_s": manifest["wall_s"],
            "train_command_wall_s": train_wall_s, "eval_command_wall_s": eval_wall_s,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def realised_mixture(run_dir: Path) -> dict:
    """Configured token shares against the ones drawn (summed over metrics.jsonl)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    drawn: dict[str, int] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        for name, tokens in json.loads(line).get("task_tokens", {}).items():
            drawn[name] = drawn.get(name, 0) + tokens
    total = sum(drawn.values())
    return {"mixing": manifest["mixture"]["mixing"], "configured": manifest["mixture"]["rates"],
            "realised": {name: tokens / total for name, tokens in drawn.items()},
            "tokens": drawn}


def metric(result, model: str, name: str) -> dict:
    value = result.models[model].metrics[name]
    return {"value": value.value, "ci": value.ci, "n": value.n}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples/multitask/config.yaml")
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs/multitask-experiment")
    parser.add_argument("--out", type=Path, help="result file (default "
                        "examples/multitask/results/result.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: tiny model and data, in this "
                             "process, runs and result in a temporary folder")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory(prefix="tunelab-multitask-smoke-") as scratch:
            work = Path(scratch)
            model = smoke.tiny_model(work / "tiny-model")
            n_tasks = len(load_config(args.config).data.tasks)
            config = smoke.smoke_config(args.config, work / "config", model, steps=n_tasks)
            experiment(config, work / "runs", smoke.result_path(args.out, "result.json"),
                       in_process=True, recorded=args.config)
    else:
        experiment(args.config, args.workdir.resolve(),
                   args.out or ROOT / "examples/multitask/results/result.json",
                   in_process=False, recorded=args.config)


def experiment(config_path: Path, work: Path, out: Path, *, in_process: bool,
               recorded: Path) -> None:
    """Train and evaluate the multitask run and the single-task runs of ``config_path`` under
    ``work``; the comparison and its cost, with provenance, to ``out`` (``recorded``: the
    config the result file names; a smoke run's is a shrunk copy of it)."""
    origin = provenance()
    work.mkdir(parents=True, exist_ok=True)
    multi = load_config(config_path)
    multi.output_dir = str(work)
    n_tasks = len(multi.data.tasks)
    single_steps = multi.train.max_steps // n_tasks
    configs = {"multitask": (multi, work / "multitask.yaml")}
    for task in multi.data.tasks:
        single = task_config(multi, task)
        single.name = f"single-{task.name}"
        single.train.max_steps = single_steps
        configs[task.name] = (single, work / f"single-{task.name}.yaml")
    costs = {}
    for key, (config, path) in configs.items():
        dump_config(config, path)
        train_s = trained(path, config.run_dir, work / f"{key}-train.log", in_process)
        if key == "multitask":
            files = [config.run_dir / "eval" / f"{t.eval.split}-{t.name}.json"
                     for t in config.data.tasks]
        else:
            files = [config.run_dir / "eval" / f"{config.eval.split}.json"]
        eval_s = evaluated(path, files, work / f"{key}-eval.log", base=key == "multitask",
                           in_process=in_process)
        costs[key] = run_cost(config.run_dir, train_s, eval_s)
        print(f"{key}: trained and evaluated ({costs[key]})", flush=True)

    tasks = {}
    for task in multi.data.tasks:
        single_config = configs[task.name][0]
        mine = read_eval(multi.run_dir / "eval" / f"{task.eval.split}-{task.name}.json")
        alone = read_eval(single_config.run_dir / "eval" / f"{task.eval.split}.json")
        primary = mine.primary_metric
        difference = paired_difference(alone, mine, task.eval)
        tasks[task.name] = {
            "task": mine.task, "metric": primary, "n": mine.n, "split": mine.split,
            "base": metric(mine, "base", primary),
            "single_task": metric(alone, "tuned", primary),
            "multitask": metric(mine, "tuned", primary),
            "multitask_minus_single": {key: difference[key] for key in
                                       ("delta", "ci", "p_value", "significant", "test")},
            "multitask_minus_base": mine.comparison[primary].model_dump(),
            "single_val_loss": json.loads((single_config.run_dir / "manifest.json")
                                          .read_text()).get("val_loss_after"),
            "multitask_val_loss": _last_task_loss(multi.run_dir, task.name),
        }
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {**origin, "config": str(recorded.resolve().relative_to(ROOT)),
              "multitask_steps": multi.train.max_steps, "single_task_steps": single_steps,
              "batch_tokens": multi.train.batch_tokens, "lr": multi.train.lr,
              "method": multi.method.model_dump(), "mixture": realised_mixture(multi.run_dir),
              "tasks": tasks, "cost": costs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def _last_task_loss(run_dir: Path, task: str) -> float | None:
    losses = [json.loads(line).get("val_loss_tasks", {}).get(task)
              for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = [loss for loss in losses if loss is not None]
    return measured[-1] if measured else None  # None: the config has no validation data


if __name__ == "__main__":
    main()
