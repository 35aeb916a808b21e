"""Tiny trained runs for the ship and run tests: trained by the real loop, with adapters that
matter.

Three optimizer steps barely move a LoRA adapter (B starts at zero), so a merged model would
equal the base and a check comparing them could not fail. ``liven_adapter`` gives the trained
adapter's B matrices random values, so base and tuned logits differ by whole units.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from tunelab.config import config_from_dict
from tunelab.train.loop import train

NAMES = ["Ann", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
#: A chat run that learns to answer "Say hi to NAME" with "Hello NAME!" (40 steps suffice).
GREETINGS = [{"messages": [{"role": "user", "content": f"Say hi to {name}"},
                           {"role": "assistant", "content": f"Hello {name}!"}]}
             for name in NAMES * 4]
REVIEWS = [{"text": "the movie was good", "label": "positive"},
           {"text": "the movie was bad", "label": "negative"}] * 16


def train_tiny_run(folder: Path, model_dir: str, *, name: str = "tiny-run",
                   method: dict | None = None) -> Path:
    """A finished three-step run on ``model_dir``; returns its run directory."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(review) + "\n" for review in REVIEWS))
    config = config_from_dict({
        "name": name, "output_dir": str(folder / "runs"), "model": {"path": model_dir},
        "method": method or {"kind": "lora", "r": 8, "alpha": 16},
        "data": {"train": str(data), "validation_split": 0.2,
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"max_steps": 3, "batch_tokens": 128, "max_seq_len": 64, "samples": 0},
    })
    return train(config, console=Console(quiet=True)).run_dir


def liven_adapter(run_dir: Path, seed: int = 0) -> None:
    """Give the run's adapter random B matrices, so that it changes the model's outputs."""
    path = run_dir / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if "lora_B" in name:
            weights[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(weights, path, metadata={"format": "pt"})


def make_run(folder: Path, model_dir: str, name: str, records: list[dict], steps: int,
             **data) -> Path:
    """A finished rank-4 LoRA run of ``steps`` steps on ``records`` (its first 8 validate)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", records), ("valid", records[:8])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config_from_dict({
        "name": name, "output_dir": str(folder / "runs"), "model": {"path": model_dir},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "valid.jsonl"),
                 **data},
        "train": {"max_steps": steps, "lr": 1e-2, "batch_tokens": 256, "max_seq_len": 64,
                  "samples": 0, "seed": 0},
    })
    return train(config, console=Console(quiet=True)).run_dir


def copied_run(run: Path, folder: Path, *, model_path: str | None = None,
               sidecar: dict | None = None) -> Path:
    """``run`` as another machine has it: copied to ``folder``, its data files nowhere (the
    saved config names paths that do not exist here) and, given ``model_path``, its base named
    by a path of that machine; ``sidecar`` replaces the adapter's record of its base."""
    import yaml

    from tunelab.model.load import BASE_SIDECAR

    shutil.copytree(run, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    gone = Path("/elsewhere") / run.name
    for split in ("train", "validation", "test"):
        config["data"][split] = [str(gone / Path(name).name) for name in config["data"][split]]
    if model_path is not None:
        config["model"]["path"] = model_path
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if sidecar is not None:
        (folder / "adapter" / BASE_SIDECAR).write_text(json.dumps(sidecar))
    return folder
