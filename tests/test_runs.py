"""The run directory's metrics log streams to the trackers train.report_to names."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.errors import ConfigError
from tunelab.runs import MetricsLog, open_trackers, stream_metrics_to
from tunelab.train.loop import train


def test_report_to_streams_the_same_metrics_to_tensorboard_and_mlflow(tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"the movie was {word}", "label": label}) + "\n"
                            for word, label in [("good", "positive"), ("bad", "negative")] * 8))
    config = config_from_dict({
        "name": "tracked", "output_dir": str(tmp_path / "runs"), "model": {"path": tiny_model_dir},
        "method": {"kind": "lora", "r": 2, "alpha": 4},
        "data": {"train": str(data), "validation": str(data),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"max_steps": 3, "batch_tokens": 64, "max_seq_len": 32, "samples": 0,
                  "report_to": ["tensorboard", "mlflow"]},
    })
    run_dir = train(config, console=Console(quiet=True)).run_dir
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    val_losses = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)
    assert {e.step: e.value for e in events.Scalars("val_loss")} == pytest.approx(val_losses)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.run_name == "tracked" and run.data.params["train.max_steps"] == "3"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(losses)


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"report_to": ["mlflow"]}}))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    with pytest.raises(ConfigError, match=r'pip install "tunelab\[mlflow\]"'):
        open_trackers(tmp_path)


def test_stream_metrics_to_sees_each_record_inside_the_block_only(tmp_path):
    seen = []
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with stream_metrics_to(seen.append):
        inside = MetricsLog(tmp_path / "metrics.jsonl")
        inside.write(step=1, loss=2.0)
    log.write(step=2, loss=1.0)
    assert [record["step"] for record in seen] == [1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
