"""The trackers a run reports to (``train.report_to``): TensorBoard, MLflow, W&B and trackio.

A tracker run belongs to a folder: a run directory (its training metrics, then its evaluations
and report), a sweep directory (one trial's objective per step, its trials nested under it) or an
assessment folder (its arms, learning curve and verdict). The folder's ``trackers.json`` keeps
each tracker's run id, so a resumed run, ``tunelab eval`` and ``tunelab report`` reopen the same
tracker run instead of starting another. Stores live beside the runs they hold: MLflow's
``mlflow.db`` in the folder holding the runs (``output_dir``, the sweep or assessment folder),
TensorBoard's and W&B's files inside the run. Every tracker works offline: W&B goes offline
unless it was set up (``WANDB_MODE`` or an API key), trackio writes its local database.

The writers are sinks of ``MetricsLog`` (``writer(record)``), so the training loop writes each
record once and knows nothing of them.
"""

from __future__ import annotations

import fcntl
import json
import math
import netrc
import os
import secrets
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import Config
from tunelab.errors import ConfigError, TunelabError
from tunelab.eval.result import EvalResult
from tunelab.model.adapters import METHODS
from tunelab.run.directory import RunDir, write_json

#: Each folder's tracker run ids (a run directory's is ``RunDir.trackers_file``).
STATE_FILE = "trackers.json"
#: The MLflow experiment and W&B / trackio project when the environment names none.
DEFAULT_PROJECT = "tunelab"


@dataclass(frozen=True)
class Target:
    """Where one tracker run lives: the folder that keeps its ids, the tracker run's name, the
    folder whose ``mlflow.db`` holds it, and the parameters it records."""

    folder: Path
    name: str
    home: Path
    params: dict[str, Any]
    report_to: tuple[str, ...]

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    def read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def remember(self, tracker: str, ids: dict[str, Any]) -> None:
        """Keep ``tracker``'s ids, so the next process reopens the same tracker run."""
        with _locked(self.folder):
            state = self.read_state()
            state[tracker] = ids
            write_json(self.state_file, state, indent=1)


def run_target(run: RunDir, config: Config | None = None) -> Target:
    """The tracker run of a run directory, named as the run, its resolved config as parameters."""
    config = config or run.read_config(need_data=False)
    return Target(run.path, run.name, run.path.parent, config.model_dump(mode="json"),
                  tuple(config.train.report_to))


def folder_target(folder: Path, config: Config, name: str) -> Target:
    """The tracker run of a sweep or an assessment folder: its store is the folder itself,
    beside the runs it holds (theirs is there too)."""
    return Target(Path(folder), name, Path(folder), config.model_dump(mode="json"),
                  tuple(config.train.report_to))


@dataclass(frozen=True)
class Parent:
    """The tracker run that runs opened now belong to (a sweep's): MLflow nests them under its
    run id; W&B and trackio put them in its group."""

    group: str
    mlflow_run_id: str | None


_parent: ContextVar[Parent | None] = ContextVar("tracker_parent", default=None)


def open_trackers(run: RunDir, *, resumed_after: int | None = None) -> list:
    """Writers for the trackers the run's resolved config names in ``train.report_to`` (none
    for a folder that is not a run). ``resumed_after``: the run resumed from the checkpoint of
    this step, so later steps it logs replace those logged before (TensorBoard purges them;
    trackio skips the steps it holds)."""
    if not run.is_run():
        return []
    return open_target(run_target(run), resumed_after=resumed_after)


def open_target(target: Target, *, resumed_after: int | None = None) -> list:
    """A writer per tracker of ``target``, each opening its tracker run or reopening it."""
    writers = {"tensorboard": TensorBoardWriter, "mlflow": MlflowWriter, "wandb": WandbWriter,
               "trackio": TrackioWriter}
    return [writers[name](target, resumed_after=resumed_after) for name in target.report_to]


@contextmanager
def reopened(target: Target) -> Iterator[list]:
    """The target's tracker runs, reopened for what is logged after training (an evaluation,
    a report), and closed again in the state they were in."""
    writers = open_target(target) if target.report_to else []
    try:
        yield writers
    finally:
        for writer in writers:
            writer.close(finished=None)


