"""Atomic checkpoints and exact resume: weights, optimizer, schedule, RNG states, data cursor.

The trainable weights and the optimizer state go through ``torch.distributed.checkpoint``
(DCP), keyed by parameter name: under FSDP every rank writes its own shard, DCP's metadata
maps the shards, and a checkpoint loads onto any number of ranks (one process included). A
checkpoint is written to ``checkpoints/.step-N.tmp`` and renamed to ``checkpoints/step-N`` by
rank 0 only when every rank has finished writing, so a crash or a full disk never leaves a
checkpoint that looks whole. Several ranks need a shared file system for the run directory.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import RunError, TrainingError


def save_checkpoint(checkpoints: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int, rng: dict | None = None) -> Path:
    """Write checkpoint ``step-<state['step']>`` atomically and keep only the newest ``keep``.

    Every rank calls it. ``rng`` overrides the RNG states to store (those at the start of an
    interrupted step); each rank stores its own.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, main = _rank(), _rank() == 0
    final = checkpoints / f"step-{state['step']}"
    temporary = checkpoints / f".step-{state['step']}.tmp"
    try:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        _barrier()
        weights, optimizer_state = get_state_dict(model, optimizer, options=_options())
        dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=temporary)
        torch.save(rng or rng_states(), temporary / f"rng-rank{rank}.pt")
        if main:
            torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
            (temporary / "trainer_state.json").write_text(json.dumps(state, indent=2))
        _barrier()
        if main:
            shutil.rmtree(final, ignore_errors=True)
            temporary.rename(final)
            for old in list_checkpoints(checkpoints)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
    except OSError as error:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
        raise TrainingError(f"could not write checkpoint {final}: {error.strerror or error}",
                            where=str(checkpoints),
                            fix="free disk space (df -h) and resume with tunelab train --resume "
                            f"{checkpoints.parent}") from None
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
    """Restore everything saved by ``save_checkpoint`` and return the trainer state.

    Every rank calls it, with any number of ranks: DCP re-shards the weights and optimizer
    state. RNG states continue exactly when the number of ranks is the one that saved.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if (folder / "trainable.safetensors").is_file():
        return _load_single_file_checkpoint(folder, model=model, optimizer=optimizer,
                                            scheduler=scheduler)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        weights, optimizer_state = get_state_dict(model, optimizer, options=_options())
        loaded = {"model": weights, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=folder)
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
        rng_file = folder / f"rng-rank{_rank()}.pt"
        saved_world_size = len(list(folder.glob("rng-rank*.pt")))
        if saved_world_size != _world_size() or not rng_file.is_file():
            rng_file = folder / "rng-rank0.pt"
        rng = torch.load(rng_file, weights_only=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise RunError(f"checkpoint {folder} cannot be read or does not match the model: "
                       f"{' '.join(str(error).split())[:600]}", where=str(folder),
                       fix="delete this checkpoint folder to resume from the one before") from None
    set_state_dict(model, optimizer, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optimizer"], options=_options())
    _set_rng_states(rng)
    return state


def rng_states() -> dict:
    """Python, numpy, torch (and CUDA) generator states."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _load_single_file_checkpoint(folder: Path, *, model: nn.Module,
                                 optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Checkpoints written before DCP (trainable.safetensors + optimizer.pt), one process."""
    from safetensors.torch import load_file

    from tunelab.model.adapters import trainable_state

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
    _set_rng_states(saved["rng"])
    return state


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The frozen base is read from its own files again: a checkpoint holds what training
    # changes (the adapter, or every weight for full fine-tuning) and its optimizer state;
    # not strict, as the frozen base is absent on purpose (DCP still fails on a missing key).
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
