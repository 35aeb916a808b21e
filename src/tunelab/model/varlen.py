"""Attention over packed rows, one example at a time: no T×T mask, no work on masked blocks.

A packed row holds many short examples. Plain SDPA with a block-diagonal mask computes the whole
``T × T`` score matrix and throws most of it away; here each example's slice of the row goes
through causal SDPA on its own, which costs Σ lengthᵢ² instead of T². Padded batches, and batches
without boundaries, take transformers' ordinary SDPA path unchanged.

``enable(model)`` switches a loaded model to it; the loop passes ``cu_seq_lens_q`` (cumulative
example lengths, as flash-attention's varlen kernels take them) with every packed batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "tunelab_varlen"


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None,
                             segment_masks: list[torch.Tensor] | None = None, **kwargs):
    """Causal SDPA per example when ``cu_seq_lens_q`` marks the examples of a single packed row.

    ``segment_masks`` (one boolean ``[length, length]`` mask per example) replaces the causal
    pattern, e.g. for a prompt followed by several continuations that each see only the prompt.
    """
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    outputs = []
    bounds = cu_seq_lens_q.tolist()
    for number, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        mask = segment_masks[number] if segment_masks is not None else None
        outputs.append(F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scaling,
            enable_gqa=groups > 1))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example lengths of a packed row, from position ids that restart at 0."""
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, total]).to(torch.int32)


def enable(model: torch.nn.Module) -> bool:
    """Use per-example attention for packed rows if the model runs on SDPA; True if it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True


AttentionInterface.register(NAME, varlen_attention_forward)
# Padded batches still need their padding mask, built exactly as for SDPA.
AttentionMaskInterface.register(NAME, sdpa_mask)