def log_evaluation(run: RunDir, result: EvalResult, path: Path | None = None) -> None:
    """An evaluation of a run to the run's tracker runs: every metric with its interval, base
    and tuned, and the paired difference (``evaluation_scalars``), at the run's last step; the
    eval file as an MLflow artifact."""
    if not run.is_run():
        return
    target = run_target(run)
    if not target.report_to:
        return
    manifest = run.read_manifest(notes=[])
    step = (manifest.steps or manifest.total_steps) if manifest else 0
    with reopened(target) as writers:
        for writer in writers:
            writer.log_after(evaluation_scalars(result), step)
            if path is not None:
                writer.artifact(path, "eval")


def log_artifact(run: RunDir, path: Path, folder: str | None = None) -> None:
    """A file a command wrote for a run (``report.html``) to its MLflow run, as an artifact."""
    if not run.is_run():
        return
    try:
        target = run_target(run)
    except TunelabError:  # a damaged or partial config: the report says so, tracking is moot
        return
    if "mlflow" not in target.report_to:
        return
    with reopened(Target(target.folder, target.name, target.home, target.params,
                         ("mlflow",))) as writers:
        for writer in writers:
            writer.artifact(path, folder)


def evaluation_scalars(result: EvalResult) -> dict[str, float]:
    """``eval/<split>/<model>/<metric>`` with ``_low`` and ``_high`` (the bootstrap interval),
    ``eval/<split>/delta/<metric>`` (tuned − base, its paired interval and ``_p``), the spread
    over prompt variants and the unparsed share."""
    prefix, scalars = f"eval/{result.name}", {}
    for which, outcome in result.models.items():
        for name, metric in outcome.metrics.items():
            scalars.update(_with_interval(f"{prefix}/{which}/{name}", metric.value, metric.ci))
        for name, spread in outcome.sensitivity.items():
            if spread.n_variants > 1:
                scalars[f"{prefix}/{which}/{name}_variant_mean"] = spread.mean
                scalars[f"{prefix}/{which}/{name}_variant_std"] = spread.std
        scalars[f"{prefix}/{which}/parse_failure_rate"] = outcome.parse_failures.rate
    for name, entry in result.comparison.items():
        scalars.update(_with_interval(f"{prefix}/delta/{name}", entry.delta, entry.ci))
        scalars[f"{prefix}/delta/{name}_p"] = entry.p_value
    scalars[f"{prefix}/n"] = result.n
    return {key: float(value) for key, value in scalars.items() if _number(value)}


def _with_interval(key: str, value: float | None, ci: list | None) -> dict[str, float | None]:
    low, high = (ci or [None, None])[:2]
    return {key: value, f"{key}_low": low, f"{key}_high": high}


# --- sweeps and assessments ----------------------------------------------------------------


@contextmanager
def nested_in(folder: Path, config: Config, *, name: str) -> Iterator[None]:
    """Tracker runs opened inside the block are children of the folder's own (a sweep's trials):
    MLflow tags them ``mlflow.parentRunId``; W&B and trackio put them in the group ``name``."""
    if not config.train.report_to:
        yield
        return
    parent_id = None
    if "mlflow" in config.train.report_to:
        with _locked(folder, "parent"):  # the first of several workers makes the parent run
            writer = MlflowWriter(folder_target(folder, config, name))
        parent_id = writer.run_id
        writer.close(finished=None)
    token = _parent.set(Parent(group=name, mlflow_run_id=parent_id))
    try:
        yield
    finally:
        _parent.reset(token)


def log_sweep_trial(folder: Path, config: Config, *, name: str, number: int, value: float,
                    interval: list | None) -> None:
    """One finished trial's objective (and its interval) to the sweep's tracker run, at step
    = the trial's number."""
    if not config.train.report_to:
        return
    with reopened(folder_target(folder, config, name)) as writers:
        for writer in writers:
            writer.log(_with_numbers(_with_interval("sweep/objective", value, interval)), number)


