"""Chunked cross-entropy on completion tokens: the full ``[tokens × vocab]`` logits never exist.

The model body gives hidden states; only the positions whose next token carries loss go through
the output layer, a chunk at a time, so peak memory holds one chunk of logits. When the output
layer is frozen (adapters), each chunk's gradient with respect to its hidden states is computed
right after its loss, in the forward pass, and only that ``[targets × hidden]`` gradient is kept
for the backward pass (the fused linear cross-entropy of Liger-Kernel and torchtune): the logits
are computed once. A trainable output layer (full fine-tuning) instead recomputes each chunk's
logits in the backward pass (activation checkpointing), which accumulates its weight gradient
where autograd, DDP and FSDP expect it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunelab.data.packing import Batch
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.model.adapters import model_parts
from tunelab.model.varlen import cu_seq_lens


def hidden_states(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The last hidden states ``[rows, length, hidden]`` of the decoder body."""
    body, _, _ = model_parts(model)
    extra = {}
    if batch.attention_mask is None and batch.input_ids.shape[0] == 1:
        # Packed row: example boundaries for per-example attention (model/varlen.py).
        extra["cu_seq_lens_q"] = cu_seq_lens(batch.position_ids)
    output = body(input_ids=batch.input_ids, position_ids=batch.position_ids,
                  attention_mask=batch.attention_mask, use_cache=False, **extra)
    return output.last_hidden_state


def chunked_loss(hidden: torch.Tensor, labels: torch.Tensor, output_layer: nn.Module, *,
                 chunk_tokens: int = 512, softcap: float | None = None) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose next-token label is not −100.

    Returns a float32 scalar sum (divide by the number of target tokens for the mean); it equals
    ``F.cross_entropy(model_logits[:, :-1], labels[:, 1:], reduction="sum")``.
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    positions = hidden[:, :-1][selected]  # [n_targets, hidden]
    target_ids = targets[selected]
    if (torch.is_grad_enabled() and positions.requires_grad
            and not any(p.requires_grad for p in output_layer.parameters())):
        return _GradientInForward.apply(positions, target_ids, output_layer, softcap,
                                        chunk_tokens)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, positions.shape[0], chunk_tokens):
        args = (positions[start:start + chunk_tokens], target_ids[start:start + chunk_tokens])
        if torch.is_grad_enabled() and positions.shape[0] > chunk_tokens:
            total = total + checkpoint(_chunk_loss, output_layer, softcap, *args,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(output_layer, softcap, *args)
    return total


def _chunk_loss(output_layer: nn.Module, softcap: float | None, hidden: torch.Tensor,
                target_ids: torch.Tensor) -> torch.Tensor:
    logits = output_layer(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, target_ids, reduction="sum")


class _GradientInForward(torch.autograd.Function):
    """The summed loss of ``positions`` through a frozen output layer, its gradient computed a
    chunk at a time during the forward pass; backward scales that gradient by the upstream one
    (the loss is a sum, so its gradient is linear in the upstream scalar)."""

    @staticmethod
    def forward(ctx, positions: torch.Tensor, target_ids: torch.Tensor, output_layer: nn.Module,
                softcap: float | None, chunk_tokens: int) -> torch.Tensor:
        total = positions.new_zeros((), dtype=torch.float32)
        gradient = torch.empty_like(positions)
        for start in range(0, positions.shape[0], chunk_tokens):
            chunk = positions[start:start + chunk_tokens].detach().requires_grad_()
            with torch.enable_grad():
                loss = _chunk_loss(output_layer, softcap, chunk,
                                   target_ids[start:start + chunk_tokens])
                (gradient[start:start + chunk_tokens],) = torch.autograd.grad(loss, chunk)
            total += loss.detach()
        ctx.save_for_backward(gradient)
        return total

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return gradient * upstream.to(gradient.dtype), None, None, None, None


def batch_loss_sum(model: nn.Module, batch: Batch, *, chunk_tokens: int = 512) -> torch.Tensor:
    """Forward a batch and return its summed completion-token loss."""
    _, output_layer, softcap = model_parts(model)
    return chunked_loss(hidden_states(model, batch), batch.labels, output_layer,
                        chunk_tokens=chunk_tokens, softcap=softcap)


def target_logps(model: nn.Module, batch: Batch, *, chunk_tokens: int = 512,
                 temperature: float = 1.0, entropy: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log-probability of each target token, the sequence it belongs to, the entropy of each
    target position's distribution or None), target tokens in batch order.

    The log-probabilities are of ``softmax(logits / temperature)`` (reinforcement scores its
    samples under the distribution they were drawn from). The output layer runs a chunk of
    target positions at a time and, under autograd, is recomputed in the backward pass, so no
    ``[tokens × vocabulary]`` tensor is kept. A new sequence starts wherever the position
    restarts at 0 (packed rows) and at every row (padded rows).
    """
    _, output_layer, softcap = model_parts(model)
    hidden = hidden_states(model, batch)
    targets = batch.labels[:, 1:]
    selected = targets != IGNORE_INDEX
    positions = hidden[:, :-1][selected]
    target_ids = targets[selected]
    owners = ((batch.position_ids.flatten() == 0).cumsum(0) - 1).view_as(
        batch.position_ids)[:, 1:][selected]
    logps, entropies = [], []
    for start in range(0, positions.shape[0], chunk_tokens):
        args = (positions[start:start + chunk_tokens], target_ids[start:start + chunk_tokens])
        if torch.is_grad_enabled() and positions.requires_grad:
            chunk = checkpoint(_chunk_logps, output_layer, softcap, temperature, entropy, *args,
                               use_reentrant=False)
        else:
            chunk = _chunk_logps(output_layer, softcap, temperature, entropy, *args)
        logps.append(chunk[0])
        entropies.append(chunk[1])
    if not logps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, owners, empty if entropy else None
    return torch.cat(logps), owners, torch.cat(entropies) if entropy else None


def _chunk_logps(output_layer: nn.Module, softcap: float | None, temperature: float,
                 entropy: bool, hidden: torch.Tensor, target_ids: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    logits = output_layer(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    logps = -F.cross_entropy(logits, target_ids, reduction="none")
    if not entropy:
        return logps, logps.new_zeros(0)
    with torch.no_grad():
        log_softmax = torch.log_softmax(logits, dim=-1)
        spread = -(log_softmax.exp() * log_softmax).sum(-1)
    return logps, spread
