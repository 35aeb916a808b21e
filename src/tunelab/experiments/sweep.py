"""Hyperparameter and data-format sweeps: an Optuna study whose trials are ordinary runs.

A sweep directory holds ``sweep.json`` (the validated sweep: base config, space, objective),
``journal.log`` (Optuna's journal storage, safe for several processes; ``--storage URL`` puts
the study in any Optuna RDB instead) and one run directory per trial, ``trial-NNN``.

Workers are plain processes that each loop: reclaim trials of dead workers → take the next
trial (under a file lock, so the sweep never runs more trials than asked) → train it → judge
it on the validation split. A worker killed with SIGKILL loses only its running trial: the
journal has no heartbeat, so every worker holds an exclusive ``flock`` on its own file in
``workers/`` for its lifetime; the kernel drops it when the process dies, however it dies, and
the next worker to look marks that worker's running trial failed (and enqueues it once more
with ``retry_failed``). With an RDB URL, Optuna's own heartbeat and RetryFailedTrialCallback do
the same across machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config import Config, config_from_dict
from tunelab.errors import ConfigError, Interrupted, RunError, TunelabError
from tunelab.experiments.space import Param, Sweep, SweepFile, suggest, trial_config

RECORD_FILE = "sweep.json"
JOURNAL_FILE = "journal.log"
STUDY_ATTR = "tunelab_sweep"
POLL_S = 2.0  # how often an idle worker looks for trials to retry while others still run
HEARTBEAT_S = 30  # RDB storage: a trial whose worker was silent for 2x this is failed


@dataclass
class OpenSweep:
    """A sweep as a worker sees it: where it lives, what it searches, and its Optuna study."""

    directory: Path
    sweep: Sweep
    storage_url: str | None  # None: the journal file in the directory


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweeps need Optuna, which is not installed", where="tunelab sweep",
                          fix='pip install "tunelab[sweep]" (or pip install optuna)') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def create_sweep(sweep: Sweep, *, storage_url: str | None = None) -> OpenSweep:
    """Make the sweep directory and its study; an existing one with the same sweep is reused."""
    directory = sweep.directory.resolve()
    record = json.loads(json.dumps(to_record(sweep, directory, storage_url)))  # as stored
    existing = directory / RECORD_FILE
    if existing.is_file():
        before = json.loads(existing.read_text())
        if {k: before.get(k) for k in ("spec", "base_config", "params")} != \
                {k: record[k] for k in ("spec", "base_config", "params")}:
            raise RunError(f"sweep directory {directory} holds a different sweep",
                           where=sweep.source, fix="give the sweep another name (name: ...), "
                           "or remove that directory")
        record["storage"] = before.get("storage")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{RECORD_FILE}.tmp"
        temporary.write_text(json.dumps(record, indent=1))
        temporary.replace(existing)
    opened = OpenSweep(directory, sweep, record["storage"])
    optuna = _optuna()
    study = optuna.create_study(study_name=record["name"], storage=_storage(opened),
                                direction=sweep.direction, load_if_exists=True)
    study.set_user_attr(STUDY_ATTR, record)  # so `--join URL` finds the sweep from the study
    return opened


def open_sweep(target: str | Path) -> OpenSweep:
    """A sweep from its directory, or from an Optuna storage URL that holds one study."""
    text = str(target)
    if "://" in text:
        optuna = _optuna()
        summaries = optuna.study.get_all_study_summaries(text)
        records = [s.user_attrs[STUDY_ATTR] for s in summaries if STUDY_ATTR in s.user_attrs]
        if len(records) != 1:
            raise RunError(f"the storage holds {len(records)} tunelab sweeps; --join URL needs "
                           "exactly one", where=text, fix="join with the sweep directory "
                           "instead, or give each sweep its own database")
        return from_record(records[0])
    path = Path(text)
    if not (path / RECORD_FILE).is_file():
        raise RunError(f"{path} is not a sweep directory (no {RECORD_FILE})", where=text,
                       fix="pass the folder `tunelab sweep SWEEP.yaml` made, e.g. runs/<sweep>")
    return from_record(json.loads((path / RECORD_FILE).read_text()))


def to_record(sweep: Sweep, directory: Path, storage_url: str | None) -> dict[str, Any]:
    """Everything a worker on any machine needs, as JSON."""
    return {"name": directory.name, "directory": str(directory), "source": sweep.source,
            "storage": storage_url, "spec": sweep.spec.model_dump(mode="json"),
            "base_config": sweep.base.model_dump(mode="json"),
            "params": [asdict(param) for param in sweep.params],
            "metric": sweep.metric, "direction": sweep.direction}


def from_record(record: dict[str, Any]) -> OpenSweep:
    params = [Param(**{**p, "choices": tuple(p["choices"])}) for p in record["params"]]
    base = config_from_dict(record["base_config"], source=record["source"])
    sweep = Sweep(record["source"], SweepFile.model_validate(record["spec"]), base, params,
                  record["metric"], record["direction"])
    return OpenSweep(Path(record["directory"]), sweep, record["storage"])


def load_study(opened: OpenSweep, *, sampler_seed: int | None = None):
    """The sweep's Optuna study, with its sampler and pruner."""
    optuna = _optuna()
    return optuna.load_study(study_name=opened.directory.name, storage=_storage(opened),
                             sampler=_sampler(opened.sweep, sampler_seed),
                             pruner=_pruner(opened.sweep))


