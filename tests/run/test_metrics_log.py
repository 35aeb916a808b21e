"""The run's metrics log: records stream to the trackers train.report_to names and to sinks; a
resume drops what will be redone; readers skip, and say, what a crash cut short."""

from __future__ import annotations

import json
import sys

import pytest
from rich.console import Console

from tunelab.config import config_from_dict, dump_config
from tunelab.errors import ConfigError
from tunelab.run.directory import RunDir
from tunelab.run.metrics import MetricsLog, open_trackers, read_metrics, stream_metrics_to
from tunelab.train.loop import train


def reviews_config(tmp_path, model_path: str, **train):
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"the movie was {word}", "label": label}) + "\n"
                            for word, label in [("good", "positive"), ("bad", "negative")] * 8))
    return config_from_dict({
        "name": "tracked", "output_dir": str(tmp_path / "runs"), "model": {"path": model_path},
        "method": {"kind": "lora", "r": 2, "alpha": 4},
        "data": {"train": str(data), "validation": str(data),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"max_steps": 3, "batch_tokens": 64, "max_seq_len": 32, "samples": 0, **train},
    })


def test_report_to_streams_the_same_metrics_to_tensorboard_and_mlflow(tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = reviews_config(tmp_path, tiny_model_dir, report_to=["tensorboard", "mlflow"])
    run = RunDir(train(config, console=Console(quiet=True)).run_dir)
    logged = read_metrics(run)
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    val_losses = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}

    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)
    assert {e.step: e.value for e in events.Scalars("val_loss")} == pytest.approx(val_losses)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert mlflow_run.info.run_name == "tracked"
    assert mlflow_run.data.params["train.max_steps"] == "3"
    history = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "loss")}
    assert history == pytest.approx(losses)


def test_a_missing_tracker_package_names_the_extra(tmp_path, tiny_model_dir, monkeypatch):
    config = reviews_config(tmp_path, tiny_model_dir, report_to=["mlflow"])
    dump_config(config, tmp_path / "config.yaml")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    with pytest.raises(ConfigError, match=r'pip install "tunelab\[mlflow\]"'):
        open_trackers(RunDir(tmp_path))


def test_stream_metrics_to_sees_each_record_inside_the_block_only(tmp_path):
    seen = []
    log = MetricsLog(RunDir(tmp_path))
    with stream_metrics_to(seen.append):
        inside = MetricsLog(RunDir(tmp_path))
        inside.write(step=1, loss=2.0)
    log.write(step=2, loss=1.0)
    assert [record["step"] for record in seen] == [1]
    assert [record["step"] for record in read_metrics(RunDir(tmp_path))] == [1, 2]


def test_resume_drops_later_records_and_a_line_cut_short(tmp_path):
    run = RunDir(tmp_path)
    log = MetricsLog(run)
    for step in range(1, 5):
        log.write(step=step, loss=1.0 / step)
    with open(run.metrics_path, "a") as handle:
        handle.write('{"step": 5, "lo')  # the crash
    log.truncate_after(2)
    assert [record["step"] for record in read_metrics(run)] == [1, 2]
    assert list(tmp_path.iterdir()) == [run.metrics_path]  # no temporary file left


def test_malformed_lines_are_skipped_and_said(tmp_path):
    run = RunDir(tmp_path)
    run.metrics_path.write_text('{"step": 1}\n[1, 2]\n\n{"step": 2}\n{"step": 3, "lo')
    notes: list[str] = []
    assert [record["step"] for record in read_metrics(run, notes=notes)] == [1, 2]
    assert notes == ["metrics.jsonl: 2 malformed line(s) skipped (first at line 2)."]
    with pytest.warns(UserWarning, match="2 malformed line"):
        read_metrics(run)
    assert read_metrics(RunDir(tmp_path / "nothing-yet")) == []