def log_assessment(folder: Path, config: Config, result: dict[str, Any]) -> None:
    """An assessment to a tracker run of its own (``<name>-assess``, in the assessment folder):
    each prompting arm's test metric, the learning curve (step = training examples), the tuned
    model against each arm, the gain per doubling; the verdict as a tag, ``assess.json`` and
    ``report.html`` as MLflow artifacts."""
    if not config.train.report_to:
        return
    primary = result["primary_metric"]
    with reopened(folder_target(folder, config, f"{config.name}-assess")) as writers:
        arms = {}
        for arm in result["baselines"]["arms"]:
            key = f"assess/{_slug(arm['name'])}"
            arms.update(_with_interval(f"{key}/test_{primary}", arm["test"]["value"],
                                       arm["test"]["ci"]))
            arms[f"{key}/validation_{primary}"] = arm.get("validation_value")
        for arm_name, versus in result.get("tuned_vs_arms", {}).items():
            arms.update(_with_interval(f"assess/tuned_minus_{_slug(arm_name)}", versus["value"],
                                       versus["ci"]))
        gain = (result.get("fit") or {}).get("gain_per_doubling")
        if isinstance(gain, dict):
            arms.update(_with_interval("assess/gain_per_doubling", gain.get("value"),
                                       gain.get("ci")))
        for writer in writers:
            for point in result["learning_curve"]:
                writer.log(_with_numbers(_with_interval(f"assess/curve/{primary}",
                                                        point["value"], point["ci"])),
                           point["n_examples"])
            writer.log_after(_with_numbers(arms), 0)
            writer.note("assess.verdict", result["verdict"]["kind"])
            for file in ("assess.json", "report.html"):
                if (folder / file).is_file():
                    writer.artifact(folder / file, None)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace(" ", "_"))


def _with_numbers(values: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in values.items() if _number(value)}


# --- what a record holds -------------------------------------------------------------------


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record, flat: ``{"task_tokens": {"a": 3}}`` → ``task_tokens/a``,
    an interval ``[low, high]`` → ``_low`` and ``_high``; its step and time left out."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if not prefix and key in ("step", "time"):
            continue
        name = f"{prefix}{key}"
        if _number(value):
            flat[name] = float(value)
        elif isinstance(value, dict):
            flat.update(scalars(value, f"{name}/"))
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_number, value)):
            flat[f"{name}_low"], flat[f"{name}_high"] = float(value[0]), float(value[1])
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _missing_extra(tracker: str, package: str) -> ConfigError:
    return ConfigError(f"train.report_to names {tracker}, but the {package} package is not "
                       "installed", where="train.report_to",
                       fix=f'pip install "tunelab[{tracker}]", or remove {tracker} from '
                       "train.report_to")


@contextmanager
def _locked(folder: Path, what: str = "state") -> Iterator[None]:
    """Exclusive between processes (sweep workers share a sweep's ``trackers.json``); one lock
    file per ``what``, so a holder of one may take the other."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".trackers-{what}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the writers -----------------------------------------------------------------------------


class _Writer:
    """What every writer does; each tracker overrides what it supports."""

    def __call__(self, record: dict[str, Any]) -> None:
        self.log(scalars(record), record.get("step", 0), record.get("time"))

    def log(self, values: dict[str, float], step: int, time_s: float | None = None) -> None:
        raise NotImplementedError

    def log_after(self, values: dict[str, float], step: int) -> None:
        """Results measured after training (an evaluation), at the run's last step."""
        self.log(values, step)

    def artifact(self, path: Path, folder: str | None) -> None:
        """A file or folder kept with the tracker run (MLflow only)."""

    def note(self, key: str, text: str) -> None:
        """A short text (a verdict) kept with the tracker run."""

    def finish_training(self, run: RunDir) -> None:
        """The run finished training: keep what it made (MLflow: adapter, config)."""

    def close(self, *, finished: bool | None) -> None:
        """``finished``: training ran to its end (True), stopped to be resumed (False), or the
        run was reopened after training (None: left as it was)."""


