"""Tiny sweeps for the experiment tests: review data, a base config and a sweep file on disk."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
from test_loop import write_reviews  # noqa: E402  (the review data every tiny run trains on)


def write_base(folder: Path, model_dir: str, **train) -> Path:
    """A base config on the tiny model: 4 steps, validation loss every 2 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "name": "reviews",
        "model": {"path": model_dir},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": write_reviews(folder / "train.jsonl", 60, 0),
                 "validation": write_reviews(folder / "valid.jsonl", 16, 1),
                 "test": write_reviews(folder / "test.jsonl", 16, 2),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"max_steps": 4, "lr": 1e-2, "batch_tokens": 128, "max_seq_len": 64,
                  "samples": 0, "eval_every": 2, "seed": 0, **train},
        "eval": {"task": "classification", "labels": ["negative", "positive"],
                 "bootstrap": 100},
    }
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_sweep(folder: Path, model_dir: str, text: str) -> Path:
    """``text`` is the sweep file below ``base:``/``output_dir:``, as a user writes it."""
    write_base(folder, model_dir)
    path = folder / "sweep.yaml"
    path.write_text(f"base: base.yaml\noutput_dir: {folder / 'runs'}\n{text}")
    return path
