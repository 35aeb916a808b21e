"""The training run's state and result: typed, versioned, owned here.

``TrainState`` is where a run stands after each optimizer step; every checkpoint keeps it as
``trainer_state.json`` and ``--resume`` reads it back (refusing a schema version it does not
know). ``TrainResult`` is what ``train()`` returns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tunelab.errors import RunError

#: Bump when a field is renamed, removed or changes meaning.
SCHEMA_VERSION = 1


@dataclass
class TrainState:
    """Steps done, the data cursor, counters, and what was measured before training."""

    step: int = 0
    micro_batch: int = 0  # micro-batches consumed: the data cursor of an exact resume
    train_tokens: int = 0
    train_s: float = 0.0  # time inside optimizer steps (no evaluation, no checkpoints)
    last_loss: float | None = None
    val_loss_before: float | None = None
    samples_before: list[str] = field(default_factory=list)  # greedy outputs before training
    plan: dict | None = None  # the planner's prediction, kept from the run's first start
    schema_version: int = SCHEMA_VERSION

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / max(self.train_s, 1e-9)

    def record_step(self, *, tokens: int, step_s: float, loss: float, micro_batches: int) -> None:
        """One more optimizer step done: ``micro_batches`` consumed, ``tokens`` trained on."""
        self.step += 1
        self.micro_batch += micro_batches
        self.train_tokens += tokens
        self.train_s += step_s
        self.last_loss = loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str) -> TrainState:
        """A state read from a checkpoint. Checkpoints written before states had a version hold
        exactly version 1's fields, so a missing version reads as 1."""
        version = raw.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise RunError(f"trainer_state.json has schema version {version!r}; this tunelab "
                           f"resumes version {SCHEMA_VERSION}", where=where,
                           fix="resume with the tunelab version that wrote it, or start the run "
                           "again with --overwrite")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RunError(f"trainer_state.json has unknown fields: {', '.join(unknown)}",
                           where=where, fix="start the run again with --overwrite")
        return cls(**raw)


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    steps: int
    final_train_loss: float | None
    val_loss_before: float | None
    val_loss_after: float | None
    tokens_per_second: float
    wall_s: float
    samples: list[dict] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION
