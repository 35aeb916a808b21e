"""Chunked cross-entropy on completion tokens: the full ``[tokens × vocab]`` logits never exist.

The model body gives hidden states; only the positions whose next token carries loss go through
the output layer, a chunk at a time. Each chunk's logits are recomputed in the backward pass
(activation checkpointing) instead of being kept, so peak memory holds one chunk of logits.
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
                 chunk_tokens: int = 2048, softcap: float | None = None) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose next-token label is not −100.

    Returns a float32 scalar sum (divide by the number of target tokens for the mean); it equals
    ``F.cross_entropy(model_logits[:, :-1], labels[:, 1:], reduction="sum")``.
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    positions = hidden[:, :-1][selected]  # [n_targets, hidden]
    target_ids = targets[selected]
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


def batch_loss_sum(model: nn.Module, batch: Batch, *, chunk_tokens: int = 2048) -> torch.Tensor:
    """Forward a batch and return its summed completion-token loss."""
    _, output_layer, softcap = model_parts(model)
    return chunked_loss(hidden_states(model, batch), batch.labels, output_layer,
                        chunk_tokens=chunk_tokens, softcap=softcap)
