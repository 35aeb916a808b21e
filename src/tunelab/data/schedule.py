"""The run's schedule: every micro-batch in order, grouped into optimizer steps.

``run_schedule`` is the one place that lays a config's training examples out over the run. The
training loop trains on it, the planner predicts from it and ``plan --calibrate`` times its
steps, so all three see the same micro-batches — a multitask config's mixture included.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.config import Config
from tunelab.data.mixture import data_rates, schedule_mixture
from tunelab.data.packing import plan_batches


@dataclass(frozen=True)
class Schedule:
    """Every micro-batch of a run (example indices), in order, ``grad_accum`` per step."""

    micro_batches: list[list[int]]
    grad_accum: int
    # Multitask (data.tasks): each task's share of the training tokens; None otherwise.
    rates: dict[str, float] | None = None

    @property
    def total_steps(self) -> int:
        return len(self.micro_batches) // self.grad_accum

    def steps(self) -> list[list[list[int]]]:
        """The micro-batches of each optimizer step."""
        accum = self.grad_accum
        return [self.micro_batches[start:start + accum]
                for start in range(0, len(self.micro_batches), accum)]


def run_schedule(config: Config, lengths: list[int], tasks: list[str] | None = None) -> Schedule:
    """The schedule ``config.train`` asks for over examples of ``lengths`` (multitask: drawn by
    the mixture ``config.data`` asks for, given each example's task in ``tasks``)."""
    train = config.train
    rates = data_rates(config.data, lengths, tasks) if tasks else None
    return Schedule(schedule_micro_batches(
        lengths, batch_tokens=train.batch_tokens, packing=train.packing, seed=train.seed,
        epochs=train.epochs, max_steps=train.max_steps, grad_accum=train.grad_accum,
        tasks=tasks, rates=rates), train.grad_accum, rates)


def schedule_micro_batches(lengths: list[int], *, batch_tokens: int, packing: bool, seed: int,
                           epochs: float, max_steps: int | None,
                           grad_accum: int, tasks: list[str] | None = None,
                           rates: dict[str, float] | None = None) -> list[list[int]]:
    """Every micro-batch of a run in order: seeded epoch plans, concatenated and cut to length.

    A run of ``max_steps`` steps, else of ``epochs`` passes rounded to whole optimizer steps.
    Multitask (``rates``: each task's token share; ``tasks``: each example's task): the same
    number of micro-batches, drawn by ``mixture.schedule_mixture``.
    """
    plan = lambda epoch: plan_batches(lengths, batch_tokens=batch_tokens,  # noqa: E731
                                      packing=packing, seed=seed + epoch)
    first = plan(0)
    if max_steps:
        wanted = max_steps * grad_accum
    else:
        wanted = max(1, round(epochs * len(first) / grad_accum)) * grad_accum
    if rates:  # multitask: as many micro-batches, drawn by the mixture
        return schedule_mixture(lengths, tasks or [], rates, batch_tokens=batch_tokens,
                                packing=packing, seed=seed, n_micro_batches=wanted)
    batches, epoch = list(first), 1
    while len(batches) < wanted:
        batches += plan(epoch)
        epoch += 1
    return batches[:wanted]
