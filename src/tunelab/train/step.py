"""One optimizer step: the gradients of a step's micro-batches, clipped, then the update.

The training loop and ``plan --calibrate`` both step through here, so a calibration step costs
what a run's step costs: the same loss scaling over ranks, finite checks, clipping, optimizer
and schedule. The two halves are separate calls because the loop guards only the update
against Ctrl-C (``loop.py``): a forward/backward pass may be interrupted, an update may not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tunelab.data.packing import Batch
from tunelab.errors import TrainingError
from tunelab.train import distributed
from tunelab.train.optim import Optimization, clip_gradients


@dataclass(frozen=True)
class StepLosses:
    """What one step's gradients came from: the mean loss and the norm before clipping."""

    loss: float  # mean over the step's loss units (target tokens; pairs), all ranks
    grad_norm: float
    tokens: int  # all ranks, padding excluded
    target_tokens: int
    # A preference step's statistics (reward accuracy, margin, ...), means over its pairs.
    stats: dict[str, float] = field(default_factory=dict)


def forward_backward(step_model: torch.nn.Module, batches: list[Batch], *,
                     device: torch.device, cluster: distributed.Cluster,
                     max_grad_norm: float | None, step: int,
                     sources: Callable[[], list[str]]) -> StepLosses:
    """Accumulate the gradients of optimizer step ``step`` over ``batches`` and clip them.

    The loss is the mean over the step's loss units (target tokens; a preference step's pairs)
    of all ranks, whatever the micro-batch sizes. ``step_model`` returns a batch's summed loss,
    or (summed loss, summed statistics). ``sources`` names the step's examples (file:line) if
    the loss is not finite.
    """
    n_units = cluster.total(sum(batch.loss_units for batch in batches))
    loss_sum, stat_sums = 0.0, {}
    for index, batch in enumerate(batches):
        batch = batch.to(device)
        # Gradients are reduced across ranks once per step, with the last micro-batch.
        with distributed.gradient_sync(step_model, sync=index == len(batches) - 1):
            with autocast(device):
                output = step_model(batch)
            loss, stats = output if isinstance(output, tuple) else (output, {})
            if not torch.isfinite(loss):
                raise non_finite(float(loss), step, sources())
            # DDP and FSDP average gradients over the ranks: × world_size makes it the sum.
            (loss / max(n_units, 1) * cluster.world_size).backward()
        loss_sum += float(loss.detach())
        for name, value in stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + float(value)
    grad_norm = clip_gradients(step_model, max_grad_norm)
    if not math.isfinite(grad_norm):
        raise non_finite(grad_norm, step, sources(), what="gradient norm")
    n_target = cluster.total(sum(batch.n_target_tokens for batch in batches))
    return StepLosses(cluster.total(loss_sum) / max(n_units, 1), grad_norm,
                      int(cluster.total(sum(batch.n_tokens for batch in batches))),
                      int(n_target), {name: cluster.total(value) / max(n_units, 1)
                                      for name, value in sorted(stat_sums.items())})


def update(optimization: Optimization) -> None:
    """Apply the accumulated gradients, advance the schedule, drop the gradients."""
    optimization.optimizer.step()
    optimization.scheduler.step()
    optimization.optimizer.zero_grad(set_to_none=True)


def non_finite(value: float, step: int, sources: list[str],
               what: str = "loss") -> TrainingError:
    """The error a NaN or infinite loss (or gradient norm) stops the run with."""
    shown = sources[:5]
    return TrainingError(
        f"the {what} became {value} at step {step}; the batch held {', '.join(shown)}"
        f"{' ...' if len(sources) > 5 else ''}",
        where="train",
        fix="lower train.lr, keep train.max_grad_norm set, or use model.dtype float32; "
        "resume from the last checkpoint with tunelab train --resume",
    )


def autocast(device: torch.device):
    """bf16 autocast on GPUs that support it; plain fp32 elsewhere."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
