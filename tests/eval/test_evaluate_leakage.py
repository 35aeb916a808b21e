"""`tunelab eval` says when the evaluated split leaks from the training data, and what the metric
is without the leaked examples."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.eval.evaluate import evaluate


def _reviews(rng: random.Random, n: int) -> list[dict]:
    words = lambda k: " ".join(  # noqa: E731
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        for _ in range(k))
    return [{"text": words(12), "label": rng.choice(["negative", "positive"])} for _ in range(n)]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_leaked_test_examples_are_counted_named_and_left_out_of_a_second_metric(
        tmp_path, tiny_model_dir):
    rng = random.Random(0)
    train, validation, fresh = _reviews(rng, 40), _reviews(rng, 10), _reviews(rng, 20)
    # test lines 3 and 8 copy train records; line 12 copies a validation record
    test = fresh[:2] + [train[5]] + fresh[2:6] + [train[17]] + fresh[6:9] + [validation[4]] \
        + fresh[9:]
    config = config_from_dict({
        "name": "leaky", "output_dir": str(tmp_path / "runs"), "model": {"path": tiny_model_dir},
        "data": {"train": _write(tmp_path / "train.jsonl", train),
                 "validation": _write(tmp_path / "valid.jsonl", validation),
                 "test": _write(tmp_path / "test.jsonl", test),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "eval": {"task": "classification", "labels": ["negative", "positive"],
                 "bootstrap": 100}})
    console = Console(record=True, width=200)
    result = evaluate(config, tuned=False, console=console)

    leakage = result.leakage
    assert leakage.count == 3
    assert [(e["where"].rsplit("/", 1)[-1], e["split"], e["kind"]) for e in leakage.examples] \
        == [("test.jsonl:3", "train", "same text"), ("test.jsonl:8", "train", "same text"),
            ("test.jsonl:12", "validation", "same text")]
    assert leakage.examples[0]["source"].endswith("train.jsonl:6")

    base = result.models["base"]
    leaked = {2, 7, 11}
    clean_scores = [p.score for p in base.predictions if p.index not in leaked]
    without = base.metrics_without_leaked["accuracy"]
    assert without.n == len(test) - 3
    assert without.value == sum(clean_scores) / len(clean_scores)
    text = console.export_text()
    assert "3 of 23 test examples leak from the training data" in text
    assert "without them (n=20)" in text


def test_a_clean_split_reports_no_leakage(tmp_path, tiny_model_dir):
    rng = random.Random(1)
    config = config_from_dict({
        "name": "clean", "output_dir": str(tmp_path / "runs"), "model": {"path": tiny_model_dir},
        "data": {"train": _write(tmp_path / "train.jsonl", _reviews(rng, 30)),
                 "test": _write(tmp_path / "test.jsonl", _reviews(rng, 12)),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "eval": {"task": "classification", "labels": ["negative", "positive"],
                 "bootstrap": 100}})
    result = evaluate(config, tuned=False, console=Console(quiet=True))
    assert result.leakage.model_dump() == {"count": 0, "examples": []}
    assert result.models["base"].metrics_without_leaked is None


def test_chat_leakage_is_checked_against_the_runs_own_splits(tmp_path, tiny_model_dir):
    """Chat data with validation split off train: a test example copied from a record the run
    holds out is found in validation (the run's split), as trained, not in train."""
    from tunelab.data.prepare import read_splits

    rng = random.Random(2)
    chat = lambda row: {"messages": [  # noqa: E731
        {"role": "user", "content": f"Review: {row['text']}"},
        {"role": "assistant", "content": row["label"]}]}
    train, fresh = [chat(row) for row in _reviews(rng, 24)], [chat(row) for row in _reviews(rng, 6)]
    _write(tmp_path / "train.jsonl", train)
    settings = {
        "name": "chat-leaky", "output_dir": str(tmp_path / "runs"),
        "model": {"path": tiny_model_dir},
        "data": {"train": str(tmp_path / "train.jsonl"), "validation_split": 0.25,
                 "test": _write(tmp_path / "test.jsonl", fresh)},
        "train": {"seed": 5},
        "eval": {"task": "classification", "labels": ["negative", "positive"],
                 "bootstrap": 100}}
    held_out = read_splits(config_from_dict(settings).data, seed=5).validation
    _write(tmp_path / "test.jsonl", fresh[:3] + [train[held_out[2].line - 1]] + fresh[3:])
    result = evaluate(config_from_dict(settings), tuned=False, console=Console(quiet=True))
    assert result.leakage.count == 1
    leak = result.leakage.examples[0]
    assert (leak["index"], leak["split"], leak["kind"]) == (3, "validation", "same text")
    assert leak["source"].endswith(f"train.jsonl:{held_out[2].line}")
