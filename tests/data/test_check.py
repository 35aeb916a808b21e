"""`tunelab data check` sees the data as the run does: the run's validation split and its
tokenization (``data/prepare.py``), for chat data as for templates."""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

from rich.console import Console

from tunelab.config import load_config
from tunelab.data.check import check_data
from tunelab.data.prepare import prepare_data, read_splits
from tunelab.model.load import load_tokenizer


def _chats(rng: random.Random, n: int) -> list[dict]:
    words = lambda k: " ".join(  # noqa: E731
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        for _ in range(k))
    return [{"messages": [{"role": "user", "content": f"Review: {words(rng.randint(4, 16))}"},
                          {"role": "assistant", "content": rng.choice(["negative", "positive"])}]}
            for _ in range(n)]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _config(tmp_path: Path, model_dir: str) -> Path:
    """Chat data with no validation file: the run splits a quarter of train off (seed 3). The
    test file repeats one record of what becomes that split."""
    rng = random.Random(0)
    train, test = _chats(rng, 24), _chats(rng, 5)
    _write(tmp_path / "train.jsonl", train)
    _write(tmp_path / "test.jsonl", test)
    config = tmp_path / "config.yaml"
    config.write_text(f"name: c\nmodel: {{path: {model_dir}}}\n"
                      "data: {train: train.jsonl, test: test.jsonl, validation_split: 0.25}\n"
                      "train: {max_seq_len: 512, seed: 3}\n")
    held_out = read_splits(load_config(config).data, seed=3).validation
    _write(tmp_path / "test.jsonl", test + [train[held_out[1].line - 1]])
    return config


def test_check_reports_the_runs_split_and_token_lengths(tmp_path, tiny_model_dir):
    config_path = _config(tmp_path, tiny_model_dir)
    report = check_data(config_path, console=Console(quiet=True))
    config = load_config(config_path)
    prepared = prepare_data(config.data, load_tokenizer(tiny_model_dir),
                            max_seq_len=config.train.max_seq_len, seed=config.train.seed)
    splits = report["splits"]
    assert (splits["train"]["n_records"], splits["validation"]["n_records"],
            splits["test"]["n_records"]) == (18, 6, 6)
    assert len(prepared.train) == 18 and len(prepared.validation) == 6
    for name, tokenized in (("train", prepared.train), ("validation", prepared.validation)):
        lengths = [len(example.input_ids) for example in tokenized]  # chat template included
        stats = splits[name]["token_length"]
        assert (stats["min"], stats["max"]) == (min(lengths), max(lengths)), name
        assert stats["mean"] == round(sum(lengths) / len(lengths), 2), name
    # The copied record is found in the validation split the run holds out, not in train.
    assert report["leakage"]["validation/test"]["exact"]["count"] == 1
    assert report["leakage"]["train/test"]["exact"]["count"] == 0
    assert report["leakage"]["validation/test"]["exact"]["places"][0]["test"].endswith(
        "test.jsonl:6")


def test_check_of_one_file_keeps_every_record_in_train(tmp_path, tiny_model_dir):
    rows = _chats(random.Random(1), 9)
    report = check_data(_write(tmp_path / "chat.jsonl", rows), model=tiny_model_dir,
                        console=Console(quiet=True))
    assert list(report["splits"]) == ["train"] and report["splits"]["train"]["n_records"] == 9
    assert report["splits"]["train"]["formats"] == {"chat": 9}
    assert report["splits"]["train"]["token_length"]["min"] > 4  # the chat template's tokens


