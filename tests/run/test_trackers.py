"""Trackers as a user reads them back: one MLflow run across a resume, no TensorBoard step twice,
evaluations with their intervals in the run's tracker run, W&B offline and trackio local runs
holding the training metrics and the config, sweep trials nested under the sweep's run."""

from __future__ import annotations

import glob
import json
import shutil
import struct
import uuid

import pytest

from tests.helpers import make_config, quiet
from tunelab.run.directory import RunDir
from tunelab.run.metrics import read_metrics
from tunelab.train.loop import train

EVAL = {"task": "classification", "labels": ["negative", "positive"], "bootstrap": 200,
        "max_examples": 12}


@pytest.fixture
def no_tracker_env(monkeypatch, tmp_path):
    """No tracker settings of the machine's: each test's stores are its own."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                 "WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_CONSOLE",
                 "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no netrc: W&B has no key
    monkeypatch.setenv("WANDB_SILENT", "true")


def _mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")


def _tensorboard_steps(run: RunDir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.tensorboard))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_resumed_run_is_one_mlflow_run_and_tensorboard_shows_each_step_once(
        tmp_path, tiny_model_dir, no_tracker_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resumes")
    config = make_config(tmp_path, tiny_model_dir, name="resumed", max_steps=6,
                         save_every=2, report_to=["tensorboard", "mlflow"])
    run = RunDir(train(config, stop_after_steps=3, console=quiet()).run_dir)
    # as if it crashed after step 3 was logged but before its checkpoint: resume from step 2
    shutil.rmtree(run.checkpoints / "step-3")
    train(config, resume=run.path, console=quiet())

    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert _tensorboard_steps(run, "loss") == [1, 2, 3, 4, 5, 6]

    client = _mlflow(tmp_path)
    experiment = client.get_experiment_by_name("resumes")
    [mlflow_run] = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    history = client.get_metric_history(mlflow_run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in history} == pytest.approx(losses)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"adapter", "config.yaml", "manifest.json"} <= artifacts
    adapter = {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in adapter


def test_evaluation_and_report_reach_the_runs_mlflow_run_with_intervals(
        tmp_path, tiny_model_dir, no_tracker_env):
    from tunelab.eval.evaluate import evaluate
    from tunelab.report.html import write_report

    config = make_config(tmp_path, tiny_model_dir, name="evaluated", sizes=(40, 12, 12),
                         evaluation=EVAL, max_steps=2, report_to=["mlflow"])
    run = RunDir(train(config, console=quiet()).run_dir)
    result = evaluate(config, run_dir=run.path, console=quiet())
    write_report(run.path)

    client = _mlflow(tmp_path)
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    logged = mlflow_run.data.metrics
    for which in ("base", "tuned"):
        metric = result.models[which].metrics["accuracy"]
        assert logged[f"eval/test/{which}/accuracy"] == pytest.approx(metric.value)
        assert logged[f"eval/test/{which}/accuracy_low"] == pytest.approx(metric.ci[0])
        assert logged[f"eval/test/{which}/accuracy_high"] == pytest.approx(metric.ci[1])
    delta = result.comparison["accuracy"]
    assert logged["eval/test/delta/accuracy"] == pytest.approx(delta.delta)
    assert logged["eval/test/delta/accuracy_low"] == pytest.approx(delta.ci[0])
    assert logged["eval/test/delta/accuracy_high"] == pytest.approx(delta.ci[1])
    [step] = {m.step for m in client.get_metric_history(mlflow_run.info.run_id,
                                                        "eval/test/tuned/accuracy")}
    assert step == 2  # at the run's last step
    assert mlflow_run.info.status == "FINISHED"  # reopened, and closed as it was
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert "report.html" in artifacts
    assert {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "eval")} == \
        {"eval/test.json"}


def wandb_records(run: RunDir) -> list:
    """Every record of the run's offline W&B files, oldest first (the ``.wandb`` file is
    LevelDB's log format: 32 KiB blocks of checksummed chunks, after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(glob.glob(str(run.path / "wandb" / "offline-run-*" / "run-*.wandb"))):
        raw = open(path, "rb").read()
        assert raw[:4] == b":W&B"
        position, pending = 7, b""
        while position + 7 <= len(raw):
            left = 32768 - position % 32768
            _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
            if left < 7 or (kind == 0 and length == 0):
                position += left
                continue
            pending += raw[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or the last chunk of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_has_the_train_metrics_the_config_and_continues_on_resume(
        tmp_path, tiny_model_dir, no_tracker_env):
    config = make_config(tmp_path, tiny_model_dir, name="offline", max_steps=4,
                         report_to=["wandb"])
    run = RunDir(train(config, stop_after_steps=2, console=quiet()).run_dir)
    train(config, resume=run.path, console=quiet())

    records = wandb_records(run)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1  # one W&B run, resumed
    assert runs[0].display_name == "offline" and runs[0].project == "tunelab"
    history = [{_key(item): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert {row["_step"]: row["loss"] for row in history if "loss" in row} == \
        pytest.approx(losses)
    config_items = {_key(item): json.loads(item.value_json) for item in runs[0].config.update}
    assert config_items["train"]["max_steps"] == 4
    assert config_items["model"]["path"] == tiny_model_dir


def test_trackio_local_run_has_the_train_metrics_and_skips_redone_steps(
        tmp_path, tiny_model_dir, no_tracker_env, monkeypatch):
    # trackio reads TRACKIO_DIR once, on import: this test's own store where it imports first
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    project = f"tunelab-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRACKIO_PROJECT", project)
    try:
        config = make_config(tmp_path, tiny_model_dir, name="local", max_steps=5,
                             save_every=2, report_to=["trackio"])
        run = RunDir(train(config, stop_after_steps=3, console=quiet()).run_dir)
        shutil.rmtree(run.checkpoints / "step-3")  # resume from step 2: step 3 is redone
        train(config, resume=run.path, console=quiet())
        logs = SQLiteStorage.get_logs(project, "local")
        losses = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
        assert sorted(row["step"] for row in logs if "loss" in row) == [1, 2, 3, 4, 5]
        assert {row["step"]: row["loss"] for row in logs if "loss" in row} == \
            pytest.approx(losses)
        assert SQLiteStorage.get_run_config(project, "local")["train"]["max_steps"] == 5
    finally:
        trackio.delete_project(project, force=True)


def test_sweep_trials_are_mlflow_children_of_the_sweeps_run(tmp_path, tiny_model_dir,
                                                            no_tracker_env):
    from tunelab.run.trackers import log_sweep_trial, nested_in

    folder = tmp_path / "runs" / "sweep"
    base = make_config(tmp_path, tiny_model_dir, name="base", max_steps=1,
                       report_to=["mlflow"])
    for number in range(2):
        trial = base.model_copy(deep=True)
        trial.name, trial.output_dir = f"trial-{number:03d}", str(folder)
        with nested_in(folder, base, name="sweep"):
            train(trial, console=quiet())
        log_sweep_trial(folder, base, name="sweep", number=number, value=0.5 + number,
                        interval=[0.1, 0.9 + number])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("tunelab").experiment_id])}
    assert set(runs) == {"sweep", "trial-000", "trial-001"}
    parent = runs["sweep"].info.run_id
    assert runs["trial-000"].data.tags["mlflow.parentRunId"] == parent
    assert runs["trial-001"].data.tags["mlflow.parentRunId"] == parent
    objective = client.get_metric_history(parent, "sweep/objective")
    assert {m.step: m.value for m in objective} == {0: 0.5, 1: 1.5}
    assert client.get_metric_history(parent, "sweep/objective_high")[-1].value == 1.9
