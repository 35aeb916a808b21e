"""Multitask evaluation: each task of a ``data.tasks`` run with its own metric and intervals.

Every task is evaluated as a single-task run of its own would be: ``evaluate`` on the task's
data and ``eval`` section, with the run's one adapter. Each task's result is an ordinary
``EvalResult`` written to ``eval/<split>-<task>.json``, so the report shows one section per task.

``paired_difference`` compares two evaluations of the same test examples (e.g. the multitask
adapter against a single-task adapter) on the task's primary metric, paired example by example.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console

from tunelab.config import Config, EvalConfig, TaskConfig
from tunelab.data.mixture import task_data
from tunelab.errors import ConfigError, RunError
from tunelab.eval.evaluate import evaluate
from tunelab.eval.result import EvalResult
from tunelab.eval.stats import paired_comparison
from tunelab.eval.tasks import Task


def task_config(config: Config, task: TaskConfig) -> Config:
    """The multitask config seen as a single-task config of one task: its data, its eval."""
    return config.model_copy(update={"data": task_data(config.data, task), "eval": task.eval},
                             deep=True)


def evaluate_tasks(config: Config, *, run_dir: str | Path | None = None, base: bool = True,
                   tuned: bool = True, console: Console | None = None
                   ) -> dict[str, EvalResult]:
    """Evaluate every task that has an eval section; task name → its ``evaluate`` result."""
    console = console or Console()
    evaluated = [task for task in config.data.tasks if task.eval is not None]
    if not evaluated:
        raise ConfigError("no task of data.tasks has an eval section", where="data.tasks",
                          fix="add e.g. eval: {task: classification, labels: [negative, "
                          "positive]} to the tasks to evaluate")
    results = {}
    for task in evaluated:
        console.rule(f"task {task.name}")
        results[task.name] = evaluate(task_config(config, task), run_dir=run_dir, base=base,
                                      tuned=tuned, console=console, task_name=task.name)
    skipped = [task.name for task in config.data.tasks if task.eval is None]
    if skipped:
        console.print(f"[yellow]Not evaluated (no eval section): {', '.join(skipped)}")
    return results


def multitask_refused(command: str, config: Config, where: str = "data.tasks") -> ConfigError:
    """Assessments and sweeps judge one task's metric on one test split; a multitask config
    has one per task (and no top-level eval section), so it gets this error up front."""
    names = ", ".join(task.name for task in config.data.tasks)
    return ConfigError(
        f"tunelab {command} takes a single-task config; this one trains "
        f"{len(config.data.tasks)} tasks at once (data.tasks: {names}), each with its own "
        "metric and test split", where=where,
        fix=f"run tunelab {command} on each task's own config (its files, templates and eval "
        "section as a single-task config, e.g. examples/sentiment/config.yaml), then put the "
        "chosen values in the multitask config; compare mixtures (data.mixing, weights) by "
        "training each one and running tunelab eval, which scores every task")


def paired_difference(first: EvalResult, second: EvalResult, eval_cfg: EvalConfig, *,
                      model: str = "tuned") -> dict:
    """``second − first`` on the primary metric over the same examples, with the paired
    bootstrap interval and p-value.

    Both results' outputs are scored again with the task, so corpus metrics (entity F1, chrF)
    are resampled as corpus metrics; a result whose examples differ is refused.
    """
    outcomes = [result.models.get(model) for result in (first, second)]
    if outcomes[0] is None or outcomes[1] is None:
        raise RunError(f"both evaluations need the {model!r} model", where="paired_difference",
                       fix=f"evaluate both runs with the {model} model")
    golds_shown = [[p.gold for p in outcome.predictions] for outcome in outcomes]
    if first.task != second.task or golds_shown[0] != golds_shown[1]:
        raise RunError("the two evaluations are not of the same examples (task, count or "
                       "references differ), so they cannot be paired", where="paired_difference",
                       fix="evaluate both runs on the same split of the same test file")
    if eval_cfg.task != first.task:
        raise RunError(f"the evaluations are of task {first.task!r} but the eval section given "
                       f"is of {eval_cfg.task!r}", where="paired_difference",
                       fix="pass the eval section the two evaluations were run with")
    task = Task.from_config(eval_cfg)
    golds = [task.gold(text) for text in golds_shown[0]]
    paired = []
    for result, outcome in zip((first, second), outcomes, strict=True):
        predictions = [task.parse(p.prediction)[0] for p in outcome.predictions]
        scored = task.score(golds, predictions, [None] * len(golds))
        if not math.isclose(scored.metrics[task.primary]["value"],
                            outcome.metrics[task.primary].value, rel_tol=1e-9, abs_tol=1e-12):
            raise RunError(f"scoring its outputs again does not give its {task.primary}",
                           where=result.name, fix="run tunelab eval again to rewrite it")
        paired.append(scored.paired)
    comparison = paired_comparison([paired[0]], [paired[1]], n=len(golds),
                                   exact_test=task.exact_test, n_resamples=eval_cfg.bootstrap,
                                   seed=eval_cfg.seed)
    return {"metric": task.primary, **comparison}