def _multitask_config(tmp_path: Path, model_dir: str) -> Path:
    """Two small tasks: chat data with a quarter split off for validation, and template
    reviews with validation and test files; max_seq_len cuts some chats."""
    rng = random.Random(2)
    _write(tmp_path / "chat.jsonl", _chats(rng, 24))
    reviews = [{"text": f"the film was {word}", "label": label}
               for word, label in (("good", "positive"), ("dull", "negative"))] * 10
    _write(tmp_path / "reviews.jsonl", reviews)
    _write(tmp_path / "reviews-valid.jsonl", reviews[:4])
    _write(tmp_path / "reviews-test.jsonl", reviews[4:8])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"name: mt\noutput_dir: {tmp_path / 'runs'}\nmodel: {{path: {model_dir}}}\n"
        "data:\n  mixing: weights\n  tasks:\n"
        "    - {name: chat, train: chat.jsonl, validation_split: 0.25, weight: 1}\n"
        "    - {name: reviews, train: reviews.jsonl, validation: reviews-valid.jsonl,\n"
        "       test: reviews-test.jsonl, prompt: \"Review: {text}\\nSentiment:\",\n"
        "       completion: \" {label}\", weight: 3}\n"
        "train: {max_seq_len: 40, seed: 3, max_steps: 1, samples: 0, batch_tokens: 256}\n")
    return config


def test_check_of_a_multitask_config_reports_each_task_and_the_planned_mixture(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    from tunelab import cli
    from tunelab.data.mixture import task_data
    from tunelab.train.loop import train

    config_path = _multitask_config(tmp_path, tiny_model_dir)
    out_path = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", ["tunelab", "data", "check", str(config_path),
                                      "--json", str(out_path)])
    try:
        cli.main()
    except SystemExit as stop:
        assert stop.code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "task chat" in out and "task reviews" in out and "planned share" in out
    report = json.loads(out_path.read_text())
    config = load_config(config_path)
    tokenizer = load_tokenizer(tiny_model_dir)
    chat, reviews = report["tasks"]["chat"]["splits"], report["tasks"]["reviews"]["splits"]
    # Each task is split as its run splits it: the chat task's quarter held out, seed 3.
    assert list(chat) == ["train", "validation"] and list(reviews) == ["train", "validation",
                                                                      "test"]
    assert (chat["train"]["n_records"], chat["validation"]["n_records"]) == (18, 6)
    assert chat["train"]["formats"] == {"chat": 18}
    assert reviews["train"]["formats"] == {"template": 20}
    held_out = read_splits(task_data(config.data, config.data.tasks[0]), seed=3).validation
    assert len(held_out) == 6
    # The reviews' validation and test files repeat training records: leakage, per task.
    assert report["tasks"]["reviews"]["leakage"]["train/test"]["exact"]["count"] == 4
    # Untruncated lengths in the split report; the mixture counts tokens as trained (cut at 40).
    own = prepare_data(task_data(config.data, config.data.tasks[0]), tokenizer,
                       max_seq_len=40, seed=3)
    untruncated = chat["train"]["token_length"]
    assert untruncated["max"] > 40
    mixture = report["mixture"]
    assert mixture["train_tokens"]["chat"] == sum(len(ex.input_ids) for ex in own.train)
    assert mixture["train_tokens"]["chat"] < untruncated["mean"] * 18
    assert mixture["rates"] == {"chat": 0.25, "reviews": 0.75}
    # The shares a run of this config records in its manifest.
    run_dir = train(config, console=Console(quiet=True)).run_dir
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["mixture"] == {"mixing": "weights", "rates": mixture["rates"]}


def test_proportional_mixture_plans_each_tasks_share_of_the_trained_tokens(tmp_path,
                                                                          tiny_model_dir):
    config_path = _multitask_config(tmp_path, tiny_model_dir)
    text = config_path.read_text().replace("mixing: weights", "mixing: proportional")
    config_path.write_text(text.replace(", weight: 1", "").replace(", weight: 3", ""))
    report = check_data(config_path, console=Console(quiet=True))
    tokens = report["mixture"]["train_tokens"]
    assert report["mixture"]["rates"] == {
        name: count / sum(tokens.values()) for name, count in tokens.items()}
    assert report["mixture"]["train_examples"] == {"chat": 18, "reviews": 20}
