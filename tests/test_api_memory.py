"""The Python API on data in memory and on a model already loaded (docs/python-api.md): lists of
dicts, datasets.Dataset, DataFrames; errors that name the row; a run trained from memory that
the CLI evaluates and the API resumes; a preloaded model that is the one trained; the
README's notebook snippet run as written there."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import yaml
from helpers import BAD, GOOD, LORA, TRAIN, quiet, run_ok

import tunelab
from tunelab.data.readers import read_rows
from tunelab.errors import ConfigError, DataError, RunError
from tunelab.run.directory import RunDir

DOCS = Path(__file__).resolve().parents[1] / "README.md"  # its notebook snippet


def reviews(n: int, seed: int) -> list[dict]:
    """``n`` seeded review rows ("the movie was good" → positive)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        rows.append({"text": f"the movie was {rng.choice(GOOD if positive else BAD)}",
                     "label": "positive" if positive else "negative"})
    return rows


def memory_config(tmp_path: Path, model_dir: str | None, **train) -> dict:
    """A config dict with no data files: the data is handed in."""
    config = {"name": "memory", "output_dir": str(tmp_path / "runs"),
              "method": dict(LORA),
              "data": {"prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
              "train": {**TRAIN, "samples": 0, **train},
              "eval": {"task": "classification", "labels": ["negative", "positive"]}}
    if model_dir is not None:
        config["model"] = {"path": model_dir}
    return config


def test_rows_from_a_list_train_a_run_the_cli_evaluates_and_the_api_resumes(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    train, validation, test = reviews(60, 0), reviews(12, 1), reviews(16, 2)
    config = memory_config(tmp_path, tiny_model_dir, max_steps=4)
    stopped = tunelab.finetune(config, train=train, validation=validation, test=test,
                               stop_after_steps=2, console=quiet())
    run = Path(stopped.run_dir)
    assert stopped.steps == 2
    # the rows are in the run, one a line, and its saved config names them there
    lines = (run / "data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 60 and json.loads(lines[16]) == train[16]
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert {split: saved[split] for split in ("train", "validation", "test")} == {
        split: [str(run / "data" / f"{split}.jsonl")] for split in ("train", "validation", "test")}
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["memory"]  # no staging left
    manifest = RunDir(run).read_manifest()
    assert manifest.supplied == {"data": {split: f"data/{split}.jsonl"
                                          for split in ("train", "validation", "test")}}
    assert str(run / "data" / "train.jsonl") in manifest.data
    # resumed from its directory alone (what tunelab train --resume calls), then evaluated by
    # the CLI from the run's own config: the in-memory test rows, read back from the run
    finished = tunelab.finetune(resume=run, console=quiet())
    assert finished.steps == 4 and RunDir(run).finished()
    assert RunDir(run).read_manifest().supplied == manifest.supplied  # carried over
    with pytest.raises(ConfigError, match="resumed run trains on the data it started with"):
        tunelab.finetune(resume=run, train=train)
    run_ok(monkeypatch, capsys, "eval", str(run / "config.yaml"), "--run", str(run))
    result = RunDir(run).read_eval("test")
    assert result.n == 16 and set(result.models) == {"base", "tuned"}


def test_a_dataset_and_a_dataframe_train_like_a_list(tmp_path, tiny_model_dir):
    import pandas
    from datasets import Dataset, DatasetDict

    config = memory_config(tmp_path, tiny_model_dir, max_steps=1)
    result = tunelab.finetune(config, data=DatasetDict({
        "train": Dataset.from_list(reviews(40, 0)),
        "validation": Dataset.from_pandas(pandas.DataFrame(reviews(8, 1)))}), console=quiet())
    report = RunDir(result.run_dir).read_manifest().data_report
    assert (report["train_examples"], report["validation_examples"]) == (40, 8)
    config["name"] = "frame"
    frame = tunelab.finetune(config, train=pandas.DataFrame(reviews(40, 0)), console=quiet())
    assert (Path(frame.run_dir) / "data" / "train.jsonl").read_text() == \
        (Path(result.run_dir) / "data" / "train.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"split\(s\) \['valid'\].*'valid': 'validation'"):
        tunelab.finetune(config, data={"train": reviews(4, 0), "valid": reviews(2, 1)})


def test_a_frame_is_read_duck_typed_with_missing_values_as_null():
    numpy = pytest.importorskip("numpy")

    class Frame:  # what read_rows asks of a DataFrame, without pandas
        columns = ["prompt", "completion"]

        def to_dict(self, orient):
            assert orient == "records"
            return [{"prompt": "2+2=", "completion": numpy.int64(4)},
                    {"prompt": "3+3=", "completion": float("nan")}]

    records = read_rows(Frame(), "test")
    assert [record.fields for record in records] == [{"prompt": "2+2=", "completion": 4},
                                                     {"prompt": "3+3=", "completion": None}]
    assert records[1].where == "test row 2"
    with pytest.raises(DataError, match="train row 2: the row is str, not a dict"):
        read_rows([{"text": "a"}, "b"], "train")


def test_a_bad_row_is_named_by_split_row_and_field_and_nothing_is_written(
        tmp_path, tiny_model_dir):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "hello"}]} for i in range(30)]
    rows[16]["messages"][1]["role"] = "bot"
    config = memory_config(tmp_path, tiny_model_dir, max_steps=1)
    del config["data"]["prompt"], config["data"]["completion"]
    with pytest.raises(DataError, match=r"^train row 17: messages\[1\]\.role 'bot'"):
        tunelab.finetune(config, train=rows)
    assert not (tmp_path / "runs").exists()
    # the same rows as a file name the file's line: one validation, two ways in
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config["data"]["train"] = str(path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:17: messages\[1\]\.role 'bot'"):
        tunelab.finetune(config)


def test_a_preloaded_model_is_the_one_trained_and_resume_asks_for_it_again(
        tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = memory_config(tmp_path, None, max_steps=3)  # model.path: the model's name_or_path
    result = tunelab.finetune(config, train=reviews(40, 0), test=reviews(12, 2), model=model,
                              tokenizer=tokenizer, console=quiet())
    run = RunDir(result.run_dir)
    # the adapter trained is the one injected into the caller's own model object
    injected = {name: tensor for name, tensor in model.state_dict().items() if "lora_B" in name}
    saved = load_file(str(run.adapter / "adapter_model.safetensors"))
    trained = {name: tensor for name, tensor in saved.items() if "lora_B" in name}
    assert injected and len(injected) == len(trained)
    assert all(tensor.abs().sum() > 0 for tensor in injected.values())  # B starts at zero
    for name, tensor in trained.items():
        match = [other for key, other in injected.items()
                 if key.replace(".default", "").endswith(name.removeprefix("base_model.model."))]
        assert len(match) == 1 and torch.equal(match[0], tensor)
    manifest = run.read_manifest()
    assert manifest.supplied["base"]["name_or_path"] == tiny_model_dir
    assert manifest.supplied["base"]["class"] == type(model).__name__
    assert run.read_config(need_data=False).model.path == tiny_model_dir
    with pytest.raises(RunError, match="handed in from Python"):
        tunelab.finetune(resume=run.path)
    # evaluated on the caller's model: the base row with the adapter off, the tuned with it on
    evaluation = tunelab.evaluate(run.config_path, run_dir=run.path, model=model,
                                  tokenizer=tokenizer, console=quiet())
    assert set(evaluation.models) == {"base", "tuned"} and evaluation.n == 12


def _notebook_snippet() -> str:
    text = DOCS.read_text()
    block = re.search(r"<!-- notebook-snippet:start -->\n```python\n(.*?)```\n"
                      r"<!-- notebook-snippet:end -->", text, re.S)
    assert block, f"{DOCS} has no notebook snippet between its markers"
    return block.group(1)


def test_the_notebook_snippet_runs_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    snippet = _notebook_snippet()
    assert snippet.count('"embedded:smollm2-135m-instruct"') == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet.replace('"embedded:smollm2-135m-instruct"', repr(tiny_model_dir)),
                 str(DOCS), "exec"), namespace)
    assert namespace["evaluation"].n == 20
    assert (tmp_path / "runs" / "notebook-sentiment" / "data" / "test.jsonl").is_file()


@pytest.mark.slow
def test_the_notebook_snippet_runs_as_written(tmp_path, embedded_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(_notebook_snippet(), str(DOCS), "exec"), namespace)
    assert set(namespace["evaluation"].models) == {"base", "tuned"}
