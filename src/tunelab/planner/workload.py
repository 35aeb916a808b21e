"""The data as ``train()`` will see it: token counts and the run's micro-batches."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tunelab.config import Config
from tunelab.data.preference import prepare_preference_data
from tunelab.data.prepare import prepare_data
from tunelab.data.schedule import run_schedule
from tunelab.objectives import OBJECTIVES


@dataclass
class DataLayout:
    """Token counts of the training data and of the run's micro-batches."""

    train_examples: int
    train_tokens: int
    target_tokens: int
    validation_tokens: int
    steps: int
    micro_batches: int
    run_tokens: int  # non-padding tokens over all epochs (or max_steps)
    run_target_tokens: int
    processed_tokens: int  # positions the model runs over, padding included
    tokenizer_file_bytes: int


@dataclass
class TokenCounts:
    """Per training example: its length and its target tokens (as ``train()`` keeps them)."""

    lengths: list[int]
    targets: list[int]
    validation_tokens: int
    tasks: list[str] = field(default_factory=list)  # multitask: each example's task

    @classmethod
    def from_tokenized(cls, train: list, validation: list,
                       tasks: list[str] | None = None) -> TokenCounts:
        """From ``TokenizedExample`` lists, e.g. ``train/loop.py``'s ``Prepared.train``."""
        return cls([len(ex.input_ids) for ex in train], [ex.n_target_tokens for ex in train],
                   sum(len(ex.input_ids) for ex in validation), list(tasks or []))


def count_tokens(config: Config, tokenizer) -> TokenCounts:
    """Read, split and tokenize the data with ``prepare_data`` (preference objectives:
    ``prepare_preference_data``), the function ``train()`` uses; a pair counts as its answers'
    sequences."""
    objective = OBJECTIVES[config.method.objective]
    if objective.preference:
        data = prepare_preference_data(config.data, tokenizer,
                                       max_seq_len=config.train.max_seq_len,
                                       seed=config.train.seed, objective=objective)
        sides = lambda pairs: [side for pair in pairs  # noqa: E731
                               for side in (pair.chosen, pair.rejected) if side is not None]
        return TokenCounts.from_tokenized(sides(data.train), sides(data.validation))
    data = prepare_data(config.data, tokenizer, max_seq_len=config.train.max_seq_len,
                        seed=config.train.seed)
    return TokenCounts.from_tokenized(data.train, data.validation, data.train_tasks)


def micro_batches(counts: TokenCounts, config: Config) -> list[dict]:
    """Every micro-batch of the run (``train()``'s schedule, ``data/schedule.py``, the
    multitask mixture included): lengths, positions, targets."""
    packing = config.train.packing
    batches = []
    for indices in run_schedule(config, counts.lengths, counts.tasks).micro_batches:
        sizes = [counts.lengths[i] for i in indices]
        padded = None if packing else max(sizes)
        batches.append({"lengths": sizes, "padded_length": padded,
                        "positions": len(sizes) * padded if padded else sum(sizes),
                        "targets": sum(counts.targets[i] for i in indices)})
    return batches


def describe_data(counts: TokenCounts, batches: list[dict], config: Config,
                  model_folder: str) -> DataLayout:
    """The token counts of the data and of ``batches``, the run's micro-batches."""
    tokenizer_file = os.path.join(model_folder, "tokenizer.json")
    return DataLayout(
        train_examples=len(counts.lengths), train_tokens=sum(counts.lengths),
        target_tokens=sum(counts.targets), validation_tokens=counts.validation_tokens,
        steps=len(batches) // config.train.grad_accum, micro_batches=len(batches),
        run_tokens=sum(sum(b["lengths"]) for b in batches),
        run_target_tokens=sum(b["targets"] for b in batches),
        processed_tokens=sum(b["positions"] for b in batches),
        tokenizer_file_bytes=os.path.getsize(tokenizer_file)
        if os.path.isfile(tokenizer_file) else 0)
