"""Atomic checkpoints and exact resume: weights, optimizer, schedule, RNG states, data cursor.

A checkpoint is written to ``checkpoints/.step-N.tmp`` and renamed to ``checkpoints/step-N``
only when complete, so a crash or a full disk never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import RunError, TrainingError
from tunelab.model.adapters import trainable_state


def save_checkpoint(checkpoints: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int, rng: dict | None = None) -> Path:
    """Write checkpoint ``step-<state['step']>`` atomically and keep only the newest ``keep``.

    ``rng`` overrides the RNG states to store (those at the start of an interrupted step).
    """
    final = checkpoints / f"step-{state['step']}"
    temporary = checkpoints / f".step-{state['step']}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        weights = {name: t.detach().contiguous().cpu() for name, t in
                   trainable_state(model).items()}
        save_file(weights, temporary / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng or rng_states()}, temporary / "optimizer.pt")
        (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise TrainingError(f"could not write checkpoint {final}: {error.strerror or error}",
                            where=str(checkpoints),
                            fix="free disk space (df -h) and resume with tunelab train --resume "
                            f"{checkpoints.parent}") from None
    for old in list_checkpoints(checkpoints)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> dict:
    """Restore everything saved by ``save_checkpoint`` and return the trainer state."""
    try:
        weights = load_file(folder / "trainable.safetensors")
        saved = torch.load(folder / "optimizer.pt", weights_only=False)
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"checkpoint {folder} cannot be read: {error}", where=str(folder),
                       fix="delete this checkpoint folder to resume from the one before") from None
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise RunError(f"checkpoint {folder} does not match the model: {len(missing)} trainable "
                       f"tensors missing (e.g. {sorted(missing)[0]})", where=str(folder))
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _setrng_states(saved["rng"])
    return state


def rng_states() -> dict:
    """Python, numpy, torch (and CUDA) generator states."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _setrng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
