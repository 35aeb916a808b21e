"""Sweeps on the tiny model: the sweep file's errors, parallel workers on one journal, a worker
killed mid-trial, pruning, and the final comparison on the test split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import quiet
from sweeps import write_sweep

from tunelab.errors import ConfigError
from tunelab.experiments.space import load_sweep
from tunelab.experiments.sweep import (
    create_sweep,
    describe,
    load_study,
    run_worker,
    worker_environment,
)

optuna = pytest.importorskip("optuna")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sentiment"
TrialState = optuna.trial.TrialState


def states(study) -> list[str]:
    return [trial.state.name for trial in study.trials]


@pytest.mark.parametrize("text, line, words", [
    ("space:\n  train.lrr: [1.0e-3, 1.0e-2]\n", 4, ["unknown config key 'train.lrr'", "'lr'"]),
    ("space:\n  train.lr: {log_uniform: [0, 1.0e-3]}\n", 4, ["log range needs low > 0"]),
    ("space:\n  train.lr: {log_uniform: [1.0e-2, 1.0e-3]}\n", 4, ["is empty"]),
    ("space:\n  method.r:\n    - 8\n    - 0\n", 6, ["method.r", "0", "greater than or equal"]),
    ("space:\n  method.r: {uniform: [4, 32]}\n", 4, ["whole number", "int: [4, 32]"]),
    ("space:\n  data.train_on: [completion, everything]\n", 4, ["everything"]),
    ("space:\n  train: [1, 2]\n", 4, ["config section"]),
    ("trails: 8\nspace:\n  train.lr: [1.0e-3]\n", 3, ["unknown key 'trails'", "'trials'"]),
    ("sampler: grid\ntrials: 3\nspace:\n  method.r: [2, 4]\n", 4, ["only 2 combinations"]),
    ("sampler: grid\nspace:\n  train.lr: {uniform: [0.1, 0.2]}\n", 5, ["grid needs lists"]),
    ("pruner: median\noverrides:\n  train.eval_every: 0\nspace:\n  method.r: [2, 4]\n", 3,
     ["train.eval_every is 0"]),
    ("overrides:\n  train.max_stepz: 4\nspace:\n  method.r: [2, 4]\n", 4, ["'max_steps'"]),
])
def test_sweep_file_errors_name_the_line_and_the_fix(text, line, words, tmp_path,
                                                     tiny_model_dir):
    path = write_sweep(tmp_path, tiny_model_dir, text)
    with pytest.raises(ConfigError) as caught:
        load_sweep(path)
    message = caught.value.render()
    assert f"{path}:{line}:" in message, message
    for word in words:
        assert word in message, message


def test_a_valid_sweep_file_loads_with_its_defaults(tmp_path, tiny_model_dir):
    sweep = load_sweep(write_sweep(tmp_path, tiny_model_dir, (
        "sampler: grid\nspace:\n  method.r: [2, 4]\n  data.train_on: [completion, all]\n"
        "  data.prompt: ['Review: {text}\\nSentiment:', '{text}\\nIs it good?']\n")))
    assert sweep.trials == 8  # the whole grid
    assert (sweep.metric, sweep.direction) == ("accuracy", "maximize")
    assert [param.key for param in sweep.params] == ["method.r", "data.train_on", "data.prompt"]


def test_two_workers_on_one_journal_run_each_trial_once(tmp_path, tiny_model_dir):
    """The CLI's --workers 2: every trial runs exactly once, in its own run directory."""
    path = write_sweep(tmp_path, tiny_model_dir, (
        "trials: 4\nsampler: random\nspace:\n  train.lr: {log_uniform: [1.0e-3, 3.0e-2]}\n"
        "  method.r: [2, 4]\n"))
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "sweep", str(path),
                           "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    opened = create_sweep(load_sweep(path))  # reopens the same sweep
    study = load_study(opened)
    assert states(study) == ["COMPLETE"] * 4
    for trial in study.trials:
        run_dir = Path(trial.user_attrs["run_dir"])
        assert run_dir.name == f"trial-{trial.number:03d}"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # trained once
    assert len(list(opened.directory.glob("trial-*"))) == 4
    assert len(list((opened.directory / "workers").glob("*.lock"))) == 2
    final = json.loads((opened.directory / "final.json").read_text())
    assert final["best"]["trial"] == study.best_trial.number
    paired = final["test"]["best_minus_base_config"]
    assert paired["ci"][0] <= paired["delta"] <= paired["ci"][1] and paired["n"] == 16
    assert "Best trial" in done.stdout and "test split" in done.stdout