def run_workers(directory: Path, workers: int, *, console: Console) -> None:
    """Start ``workers`` local worker processes on a sweep and wait for them all.

    Ctrl-C reaches the workers too (one process group): each stops its trial cleanly.
    """
    command = [sys.executable, "-m", "tunelab.cli", "sweep", "--join", str(directory)]
    processes = [subprocess.Popen(command, env=worker_environment(workers))
                 for _ in range(workers)]
    console.print(f"Started {workers} worker process(es) on {directory}.")
    try:
        codes = [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=60)
        raise Interrupted("the sweep was interrupted", where=str(directory),
                          fix=f"continue it with tunelab sweep --join {directory}") from None
    failed = [code for code in codes if code not in (0, None)]
    if failed:
        console.print(f"[yellow]{len(failed)} worker(s) exited with an error (codes {failed}); "
                      "their trials are marked failed.")


def worker_environment(workers: int, cpu_count: int | None = None) -> dict[str, str]:
    """The workers' environment: the CPU cores shared out between them.

    Each process's torch would otherwise start one thread per core, so N workers run N times
    as many threads as cores and spend the surplus waiting on each other (torchrun does the
    same for CPU ranks). A user's own OMP_NUM_THREADS is kept.
    """
    environment = dict(os.environ)
    if "OMP_NUM_THREADS" not in environment:
        cores = cpu_count or os.cpu_count() or 1
        environment["OMP_NUM_THREADS"] = str(max(1, cores // workers))
    return environment


def run_worker(target: str | Path, *, console: Console | None = None) -> int:
    """One worker: run trials until the sweep has all it asked for; returns how many it ran."""
    console = console or Console()
    opened = open_sweep(target)
    ran = 0
    with _worker_slot(opened.directory) as (worker_id, index):
        study = load_study(opened, sampler_seed=opened.sweep.spec.seed + index)
        while True:
            with _ask_lock(opened.directory) as lock:
                reclaim_dead_trials(study, opened)
                if not _budget_left(study, opened.sweep.trials):
                    lock.release()
                    if _others_running(study, opened):  # one may yet die and need a retry
                        time.sleep(POLL_S)
                        continue
                    return ran
                objective = _Objective(opened, worker_id, lock, console)
                try:
                    study.optimize(objective, n_trials=1, catch=(TunelabError,))
                except KeyboardInterrupt:
                    _retry_interrupted(study, objective.number)
                    raise
                finally:
                    lock.release()
            ran += 1
            if objective.number is not None:
                trial = study.trials[objective.number]
                value = f" {trial.value:.4f}" if trial.state.name == "COMPLETE" else ""
                console.print(f"{worker_id}: trial {trial.number} {trial.state.name.lower()}"
                              f"{value} {trial.params}")
    return ran


class _Objective:
    """Train one trial's run and judge it on validation data (the study calls it once)."""

    def __init__(self, opened: OpenSweep, worker_id: str, lock: _Lock, console: Console):
        self.opened, self.worker_id, self.lock, self.console = opened, worker_id, lock, console
        self.number: int | None = None

    def __call__(self, trial) -> float:
        from tunelab.run.metrics import stream_metrics_to
        from tunelab.run.trackers import log_sweep_trial, nested_in
        from tunelab.train.loop import train

        sweep = self.opened.sweep
        self.number = trial.number
        trial.set_user_attr("worker", self.worker_id)
        values = suggest(trial, sweep.params)
        self.lock.release()  # sampled and owned: other workers may ask now
        config = trial_config(sweep.base, values, name=f"trial-{trial.number:03d}",
                              output_dir=self.opened.directory)
        trial.set_user_attr("run_dir", str(config.run_dir))
        quiet = Console(quiet=True)
        pruning = _PruningSink(trial, sweep.direction) if sweep.spec.pruner != "none" else None
        name = self.opened.directory.name  # trials' tracker runs nest under the sweep's
        with stream_metrics_to(pruning) if pruning else contextlib.nullcontext(), \
                nested_in(self.opened.directory, sweep.base, name=name):
            result = train(config, console=quiet)
            value, interval = objective_value(config, result.val_loss_after, result.run_dir,
                                              sweep.metric, console=quiet)
        log_sweep_trial(self.opened.directory, sweep.base, name=name, number=trial.number,
                        value=value, interval=interval)
        trial.set_user_attr("ci", interval)
        trial.set_user_attr("val_loss", result.val_loss_after)
        return value


class _PruningSink:
    """Reports each validation loss during training to the trial; stops a losing trial.

    Optuna prunes in the study's direction, so a maximised objective gets −loss.
    """

    def __init__(self, trial, direction: str):
        self.trial, self.sign = trial, -1.0 if direction == "maximize" else 1.0

    def __call__(self, record: dict) -> None:
        loss, step = record.get("val_loss"), record.get("step", 0)
        if loss is None or step == 0 or "loss" in record:  # step 0: before training
            return
        self.trial.report(self.sign * loss, step)
        if self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"validation loss {loss:.4f} at step {step}")


def objective_value(config: Config, val_loss: float | None, run_dir: Path, metric: str, *,
                    console: Console) -> tuple[float, list[float | None] | None]:
    """The objective of a finished run and its 95% interval (None for the loss)."""
    if metric == "val_loss":
        if val_loss is None:
            raise ConfigError("the objective is val_loss but the run has no validation data",
                              where="data.validation", fix="add data.validation")
        return val_loss, None
    metrics = evaluate_run(config, run_dir, split="validation", console=console)["models"][
        "tuned"]["metrics"]
    if metric not in metrics:
        raise ConfigError(f"objective metric {metric!r} is not one the {config.eval.task} task "
                          f"reports", where="objective.metric",
                          fix=f"use one of: {', '.join(metrics)}, or val_loss")
    return metrics[metric]["value"], metrics[metric]["ci"]


def evaluate_run(config: Config, run_dir: Path, *, split: str, console: Console,
                 base: bool = False) -> dict:
    """``tunelab.evaluate`` of a run on ``split`` under the prompt it was trained with."""
    from tunelab.eval.evaluate import evaluate

    config = config.model_copy(deep=True)
    config.eval.split = split
    config.eval.prompt_variants = []  # a format sweep: each run is judged in its own format
    result = evaluate(config, run_dir=run_dir, base=base, tuned=True, console=console)
    return result.to_dict()


def reclaim_dead_trials(study, opened: OpenSweep) -> list[int]:
    """Mark failed the running trials whose worker process is gone; returns their numbers.

    Journal storage: a worker is gone when nobody holds the lock on its file in ``workers/``.
    An RDB study fails the trials whose heartbeat stopped (Optuna's own mechanism).
    """
    from optuna.storages import fail_stale_trials

    if opened.storage_url is not None:
        with warnings.catch_warnings():  # Optuna: "meant for Study.optimize" (trials run in it)
            warnings.simplefilter("ignore")
            fail_stale_trials(study)
        return []
    from optuna.trial import TrialState

    dead = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker and _worker_gone(opened.directory, worker):
            study.tell(trial.number, state=TrialState.FAIL)
            study.set_user_attr(f"trial_{trial.number}_failure", f"worker {worker} died")
            dead.append(trial.number)
            if opened.sweep.spec.retry_failed:  # once: a trial that kills workers stays failed
                _retry(study, study.trials[trial.number], max_retry=1)
    return dead


def _retry_interrupted(study, number: int | None) -> None:
    """Ctrl-C during a trial: it is failed (by Optuna) and enqueued again, so a later
    ``--join`` runs it instead of losing it."""
    if number is None:
        return
    study.set_user_attr(f"trial_{number}_failure", "interrupted")
    _retry(study, study.trials[number], max_retry=None)


def _retry(study, trial, *, max_retry: int | None) -> None:
    """Enqueue a failed trial's params again (Optuna's retry callback: it records the retried
    trial as ``failed_trial`` and gives up past ``max_retry``)."""
    import optuna

    callback = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback  # the name before Optuna 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental"
        callback(max_retry=max_retry)(study, trial)


def _budget_left(study, trials: int) -> bool:
    """Whether to ask for another trial: one is waiting (a retry), or fewer than ``trials``
    original trials exist (retries do not count; failed originals do)."""
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    if any(trial.state == TrialState.WAITING for trial in all_trials):
        return True
    originals = [t for t in all_trials if "failed_trial" not in t.system_attrs]
    return len(originals) < trials


def _others_running(study, opened: OpenSweep) -> bool:
    """Whether another worker still runs a trial that this one could have to retry. With the
    journal, only workers whose liveness this machine sees count (so nobody waits forever)."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if opened.storage_url is not None:
        return bool(running)
    folder = opened.directory / "workers"
    return any((folder / f"{trial.user_attrs.get('worker')}.lock").is_file()
               and not _worker_gone(opened.directory, trial.user_attrs["worker"])
               for trial in running)


def _storage(opened: OpenSweep):
    optuna = _optuna()
    if opened.storage_url is None:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(
            JournalFileBackend(str(opened.directory / JOURNAL_FILE)))
    callback = None
    if opened.sweep.spec.retry_failed:
        callback = lambda study, trial: _retry(study, trial, max_retry=1)  # noqa: E731
    return optuna.storages.RDBStorage(opened.storage_url, heartbeat_interval=HEARTBEAT_S,
                                      grace_period=2 * HEARTBEAT_S,
                                      failed_trial_callback=callback)


def _sampler(sweep: Sweep, seed: int | None):
    """Each worker seeds its sampler apart (same seed: same suggestions at the same time)."""
    optuna = _optuna()
    if sweep.spec.sampler == "grid":
        space = {param.key: list(param.choices) for param in sweep.params}
        return optuna.samplers.GridSampler(space, seed=sweep.spec.seed)
    if sweep.spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a running trial counts as a bad result, so parallel workers spread out.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                      n_startup_trials=max(2, min(10, sweep.trials // 3)))


def _pruner(sweep: Sweep):
    optuna = _optuna()
    if sweep.spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(1, sweep.trials // 4))
    if sweep.spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


class _Lock:
    """An exclusive ``flock`` on a file; ``release`` is idempotent."""

    def __init__(self, path: Path):
        self.handle = open(path, "a+")  # noqa: SIM115 - held for the lock's lifetime
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.held = False


@contextlib.contextmanager
def _ask_lock(directory: Path) -> Iterator[_Lock]:
    """Held from counting the trials to owning the new one: no sweep overshoots ``trials``."""
    lock = _Lock(directory / "ask.lock")
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def _worker_slot(directory: Path) -> Iterator[tuple[str, int]]:
    """This worker's id and number; its lock file says it is alive while the process lives."""
    folder = directory / "workers"
    folder.mkdir(exist_ok=True)
    with _ask_lock(directory):
        index = len(list(folder.glob("*.lock")))
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    lock = _Lock(folder / f"{worker_id}.lock")
    try:
        yield worker_id, index
    finally:
        lock.release()


def _worker_gone(directory: Path, worker_id: str) -> bool:
    path = directory / "workers" / f"{worker_id}.lock"
    if not path.is_file():
        return False  # a worker on another machine: its liveness is not visible here
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def describe(study, opened: OpenSweep) -> dict[str, Any]:
    """Each trial as plain data: number, state, params, value, interval, run directory."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({"number": trial.number, "state": trial.state.name.lower(),
                     "params": trial.params, "value": trial.value,
                     "ci": trial.user_attrs.get("ci"),
                     "run_dir": trial.user_attrs.get("run_dir"),
                     "retry_of": trial.system_attrs.get("failed_trial"),
                     "last_step": max(trial.intermediate_values, default=None),
                     "duration_s": trial.duration.total_seconds() if trial.duration else None})
    return {"name": opened.directory.name, "metric": opened.sweep.metric,
            "direction": opened.sweep.direction, "trials": rows}