class TensorBoardWriter(_Writer):
    """TensorBoard event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``); a resumed
    run purges the steps after its checkpoint, so redone steps are not shown twice."""

    def __init__(self, target: Target, *, resumed_after: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing_extra("tensorboard", "tensorboard") from None
        purge = None if resumed_after is None else max(0, resumed_after + 1)
        self.writer = SummaryWriter(log_dir=str(target.folder / "tensorboard"),
                                    purge_step=purge)
        self._closer = weakref.finalize(self, self.writer.close)

    def log(self, values: dict[str, float], step: int, time_s: float | None = None) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, walltime=time_s)
        self.writer.flush()  # a crash or SIGKILL keeps everything logged so far

    def note(self, key: str, text: str) -> None:
        self.writer.add_text(key, text)
        self.writer.flush()

    def close(self, *, finished: bool | None) -> None:
        self._closer()


class MlflowWriter(_Writer):
    """One MLflow run per tunelab run, in ``mlflow.db`` beside the run (a local SQLite store
    shared by the runs there: MLflow 3 refuses its old ``mlruns`` folder store, and artifacts go
    in ``mlartifacts/`` beside it) unless ``MLFLOW_TRACKING_URI`` is set; the experiment is
    ``MLFLOW_EXPERIMENT_NAME`` (or ``MLFLOW_EXPERIMENT_ID``), else "tunelab". The resolved
    config goes in as parameters; a resumed or reopened run logs to the run it made, a resumed
    one skipping the steps it holds (MLflow cannot delete them; exact resume redoes them with
    the same values)."""

    def __init__(self, target: Target, *, resumed_after: int | None = None):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing_extra("mlflow", "mlflow-skinny") from None
        self.metric = Metric
        own_store = not os.environ.get("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{(target.home / 'mlflow.db').resolve()}" if own_store \
            else os.environ["MLFLOW_TRACKING_URI"]
        self.client = MlflowClient(tracking_uri=uri)
        known = target.read_state().get("mlflow") or {}
        self.run_id, self.status_before, self.logged_through = None, None, -1
        if known.get("tracking_uri") == uri:
            try:
                before = self.client.get_run(known["run_id"])
            except MlflowException:  # deleted from the store: a new run
                before = None
            if before is not None:
                self.run_id, self.status_before = known["run_id"], before.info.status
                self.client.update_run(self.run_id, status="RUNNING")
                if resumed_after is not None:  # the steps it holds are redone identically
                    self.logged_through = max(
                        (m.step for key in before.data.metrics
                         for m in self.client.get_metric_history(self.run_id, key)),
                        default=-1)
        if self.run_id is None:
            self.run_id = self._create(target, own_store, uri, MlflowException)
            params = [Param(key, str(value)[:500]) for key, value in _flat(target.params).items()]
            for start in range(0, len(params), 100):  # MLflow takes 100 parameters per call
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        self._closer = weakref.finalize(self, self.client.set_terminated, self.run_id,
                                        "KILLED")

    def _create(self, target: Target, own_store: bool, uri: str, error: type) -> str:
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if not experiment_id:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                location = (target.home / "mlartifacts").resolve().as_uri() if own_store \
                    else None
                try:
                    experiment_id = self.client.create_experiment(name, location)
                except error:  # another process made it first
                    experiment_id = self.client.get_experiment_by_name(name).experiment_id
            else:
                experiment_id = experiment.experiment_id
        tags = {"tunelab.folder": str(target.folder.resolve())}
        parent = _parent.get()
        if parent is not None and parent.mlflow_run_id and parent.group != target.name:
            tags["mlflow.parentRunId"] = parent.mlflow_run_id
        run_id = self.client.create_run(experiment_id, run_name=target.name,
                                        tags=tags).info.run_id
        target.remember("mlflow", {"run_id": run_id, "tracking_uri": uri,
                                   "experiment_id": experiment_id})
        return run_id

    def log(self, values: dict[str, float], step: int, time_s: float | None = None) -> None:
        import time

        if step <= self.logged_through:
            return
        milliseconds = int((time_s or time.time()) * 1000)
        metrics = [self.metric(key, value, milliseconds, step) for key, value in values.items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def artifact(self, path: Path, folder: str | None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder or path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), folder)

    def note(self, key: str, text: str) -> None:
        self.client.set_tag(self.run_id, key, text)

    def finish_training(self, run: RunDir) -> None:
        config = run.read_config(need_data=False)
        if METHODS[config.method.kind].adapter:  # a full model's weights stay in the run
            self.artifact(run.final_folder(config.method.kind), None)
        for file in (run.config_path, run.manifest_path):
            self.artifact(file, None)

    def close(self, *, finished: bool | None) -> None:
        self._closer.detach()
        status = {True: "FINISHED", False: "KILLED"}.get(finished, self.status_before)
        self.client.set_terminated(self.run_id, status or "FINISHED")


class WandbWriter(_Writer):
    """A W&B run in ``RUN/wandb``, its id kept so a resumed run continues it (``resume="allow"``).

    Offline unless W&B was set up: ``WANDB_MODE`` is honoured as it is; without it, a W&B API
    key (``WANDB_API_KEY``, or ``wandb login``'s netrc entry) means online, none means
    offline (``wandb sync RUN/wandb/offline-run-*`` uploads it later). ``WANDB_PROJECT``
    (default "tunelab"), ``WANDB_ENTITY`` and ``WANDB_DIR`` are honoured.
    """

    def __init__(self, target: Target, *, resumed_after: int | None = None):
        try:
            import wandb
        except ImportError:
            raise _missing_extra("wandb", "wandb") from None
        known = target.read_state().get("wandb") or {}
        run_id = known.get("id") or secrets.token_hex(4)  # W&B ids: [a-z0-9]
        if not known:
            target.remember("wandb", {"id": run_id})
        parent = _parent.get()
        settings = {} if "WANDB_CONSOLE" in os.environ else {"console": "off"}  # rich redraws
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT, name=target.name,
            id=run_id, resume="allow", config=target.params, mode=wandb_mode(),
            dir=None if os.environ.get("WANDB_DIR") else str(target.folder),
            group=parent.group if parent and parent.group != target.name else None,
            reinit="create_new", settings=wandb.Settings(**settings))

    def log(self, values: dict[str, float], step: int, time_s: float | None = None) -> None:
        self.run.log(values, step=step)

    def log_after(self, values: dict[str, float], step: int) -> None:
        # a resumed online run's step is past the last one: no step, and in the summary
        self.run.log(values)
        self.run.summary.update(values)

    def note(self, key: str, text: str) -> None:
        self.run.summary[key] = text

    def close(self, *, finished: bool | None) -> None:
        self.run.finish()


