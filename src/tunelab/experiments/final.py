"""The sweep's final word: the best trial against the base config on the test split.

Trials are chosen on validation data, so the best trial's validation score is optimistic (it
won a contest on that data). The honest comparison trains the base config as it is, evaluates
it and the best trial on the **test** split, which no choice has seen, and pairs them example
by example: the difference, its bootstrap interval and p-value. ``repeat_best`` retrains the
best configuration with other seeds, so the noise between seeds is measured, not assumed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.errors import RunError
from tunelab.eval.stats import paired_comparison, spread
from tunelab.eval.tasks import Task
from tunelab.experiments.space import trial_config
from tunelab.experiments.sweep import OpenSweep, evaluate_run, objective_value
from tunelab.run.directory import RunDir, write_json

FINAL_FILE = "final.json"


def best_trial(study):
    """The best finished trial, or a RunError when no trial finished."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise RunError("no trial of the sweep finished, so there is no best trial",
                       where=str(study.study_name), fix="read the failed trials' errors "
                       "(tunelab compare SWEEP_DIR), fix the space, and run the sweep again")
    return study.best_trial


def final_word(study, opened: OpenSweep, *, repeat_best: int = 0,
               console: Console | None = None) -> dict[str, Any]:
    """Train the base config, evaluate it and the best trial on test, pair them; write
    ``final.json`` in the sweep directory and return it."""
    console = console or Console()
    sweep, quiet = opened.sweep, Console(quiet=True)
    best = best_trial(study)
    best_config = trial_config(sweep.base, best.params, name=f"trial-{best.number:03d}",
                               output_dir=opened.directory)
    base_config = trial_config(sweep.base, {}, name="base", output_dir=opened.directory)
    base_dir = _trained(base_config, quiet)
    final: dict[str, Any] = {
        "metric": sweep.metric, "direction": sweep.direction,
        "best": {"trial": best.number, "params": best.params, "validation": best.value,
                 "run_dir": str(best_config.run_dir)},
        "base": {"run_dir": str(base_dir)}}
    if base_config.eval is not None and base_config.data.test:
        final["test"] = _test_comparison(best_config, base_config, quiet)
    else:
        final["test"] = None
        final["note"] = ("no test split (data.test) or no eval section in the base config: "
                         "the final comparison on held-out data was skipped")
    if repeat_best:
        final["seed_repeats"] = repeat_best_trial(best, opened, repeat_best, quiet)
    path = opened.directory / FINAL_FILE
    write_json(path, final)
    final["path"] = str(path)
    render_final(final, console)
    return final


def _trained(config, console: Console) -> Path:
    """The run directory of ``config``, trained now unless a finished run is already there."""
    from tunelab.train.loop import train

    if RunDir(config.run_dir).finished():
        return config.run_dir
    return train(config, overwrite=True, console=console).run_dir


def _test_comparison(best_config, base_config, console: Console) -> dict[str, Any]:
    """Both runs on the test split, each under its own prompt, paired per example."""
    eval_cfg = base_config.eval
    best = evaluate_run(best_config, best_config.run_dir, split="test", console=console,
                        base=True)
    base = evaluate_run(base_config, base_config.run_dir, split="test", console=console)
    primary = best["primary_metric"]
    best_scores = [p["score"] for p in best["models"]["tuned"]["predictions"]]
    base_scores = [p["score"] for p in base["models"]["tuned"]["predictions"]]
    paired = paired_comparison([base_scores], [best_scores],
                               exact_test=Task.from_config(eval_cfg).exact_test,
                               n_resamples=eval_cfg.bootstrap, seed=eval_cfg.seed)
    result = {
        "metric": primary, "n": best["n"],
        "best": best["models"]["tuned"]["metrics"][primary],
        "base_config": base["models"]["tuned"]["metrics"][primary],
        "untuned_model": best["models"]["base"]["metrics"][primary],
        # The per-example scores' mean: the metric itself for accuracy and exact match.
        "best_minus_base_config": {key: paired[key] for key in
                                   ("delta", "ci", "p_value", "p_text", "significant", "test",
                                    "n")},
        "best_minus_untuned": best["comparison"].get(primary),
    }
    return result


def repeat_best_trial(best, opened: OpenSweep, seeds: int, console: Console) -> dict[str, Any]:
    """Retrain the best configuration with ``seeds`` other seeds; the objective's spread."""
    from tunelab.train.loop import train

    sweep = opened.sweep
    first = sweep.base.train.seed + 1
    values = []
    for seed in range(first, first + seeds):
        config = trial_config(sweep.base, best.params, name=f"best-seed-{seed}",
                              output_dir=opened.directory, seed=seed)
        result = train(config, overwrite=True, console=console)
        value, _ = objective_value(config, result.val_loss_after, result.run_dir, sweep.metric,
                                   console=console)
        values.append({"seed": seed, "value": value, "run_dir": str(result.run_dir)})
    numbers = [entry["value"] for entry in values] + [best.value]
    return {"runs": values, "best_trial_seed": sweep.base.train.seed,
            "best_trial_value": best.value,
            "spread": {k: v for k, v in spread(numbers).items() if k != "n_variants"},
            "n_seeds": len(numbers)}


def render_final(final: dict[str, Any], console: Console) -> None:
    best, metric = final["best"], final["metric"]
    console.print(f"Best trial {best['trial']} on validation: {metric} {best['validation']:.4f} "
                  f"with {best['params']}")
    test = final.get("test")
    if test:
        delta = test["best_minus_base_config"]
        mark = "significant" if delta["significant"] else "not significant"
        console.print(
            f"On the test split (n={test['n']}): best {_metric(test['best'])}, base config "
            f"{_metric(test['base_config'])}, untuned model {_metric(test['untuned_model'])}; "
            f"best − base config {delta['delta']:+.3f} [{delta['ci'][0]:+.3f}, "
            f"{delta['ci'][1]:+.3f}] {delta.get('p_text') or delta['p_value']} ({mark})")
    elif final.get("note"):
        console.print(f"[yellow]{final['note']}")
    repeats = final.get("seed_repeats")
    if repeats:
        spread_ = repeats["spread"]
        console.print(f"Best configuration over {repeats['n_seeds']} seeds: {metric} "
                      f"{spread_['mean']:.4f} ± {spread_['std']:.4f} (min {spread_['min']:.4f}, "
                      f"max {spread_['max']:.4f})")
    console.print(f"Written to {final.get('path')}")


def _metric(metric: dict[str, Any]) -> str:
    return f"{metric['value']:.3f} [{metric['ci'][0]:.3f}, {metric['ci'][1]:.3f}]"
