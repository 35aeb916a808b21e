"""Atomic checkpoints and exact resume: weights, optimizer, schedule, RNG states, data cursor.

The trainable weights and the optimizer state go through ``torch.distributed.checkpoint``
(DCP), keyed by parameter name: under FSDP every rank writes its own shard, DCP's metadata
maps the shards, and a checkpoint loads onto any number of ranks (one process included). A
checkpoint is written to ``checkpoints/.step-N.tmp`` and renamed to ``checkpoints/step-N`` by
rank 0 only when every rank has finished writing, so a crash or a full disk never leaves a
checkpoint that looks whole. Several ranks need a shared file system for the run directory.

Each checkpoint lists the sha256 of its files in ``files.sha256`` (``sha256sum -c`` reads it):
``--resume`` checks the newest checkpoint against it, says what is damaged (a truncated or
missing file) and falls back to the one before. Old checkpoints are renamed before they are
deleted, so a crash during the clean-up never leaves half a checkpoint under a checkpoint's name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tunelab.errors import RunError, TrainingError
from tunelab.run.directory import RunDir

#: The checksum list of a checkpoint, in ``sha256sum`` format, written last before the rename.
CHECKSUMS = "files.sha256"
#: Errors that mean the disk (or the user's quota) has no room for what the run writes.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def save_checkpoint(checkpoints: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: dict, keep: int, rng: dict | None = None) -> Path:
    """Write checkpoint ``step-<state['step']>`` atomically and keep only the newest ``keep``.

    Every rank calls it. ``rng`` overrides the RNG states to store (those at the start of an
    interrupted step); each rank stores its own. A failed write (a full disk) removes its
    temporary folder and raises a ``TrainingError`` naming the last complete checkpoint.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, main = _rank(), _rank() == 0
    final = checkpoints / f"step-{state['step']}"
    temporary = checkpoints / f".step-{state['step']}.tmp"
    try:
        if main:
            _remove_leftovers(checkpoints)
            temporary.mkdir(parents=True)
        _barrier()
        weights, optimizer_state = get_state_dict(model, optimizer, options=_options())
        dcp.save({"model": weights, "optimizer": optimizer_state}, checkpoint_id=temporary)
        _save_synced(rng or rng_states(), temporary / f"rng-rank{rank}.pt")
        if main:
            _save_synced(scheduler.state_dict(), temporary / "scheduler.pt")
            _write_synced(temporary / "trainer_state.json", json.dumps(state, indent=2))
        _barrier()
        if main:
            _publish(temporary, final)
            for old in list_checkpoints(checkpoints)[:-keep]:
                _remove(old)
        _barrier()
    except (OSError, CheckpointException) as error:
        if main:
            shutil.rmtree(temporary, ignore_errors=True)
        cause = _os_error(error)
        if cause is None:
            raise
        raise write_failed(cause, run_dir=checkpoints.parent, writing=final) from None
    return final


def disk_full(error: BaseException) -> OSError | None:
    """The full-disk error behind ``error``, or None: an OSError, or the error safetensors
    raises instead (its writer names the OS error only in its text: ``... (os error 28)``)."""
    if isinstance(error, OSError):
        return error if error.errno in DISK_FULL else None
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found and int(found[1]) in DISK_FULL:
        return OSError(int(found[1]), os.strerror(int(found[1])))
    return None


def write_failed(error: OSError, *, run_dir: Path, writing: Path | None = None) -> TrainingError:
    """A write into the run directory failed: one paragraph naming the path, the cause, the
    checkpoint the run can resume from, and the fix (free space on a full disk)."""
    path = writing or (Path(error.filename) if error.filename else run_dir)
    checkpoints = list_checkpoints(RunDir(run_dir).checkpoints)
    left = (f"the last complete checkpoint is {checkpoints[-1]}" if checkpoints
            else "no checkpoint was written yet")
    again = (f"tunelab train --resume {run_dir}" if run_dir.is_dir()
             else "start the run again")
    room = (f"free space on the disk that holds {run_dir} (df -h {run_dir.parent}), or set "
            "output_dir to a larger one" if error.errno in DISK_FULL
            else f"make {run_dir} writable")
    return TrainingError(f"could not write {path}: {error.strerror or error}; the run stops "
                         f"here and {left}", where=str(run_dir), fix=f"{room}, then {again}")


