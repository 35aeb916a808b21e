"""Optimizer, learning-rate schedule and gradient clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tunelab.config import TrainConfig


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no decay on biases and norms; fused on CUDA."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999),
                             eps=1e-8, fused=on_cuda or None)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    schedule: str) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine or linear decay to zero (or constant)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps,
                               schedule=schedule),
    )


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm (when ``max_norm`` is set) and return the norm before it."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not parameters:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm else float("inf"))
    return float(norm)


@dataclass
class Optimization:
    """The optimizer and learning-rate schedule of a run, as ``config.train`` asks for them."""

    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    warmup_steps: int


def build_optimization(model: nn.Module, train: TrainConfig, *, total_steps: int) -> Optimization:
    """AdamW and its schedule over ``total_steps``: what the loop and the calibration both use.

    Under FSDP build it after wrapping the model: its parameters are then the shards.
    """
    warmup = (train.warmup_steps if train.warmup_steps is not None
              else math.ceil(train.warmup_ratio * total_steps))
    optimizer = build_optimizer(model, lr=train.lr, weight_decay=train.weight_decay)
    return Optimization(optimizer, build_scheduler(optimizer, total_steps=total_steps,
                                                   warmup_steps=warmup,
                                                   schedule=train.schedule), warmup)
