"""The run's metrics log, ``metrics.jsonl``, and the trackers each record also goes to.

One JSON object per logged step; ``train.report_to`` streams the same records to TensorBoard,
MLflow, W&B and trackio (``run/trackers.py``), and ``stream_metrics_to`` to any sink (a sweep's
pruner), so the training loop writes each record once and knows nothing of who reads it.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tunelab.run.directory import RunDir, write_text
from tunelab.run.trackers import MlflowWriter, TensorBoardWriter, open_trackers

__all__ = ["MetricsLog", "MlflowWriter", "TensorBoardWriter", "open_trackers", "read_metrics",
           "stream_metrics_to"]


class MetricsLog:
    """Appends one JSON object per logged step to the run's ``metrics.jsonl``, and streams each
    record to the trackers its ``train.report_to`` names and to any ``stream_metrics_to`` sink."""

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.metrics_path
        self._trackers: list | None = None  # opened on the first write
        self._sinks: list[Callable[[dict[str, Any]], None]] = []
        self._resumed_after: int | None = None

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._trackers is None:
            self._trackers = open_trackers(self.run, resumed_after=self._resumed_after)
            self._sinks = [*self._trackers, *_extra_sinks.get()]
        for sink in self._sinks:
            sink(record)

    def close(self, *, finished: bool) -> None:
        """The trackers' runs closed: training ``finished`` (its adapter and config go to MLflow
        as artifacts) or stopped to be resumed."""
        for tracker in self._trackers or []:
            if finished:
                tracker.finish_training(self.run)
            tracker.close(finished=finished)
        self._trackers, self._sinks = None, []

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint's step (they will be redone), and
        a last line cut short by a crash or a full disk; replaced atomically. The trackers
        then replace those steps too (``trackers.open_trackers``'s ``resumed_after``)."""
        self._resumed_after = step
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