def _publish(temporary: Path, final: Path) -> None:
    """List the checksums, then rename the finished folder into place (synced: a crash
    afterwards, even of the machine, finds either the whole checkpoint or none)."""
    _write_synced(temporary / CHECKSUMS, "".join(
        f"{_sha256(path)}  {path.name}\n" for path in sorted(temporary.iterdir())))
    _sync(temporary)
    if final.exists():  # the same step saved again (after falling back to an older one)
        _remove(final)
    temporary.rename(final)
    _sync(final.parent)


def list_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files (None: they are as saved).

    A checkpoint from before checksums has no list; loading it is then the only check.
    """
    listed = folder / CHECKSUMS
    if not listed.is_file():
        return None
    for line in listed.read_text().splitlines():
        digest, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return (f"{name} ({path.stat().st_size:,} bytes) is not the file that was saved: "
                    "truncated or overwritten")
    return None


@dataclass
class Resumed:
    """What ``resume_latest`` found: the checkpoint it loaded and the damaged ones it skipped."""

    folder: Path | None = None  # None: no intact checkpoint
    state: dict | None = None
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # (folder, what is wrong)


def resume_latest(checkpoints: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler) -> Resumed:
    """Load the newest intact checkpoint; damaged newer ones are renamed ``damaged-step-N``.

    Every rank calls it. A checksummed checkpoint that does not load is not damaged but made
    for another model: that error is raised, as an older checkpoint would not load either.
    """
    resumed = Resumed()
    for folder in reversed(list_checkpoints(checkpoints)):
        problem = damage(folder)
        if problem is None:
            try:
                resumed.state = load_checkpoint(folder, model=model, optimizer=optimizer,
                                                scheduler=scheduler)
                resumed.folder = folder
                break
            except RunError as error:
                if (folder / CHECKSUMS).is_file():
                    raise
                problem = error.message
        resumed.damaged.append((folder, problem))
    _barrier()
    if _rank() == 0:
        for folder, _ in resumed.damaged:
            aside = folder.with_name(f"damaged-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)
            folder.rename(aside)
    _barrier()
    return resumed


def load_checkpoint(folder: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> dict:
    """Restore everything saved by ``save_checkpoint`` and return the trainer state.

    Every rank calls it, with any number of ranks: DCP re-shards the weights and optimizer
    state. RNG states continue exactly when the number of ranks is the one that saved.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
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
    except (OSError, ValueError, RuntimeError, EOFError, CheckpointException) as error:
        raise RunError(f"checkpoint {folder} cannot be read or does not match the model: "
                       f"{_cause(error)}", where=str(folder),
                       fix="resume with the config the run started with (its config.yaml), or "
                       "delete this checkpoint folder to resume from the one before") from None
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tunelab.model.adapters import trainable_state

    try:
        weights = load_file(folder / "trainable.safetensors")
        saved = torch.load(folder / "optimizer.pt", weights_only=False)
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError, EOFError, RuntimeError, SafetensorError) as error:
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


def _remove_leftovers(checkpoints: Path) -> None:
    """Temporary and half-removed folders a killed run left behind (none is being written)."""
    if checkpoints.is_dir():
        for entry in checkpoints.iterdir():
            if entry.name.startswith(".removing-") or (entry.name.startswith(".step-")
                                                        and entry.name.endswith(".tmp")):
                shutil.rmtree(entry, ignore_errors=True)


def _remove(folder: Path) -> None:
    """Delete a checkpoint, first renaming it so that no half-deleted one keeps its name."""
    doomed = folder.with_name(f".removing-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _save_synced(value: object, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(value, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sync(folder: Path) -> None:
    """fsync a folder, so the names of the files in it (and a rename) are on disk too."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind a failed write; DCP wraps each rank's error in a CheckpointException
    (a BaseException, which ``except Exception`` does not catch)."""
    if isinstance(error, OSError):
        return error
    for failure in getattr(error, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return cause
    return None


def _cause(error: BaseException) -> str:
    """One line for an error from loading; DCP's own message is a whole traceback."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))
        error = error[0] if isinstance(error, tuple) else error
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:600]


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
