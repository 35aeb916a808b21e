"""The run's metrics log, ``metrics.jsonl``, and the trackers each record also goes to.

One JSON object per logged step; ``train.report_to`` streams the same records to TensorBoard
and MLflow, and ``stream_metrics_to`` to any sink (a sweep's pruner), so the training loop writes
each record once and knows nothing of who reads it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tunelab.errors import ConfigError
from tunelab.run.directory import RunDir, write_text


class MetricsLog:
    """Appends one JSON object per logged step to the run's ``metrics.jsonl``, and streams each
    record to the trackers its ``train.report_to`` names and to any ``stream_metrics_to`` sink."""

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.metrics_path
        self._sinks: list[Callable[[dict[str, Any]], None]] | None = None  # opened on 1st write

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._sinks is None:
            self._sinks = [*open_trackers(self.run), *_extra_sinks.get()]
        for sink in self._sinks:
            sink(record)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint's step (they will be redone), and
        a last line cut short by a crash or a full disk; replaced atomically."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        if lines and not _is_json(lines[-1]):
            lines.pop()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in kept))


def read_metrics(run: RunDir, *, notes: list[str] | None = None) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` ([] before the first). Lines that are not JSON objects
    (a last line cut short by a crash) are skipped, and said so: in ``notes`` when given, else
    as a warning."""
    if not run.metrics_path.is_file():
        return []
    records, bad_lines = [], []
    lines = run.metrics_path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = json.loads(line) if _is_json(line) else None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad_lines.append(number)
    if bad_lines:
        note = (f"metrics.jsonl: {len(bad_lines)} malformed line(s) skipped (first at line "
                f"{bad_lines[0]}).")
        if notes is None:
            warnings.warn(f"{run.metrics_path}: {note}", stacklevel=2)
        else:
            notes.append(note)
    return records


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


_extra_sinks: ContextVar[tuple[Callable[[dict[str, Any]], None], ...]] = ContextVar(
    "metric_sinks", default=())


@contextmanager
def stream_metrics_to(sink: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Every metrics record written inside the block also goes to ``sink`` (a sweep's pruner
    reads the validation loss this way; the training loop stays unaware of it)."""
    token = _extra_sinks.set((*_extra_sinks.get(), sink))
    try:
        yield
    finally:
        _extra_sinks.reset(token)


def open_trackers(run: RunDir) -> list[Callable[[dict[str, Any]], None]]:
    """Writers for the trackers the run's resolved config names in ``train.report_to`` (none
    for a folder that is not a run)."""
    if not run.is_run():
        return []
    config = run.read_config(need_data=False)
    params = config.model_dump(mode="json")
    writers = {"tensorboard": TensorBoardWriter, "mlflow": MlflowWriter}
    return [writers[name](run, params) for name in config.train.report_to]


def _missing_extra(tracker: str, package: str) -> ConfigError:
    return ConfigError(f"train.report_to names {tracker}, but the {package} package is not "
                       "installed", where="train.report_to",
                       fix=f'pip install "tunelab[{tracker}]", or remove {tracker} from '
                       "train.report_to")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key not in ("step", "time") and isinstance(value, (int, float))
            and not isinstance(value, bool)}


class TensorBoardWriter:
    """TensorBoard event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, run: RunDir, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing_extra("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run.tensorboard))
        weakref.finalize(self, self.writer.close)

    def __call__(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record.get("step", 0), walltime=record["time"])
        self.writer.flush()  # a crash or SIGKILL keeps everything logged so far


class MlflowWriter:
    """One MLflow run per tunelab run, in ``<output_dir>/mlflow.db`` (a local SQLite store
    shared by the runs beside it: MLflow 3 refuses its old ``mlruns`` folder store) unless
    ``MLFLOW_TRACKING_URI`` is set; the resolved config goes in as parameters."""

    def __init__(self, run: RunDir, config: dict[str, Any]):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing_extra("mlflow", "mlflow-skinny") from None
        self.metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(run.path.parent / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("tunelab")
        experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment("tunelab")
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        params = [Param(key, str(value)[:500]) for key, value in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        weakref.finalize(self, self.client.set_terminated, self.run_id)

    def __call__(self, record: dict[str, Any]) -> None:
        milliseconds = int(record["time"] * 1000)
        metrics = [self.metric(key, value, milliseconds, record.get("step", 0))
                   for key, value in _scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

