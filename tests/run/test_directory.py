"""The run directory: one answer to "is this a run", "has it finished", "where are its final
weights"; its config read back; JSON written atomically."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tunelab.config import config_from_dict
from tunelab.errors import ConfigError, RunError
from tunelab.run.directory import RunDir, create_run, open_run, write_json


def make_config(tmp_path, **changes):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    return config_from_dict({"name": "run", "output_dir": str(tmp_path / "runs"),
                             "data": {"train": str(data)}, **changes})


def write_manifest(run: RunDir, status: str) -> None:
    run.manifest_path.write_text(json.dumps({
        "name": "run", "seed": 0, "device": "cpu", "versions": {}, "model": {}, "data": {},
        "data_report": {}, "total_steps": 3, "warmup_steps": 0, "status": status}))


def test_a_random_folder_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "manifest.json").write_text("{}")  # a manifest alone does not make a run
    run = RunDir(tmp_path)
    assert not run.is_run() and not RunDir(tmp_path / "absent").is_run()
    with pytest.raises(RunError, match="not a tunelab run directory"):
        run.read_config()
    with pytest.raises(RunError, match="not a tunelab run directory"):
        open_run(tmp_path / "absent")


def test_a_created_run_is_a_run_with_its_config(tmp_path):
    config = make_config(tmp_path)
    run = create_run(config)
    assert run.is_run() and run.path == config.run_dir and not run.finished()
    assert run.read_config() == config
    _, opened = open_run(run.path)
    assert opened == config
    with pytest.raises(RunError, match="already exists"):
        create_run(config)


def test_the_config_of_a_run_whose_data_is_gone_reads_without_the_data(tmp_path):
    run = create_run(make_config(tmp_path))
    saved = yaml.safe_load(run.config_path.read_text())
    saved["data"]["train"] = ["/elsewhere/train.jsonl"]
    run.config_path.write_text(yaml.safe_dump(saved))
    assert run.read_config(need_data=False).data.train == ["/elsewhere/train.jsonl"]
    with pytest.raises(ConfigError, match="/elsewhere/train.jsonl"):
        run.read_config()


@pytest.mark.parametrize(("status", "finished"), [(None, False), ("running", False),
                                                  ("finished", True)])
def test_finished_is_the_manifests_status(tmp_path, status, finished):
    run = create_run(make_config(tmp_path))
    if status is not None:
        write_manifest(run, status)
    assert run.finished() is finished


def test_final_weights_say_whether_training_is_unfinished_or_the_folder_gone(tmp_path):
    run = create_run(make_config(tmp_path))
    write_manifest(run, "running")
    with pytest.raises(RunError, match="has not finished training") as error:
        run.final_weights("lora")
    assert "tunelab train --resume" in error.value.render()
    write_manifest(run, "finished")
    with pytest.raises(RunError, match=r"no final adapter \(adapter/adapter_config.json\): the "
                       "run finished, but the folder is gone"):
        run.final_weights("qlora")
    with pytest.raises(RunError, match=r"no final weights \(model/config.json\)"):
        run.final_weights("full")
    run.adapter.mkdir()
    (run.adapter / "adapter_config.json").write_text("{}")
    assert run.final_weights("dora") == run.adapter == run.final_folder("lora")
    assert run.final_folder("full") == run.path / "model"


def test_paths_are_the_documented_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.config_path == tmp_path / "config.yaml"
    assert run.manifest_path == tmp_path / "manifest.json"
    assert run.metrics_path == tmp_path / "metrics.jsonl"
    assert run.checkpoints == tmp_path / "checkpoints"
    assert run.eval_file("test") == tmp_path / "eval" / "test.json"
    assert run.eval_file("test", "sentiment") == tmp_path / "eval" / "test-sentiment.json"
    assert run.report_path == tmp_path / "report.html"
    assert run.export_folder("gguf-q8_0") == tmp_path / "export" / "gguf-q8_0"
    assert RunDir(run) == run and os.fspath(run) == str(tmp_path)


def test_an_atomic_write_that_fails_leaves_the_old_file_and_nothing_else(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    write_json(path, {"status": "running"})
    assert json.loads(path.read_text()) == {"status": "running"}

    def disk_full(source, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"status": "finished"})
    assert json.loads(path.read_text()) == {"status": "running"}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    monkeypatch.undo()

    with pytest.raises(TypeError):
        write_json(path, {"status": "finished"}, indent=object())  # fails before writing
    assert json.loads(path.read_text()) == {"status": "running"}
    assert list(tmp_path.iterdir()) == [path]


def test_evaluations_are_read_by_file_and_bad_ones_noted(tmp_path):
    run = RunDir(tmp_path)
    run.eval_dir.mkdir()
    (run.eval_dir / "test.json").write_text("{truncated")
    (run.eval_dir / "list.json").write_text("[]")
    notes: list[str] = []
    assert run.read_evals(notes=notes) == {}
    assert notes == ["list.json holds a list, not a JSON object; left out.",
                     notes[1]] and notes[1].startswith("test.json could not be read")
    with pytest.raises(RunError, match="list.json holds a list"):
        run.read_evals()
    (run.eval_dir / "list.json").unlink()
    (run.eval_dir / "test.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RunError, match="schema version 99"):
        run.read_evals(notes=[])  # another version is refused even where notes are kept
    assert run.read_eval("validation") is None
