"""Multitask mixtures: each task's share of the training tokens, and the run's drawn micro-batches.

A multitask run (``data.tasks``) trains one adapter on several tasks. Each task is read and
tokenized on its own (``prepare_data`` over the task's own files and templates); this module
says how much of each the run sees and in which order.

The shares are shares of training **tokens** (prompt and target, what ``metrics.jsonl`` counts
as ``tokens``), so the ``task_tokens`` logged per step can be checked directly against them:

- ``proportional``: a task's share of all training tokens (as if the data were concatenated);
- ``temperature``: proportional to (task tokens)^(1/T), which lifts small tasks (T5's rule,
  applied to tokens);
- ``weights``: proportional to each task's ``weight``.

Examples are drawn one at a time: a task with probability proportional to its share over its
mean example length (so that, in expectation, its tokens get its share), then that task's next
example in a seeded shuffle of its own data (reshuffled after each pass). The drawn sequence is
packed into micro-batches by the one packing rule (``packing.plan_batches``). The whole schedule
is a function of the data, the shares and the seed, so a resumed run draws exactly the same
examples from its data cursor on.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import numpy as np

from tunelab.config import DataConfig, TaskConfig
from tunelab.data.packing import plan_batches

MIXINGS = ("proportional", "temperature", "weights")


def task_data(data: DataConfig, task: TaskConfig) -> DataConfig:
    """One task as a single-task data section: its files and templates, the run's shared
    settings (``train_on``, ``chat_template`` and its kwargs, ``truncation``)."""
    return DataConfig(
        train=task.train, validation=task.validation, test=task.test,
        validation_split=task.validation_split, format=task.format, prompt=task.prompt,
        completion=task.completion, train_on=data.train_on, chat_template=data.chat_template,
        chat_template_kwargs=data.chat_template_kwargs, truncation=data.truncation)


def mixing_rates(task_tokens: dict[str, int], *, mixing: str, temperature: float = 2.0,
                 weights: dict[str, float] | None = None) -> dict[str, float]:
    """Each task's share of the training tokens (summing to 1), as ``data.mixing`` says."""
    if mixing == "proportional":
        raw = {name: float(tokens) for name, tokens in task_tokens.items()}
    elif mixing == "temperature":
        raw = {name: float(tokens) ** (1.0 / temperature) for name, tokens in task_tokens.items()}
    elif mixing == "weights":
        raw = {name: float((weights or {})[name]) for name in task_tokens}
    else:
        raise ValueError(f"unknown mixing {mixing!r}; one of {', '.join(MIXINGS)}")
    total = sum(raw.values())
    return {name: value / total for name, value in raw.items()}


def data_rates(data: DataConfig, lengths: list[int], tasks: list[str]) -> dict[str, float]:
    """The token shares a multitask data section asks for, given its tokenized examples."""
    return mixing_rates(task_token_counts([range(len(lengths))], lengths, tasks),
                        mixing=data.mixing, temperature=data.temperature,
                        weights={task.name: task.weight for task in data.tasks})


def schedule_mixture(lengths: list[int], tasks: list[str], rates: dict[str, float], *,
                     batch_tokens: int, packing: bool, seed: int,
                     n_micro_batches: int) -> list[list[int]]:
    """``n_micro_batches`` micro-batches (lists of example indices) drawn by the mixture.

    ``tasks[i]`` is the task of example ``i``; every task in ``rates`` must have an example.
    """
    members = {name: [i for i, task in enumerate(tasks) if task == name] for name in rates}
    names = list(rates)
    mean_length = [float(np.mean([lengths[i] for i in members[name]])) for name in names]
    draw = np.array([rates[name] / length for name, length in zip(names, mean_length,
                                                                   strict=True)])
    draw /= draw.sum()
    # Enough draws for the run at the mean drawn length; doubled (same prefix) if too few.
    mean_drawn = float(np.dot(draw, mean_length))
    n_draws = int(n_micro_batches * max(1.0, batch_tokens / mean_drawn) * 1.2) + 16
    while True:
        choices = np.random.default_rng(seed).choice(len(names), size=n_draws, p=draw)
        streams = [_passes(members[name], f"{seed}:{name}") for name in names]
        order = [next(streams[task]) for task in choices.tolist()]
        batches = plan_batches([lengths[i] for i in order], batch_tokens=batch_tokens,
                               packing=packing)
        # The last batch may be short only because the draws ended: keep complete ones.
        if len(batches) > n_micro_batches:
            return [[order[j] for j in batch] for batch in batches[:n_micro_batches]]
        n_draws *= 2


def task_token_counts(micro_batches: list[list[int]] | list[range], lengths: list[int],
                      tasks: list[str]) -> dict[str, int]:
    """Tokens of each task in these micro-batches (every task named, 0 when absent)."""
    counts = Counter({name: 0 for name in dict.fromkeys(tasks)})
    for batch in micro_batches:
        for index in batch:
            counts[tasks[index]] += lengths[index]
    return dict(counts)


def _passes(indices: list[int], seed: str) -> Iterator[int]:
    """A task's examples, pass after pass, each pass in its own seeded order."""
    epoch = 0
    while True:
        order = list(indices)
        random.Random(f"{seed}:{epoch}").shuffle(order)
        yield from order
        epoch += 1
