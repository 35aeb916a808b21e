"""Evaluation sees the run's own splits (``prepare.read_splits``): with validation split off the
train file, a held-out example is never shown to the model as a solved demonstration, and
``eval.split: validation`` evaluates exactly the held-out examples."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.data.prepare import read_splits
from tunelab.eval.evaluate import evaluate

WORDS = {"positive": ["good", "great", "fun"], "negative": ["bad", "dull", "awful"]}


def write_numbered(path: Path, kind: str, n: int) -> str:
    """Reviews whose text names the record ("train 7 ..."), so a shown demonstration is found."""
    with open(path, "w") as handle:
        for number in range(n):
            label = sorted(WORDS)[number % 2]
            word = WORDS[label][number % 3]
            handle.write(json.dumps({"text": f"{kind} {number} was {word}", "label": label})
                         + "\n")
    return str(path)


def split_off_config(tmp_path: Path, model_dir: str, **eval_cfg):
    """24 numbered train records, a quarter held out for validation (seed 5); 12 test ones."""
    return config_from_dict({
        "name": "shots", "output_dir": str(tmp_path / "runs"), "model": {"path": model_dir},
        "data": {"train": write_numbered(tmp_path / "train.jsonl", "train", 24),
                 "test": write_numbered(tmp_path / "test.jsonl", "test", 12),
                 "validation_split": 0.25,
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"max_seq_len": 256, "seed": 5},
        "eval": {"task": "classification", "labels": ["negative", "positive"],
                 "predict": "score", "bootstrap": 100, **eval_cfg},
    })


def test_demonstrations_never_come_from_the_split_off_validation_examples(tmp_path,
                                                                          tiny_model_dir):
    config = split_off_config(tmp_path, tiny_model_dir, shots=3)
    splits = read_splits(config.data, seed=config.train.seed)
    held_out = {f"train {example.line - 1} " for example in splits.validation}
    trained = {f"train {example.line - 1} " for example in splits.train}
    assert len(held_out) == 6 and len(trained) == 18

    result = evaluate(config, base=True, tuned=False, console=Console(quiet=True))
    inputs = [prediction.input for prediction in result.models["base"].predictions]
    shown = {text for text in held_out | trained for prompt in inputs if text in prompt}
    assert len(shown) >= 12  # 36 demonstrations drawn from the 18 trained examples
    assert shown <= trained, f"validation examples shown as demonstrations: {shown & held_out}"
    assert all(prompt.count("Sentiment:") == 4 for prompt in inputs)  # 3 shots, then the query


def test_the_validation_split_evaluated_is_the_one_held_out_of_train(tmp_path, tiny_model_dir):
    config = split_off_config(tmp_path, tiny_model_dir, split="validation")
    held_out = read_splits(config.data, seed=config.train.seed).validation
    result = evaluate(config, base=True, tuned=False, console=Console(quiet=True))
    assert result.split == "validation" and result.n == len(held_out) == 6
    evaluated = [prediction.input for prediction in result.models["base"].predictions]
    for prompt, example in zip(evaluated, held_out, strict=True):  # in file order
        assert f"Review: train {example.line - 1} was" in prompt
    assert result.leakage.count == 0  # held out of train: nothing leaks
