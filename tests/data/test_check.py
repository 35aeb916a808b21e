"""`tunelab data check` sees the data as the run does: the run's validation split and its
tokenization (``data/prepare.py``), for chat data as for templates."""

from __future__ import annotations

import json
import random
import string
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