def test_a_sigkilled_worker_loses_only_its_trial_which_is_retried(tmp_path, tiny_model_dir):
    path = write_sweep(tmp_path, tiny_model_dir, (
        "trials: 2\nsampler: random\nretry_failed: true\nspace:\n  method.r: [2, 4]\n"))
    opened = create_sweep(load_sweep(path))
    worker = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "sweep", "--join",
                               str(opened.directory)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    study = load_study(opened)
    deadline = time.monotonic() + 300
    while not any(t.state == TrialState.RUNNING and "run_dir" in t.user_attrs
                  for t in study.get_trials()):
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    killed = next(t for t in study.get_trials() if t.state == TrialState.RUNNING)

    run_worker(opened.directory, console=quiet())  # reclaims the dead trial, then finishes

    trials = study.get_trials()
    assert trials[killed.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == killed.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2
    assert len(trials) == 3  # two trials and one retry: nothing lost, nothing extra


def test_without_retry_a_killed_trial_stays_failed_and_the_sweep_ends(tmp_path,
                                                                      tiny_model_dir):
    path = write_sweep(tmp_path, tiny_model_dir, (
        "trials: 2\nsampler: random\nspace:\n  method.r: [2, 4]\n"))
    opened = create_sweep(load_sweep(path))
    study = load_study(opened)
    dead = study.ask()  # a trial owned by a worker whose process is gone
    (opened.directory / "workers").mkdir(exist_ok=True)
    (opened.directory / "workers" / "gone.lock").touch()
    dead.set_user_attr("worker", "gone")

    run_worker(opened.directory, console=quiet())

    assert states(study) == ["FAIL", "COMPLETE"]


def test_pruning_stops_a_trial_worse_than_the_median(tmp_path, tiny_model_dir):
    """A finished trial with a far lower validation loss at every step: the next trial,
    whatever it samples, is pruned at its first evaluation and leaves no run directory."""
    path = write_sweep(tmp_path, tiny_model_dir, (
        "trials: 2\nsampler: random\npruner: median\nobjective: {metric: val_loss}\n"
        "space:\n  train.lr: {log_uniform: [1.0e-4, 1.0e-3]}\n"))
    opened = create_sweep(load_sweep(path))
    study = load_study(opened)
    study.add_trial(optuna.trial.create_trial(
        params={"train.lr": 5e-4},
        distributions={"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True)},
        value=0.01, intermediate_values={2: 0.01, 4: 0.01}))

    run_worker(opened.directory, console=quiet())

    pruned = study.trials[1]
    assert pruned.state == TrialState.PRUNED
    assert list(pruned.intermediate_values) == [2]  # stopped at its first evaluation
    assert pruned.intermediate_values[2] > 0.5  # the real validation loss of the tiny model
    assert not Path(pruned.user_attrs["run_dir"]).exists()
    assert describe(study, opened)["trials"][1]["last_step"] == 2  # what compare shows


def test_pruning_reports_the_negated_loss_for_a_maximised_objective(tmp_path, tiny_model_dir):
    path = write_sweep(tmp_path, tiny_model_dir, (
        "trials: 1\nsampler: random\npruner: median\n"
        "space:\n  train.lr: {log_uniform: [1.0e-3, 1.0e-2]}\n"))
    opened = create_sweep(load_sweep(path))
    run_worker(opened.directory, console=quiet())
    trial = load_study(opened).trials[0]
    assert trial.state == TrialState.COMPLETE and 0.0 <= trial.value <= 1.0  # accuracy
    records = map(json.loads, open(Path(trial.user_attrs["run_dir"]) / "metrics.jsonl"))
    losses = {r["step"]: r["val_loss"] for r in records if "val_loss" in r and r["step"] > 0}
    assert trial.intermediate_values == {step: -loss for step, loss in losses.items()}
    assert list(losses) == [2, 4]  # every eval_every steps, and after training


def test_local_workers_share_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_environment(2, cpu_count=2)["OMP_NUM_THREADS"] == "1"
    assert worker_environment(3, cpu_count=16)["OMP_NUM_THREADS"] == "5"
    assert worker_environment(4, cpu_count=2)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert worker_environment(2, cpu_count=2)["OMP_NUM_THREADS"] == "6"


def test_the_shipped_sweeps_search_lr_rank_and_two_prompts_and_differ_only_in_pruning():
    """The README's pruning saving compares these two files: nothing else may differ."""
    pruned, unpruned = (load_sweep(EXAMPLE / name) for name in ("sweep.yaml",
                                                                 "sweep-unpruned.yaml"))
    assert pruned.trials >= 8 and pruned.spec.pruner != "none" and unpruned.spec.pruner == "none"
    assert {param.key for param in pruned.params} == {"train.lr", "method.r", "data.prompt"}
    assert len(next(p for p in pruned.params if p.key == "data.prompt").choices) == 2
    assert pruned.base.train.eval_every < pruned.base.train.max_steps  # reports to prune on
    same = lambda sweep: sweep.spec.model_dump(exclude={"name", "pruner"})  # noqa: E731
    assert same(pruned) == same(unpruned)
    assert pruned.base == unpruned.base