def wandb_mode() -> str | None:
    """``WANDB_MODE`` as set (None: W&B reads it), else online where W&B has an API key, else
    offline: a run never stops at a login prompt or fails without a network."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1]
    try:
        logged_in = netrc.netrc().authenticators(host.split("/")[0]) is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return None if logged_in else "offline"


class TrackioWriter(_Writer):
    """A trackio run in trackio's local database (``TRACKIO_DIR``, default
    ``~/.cache/huggingface/trackio``; ``trackio show`` is its dashboard), project
    ``TRACKIO_PROJECT`` or "tunelab"; ``TRACKIO_SPACE_ID`` or ``TRACKIO_SERVER_URL`` send it
    elsewhere, as trackio does. A resumed run continues the same trackio run and skips the
    steps trackio already holds (trackio has no purge)."""

    def __init__(self, target: Target, *, resumed_after: int | None = None):
        try:
            import trackio
            from trackio.sqlite_storage import SQLiteStorage
        except ImportError:
            raise _missing_extra("trackio", "trackio") from None
        known = target.read_state().get("trackio") or {}
        project = known.get("project") or os.environ.get("TRACKIO_PROJECT") or DEFAULT_PROJECT
        parent = _parent.get()
        self.run = trackio.init(
            project=project, name=known.get("name") or target.name, config=target.params,
            resume="allow" if known else "never", embed=False, auto_log_cpu=False,
            auto_log_gpu=False,
            group=parent.group if parent and parent.group != target.name else None)
        if not known:
            target.remember("trackio", {"project": project, "name": self.run.name})
        self.logged_through = -1
        if resumed_after is not None:
            self.logged_through = SQLiteStorage.get_max_step_for_run(project, self.run.name)
            self.logged_through = -1 if self.logged_through is None else self.logged_through

    def log(self, values: dict[str, float], step: int, time_s: float | None = None) -> None:
        if step > self.logged_through:
            self.run.log(values, step=step)

    def close(self, *, finished: bool | None) -> None:
        self.run.finish()


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
