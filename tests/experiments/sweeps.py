"""Tiny sweeps for the experiment tests: review data, a base config and a sweep file on disk."""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import review_config


def write_base(folder: Path, model_dir: str) -> Path:
    """A base config on the tiny model: 4 steps, validation loss every 2 steps."""
    config = review_config(
        folder, model_dir, sizes=(60, 16, 16),
        method={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        evaluation={"task": "classification", "labels": ["negative", "positive"],
                    "bootstrap": 100},
        max_steps=4, samples=0, eval_every=2)
    del config["output_dir"]  # the sweep file names it
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_sweep(folder: Path, model_dir: str, text: str) -> Path:
    """``text`` is the sweep file below ``base:``/``output_dir:``, as a user writes it."""
    write_base(folder, model_dir)
    path = folder / "sweep.yaml"
    path.write_text(f"base: base.yaml\noutput_dir: {folder / 'runs'}\n{text}")
    return path
