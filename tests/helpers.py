"""Scaffolding the test modules share: review data, tiny-run configs, the CLI run in-process.

tests/ is on sys.path (rootdir conftest), so test modules ``from helpers import ...``. Fixtures
live in conftest.py; these are plain functions a test calls with its own values.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import yaml
from rich.console import Console

from tunelab import cli
from tunelab.config import Config, config_from_dict

GOOD = ["good", "great", "fine", "lovely", "fun"]
BAD = ["bad", "awful", "boring", "dull", "poor"]

#: The tiny runs' training settings: two epochs that teach the tiny model the labels.
TRAIN = {"epochs": 2, "lr": 1e-2, "batch_tokens": 128, "max_seq_len": 64, "samples": 2,
         "max_new_tokens": 3, "seed": 0}
LORA = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1}

# --- data ------------------------------------------------------------------------------------


def write_reviews(path: Path, n: int, seed: int) -> str:
    """``n`` seeded one-line reviews ("the movie was good" → positive) as JSONL; the path."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            positive = rng.random() < 0.5
            word = rng.choice(GOOD if positive else BAD)
            handle.write(json.dumps({"text": f"the movie was {word}",
                                     "label": "positive" if positive else "negative"}) + "\n")
    return str(path)


ECHO_WORDS = ["good", "bad", "movie", "film", "story", "plot", "cast", "fun", "dull", "great"]


def write_echo(path: Path, n: int, seed: int) -> str:
    """A copying task: the target repeats the text's words (scored like a translation)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            text = " ".join(rng.choice(ECHO_WORDS) for _ in range(rng.randint(2, 5)))
            handle.write(json.dumps({"text": text}) + "\n")
    return str(path)


# --- configs ---------------------------------------------------------------------------------


def review_config(folder: Path, model_dir: str, *, name: str = "reviews",
                  sizes: tuple[int, ...] = (120, 30), method: dict | None = None,
                  evaluation: dict | None = None, **train) -> dict:
    """The config dict of a tiny run on reviews written into ``folder``.

    ``sizes``: how many reviews train, validation and (a third number) test get, seeds 0, 1, 2;
    ``method`` replaces LORA, ``evaluation`` is the eval section, ``train`` overrides TRAIN.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train": "train.jsonl", "validation": "valid.jsonl", "test": "test.jsonl"}
    data = {split: write_reviews(folder / files[split], n, seed)
            for seed, (split, n) in enumerate(zip(files, sizes, strict=False))}
    config = {
        "name": name,
        "output_dir": str(folder / "runs"),
        "model": {"path": model_dir},
        "method": method or dict(LORA),
        "data": {**data, "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {**TRAIN, **train},
    }
    if evaluation is not None:
        config["eval"] = evaluation
    return config


def make_config(folder: Path, model_dir: str, **options) -> Config:
    """``review_config(folder, model_dir, **options)`` as a Config."""
    return config_from_dict(review_config(folder, model_dir, **options))


def write_config(folder: Path, model_dir: str, **options) -> Path:
    """``review_config(folder, model_dir, **options)`` written to ``folder/<name>.yaml``."""
    config = review_config(folder, model_dir, **options)
    path = folder / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_project(folder: Path, model_dir: str, *, mixing: dict, max_steps: int = 8) -> Path:
    """A two-task config (sentiment classification, echo translation) in ``folder``.

    ``mixing`` is the data section's mixture; its ``weights`` go one to each task.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [
        {"name": "sentiment", "train": write_reviews(folder / "reviews.jsonl", 120, 0),
         "validation": write_reviews(folder / "reviews-valid.jsonl", 16, 1),
         "test": write_reviews(folder / "reviews-test.jsonl", 24, 2),
         "prompt": "Review: {text}\nSentiment:", "completion": " {label}",
         "eval": {"task": "classification", "labels": ["negative", "positive"],
                  "bootstrap": 200}},
        {"name": "echo", "train": write_echo(folder / "echo.jsonl", 60, 3),
         "validation": write_echo(folder / "echo-valid.jsonl", 8, 4),
         "test": write_echo(folder / "echo-test.jsonl", 10, 5),
         "prompt": "Repeat: {text}\n", "completion": "{text}",
         "eval": {"task": "translation", "max_new_tokens": 8, "stop": ["\n"],
                  "bootstrap": 200}},
    ]
    weights = mixing.pop("weights", None)
    if weights:
        for task, weight in zip(tasks, weights, strict=True):
            task["weight"] = weight
    config = {"name": "multi", "output_dir": str(folder / "runs"), "model": {"path": model_dir},
              "method": dict(LORA),
              "data": {"tasks": tasks, **mixing},
              "train": {"max_steps": max_steps, "lr": 1e-2, "batch_tokens": 128,
                        "max_seq_len": 64, "samples": 2, "max_new_tokens": 3, "seed": 0,
                        "eval_every": 4, "save_every": 3}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- the CLI and the console -----------------------------------------------------------------


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``tunelab ARGS`` in this process: (exit code, stdout, stderr with whitespace folded)."""
    monkeypatch.setattr(sys, "argv", ["tunelab", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, " ".join(captured.err.split())


def run_ok(monkeypatch, capsys, *args: str) -> str:
    """``run_cli`` for a command that must succeed: its stdout."""
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    return out


def quiet() -> Console:
    """A console that prints nothing: the tests read results, not progress."""
    return Console(quiet=True)
