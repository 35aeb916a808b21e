"""Attention over packed rows, one example at a time: no T×T mask, no work on masked blocks.

A packed row holds many short examples. Plain SDPA with a block-diagonal mask computes the whole
``T × T`` score matrix and throws most of it away; here each example's slice of the row goes
through causal SDPA on its own, which costs Σ lengthᵢ² instead of T². Padded batches, and batches
without boundaries, take transformers' ordinary SDPA path unchanged.

``enable(model)`` switches a loaded model to it; the loop passes ``cu_seq_lens_q`` (cumulative
example lengths, as flash-attention's varlen kernels take them) with every packed batch. On a
CUDA GPU in bf16/fp16 with torch's own flash-attention varlen kernel
(``torch.nn.attention.varlen``, torch ≥ 2.10), the whole row goes through that kernel in one call
instead of one SDPA call per example.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tunelab.model.architecture import text_config

NAME = "tunelab_varlen"
logger = logging.getLogger(__name__)


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None,
                             cu_seq_lens_q: torch.Tensor | None = None,
                             segment_masks: list[torch.Tensor] | None = None,
                             segment_positions: list[torch.Tensor] | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             **kwargs):
    """Causal SDPA per example when ``cu_seq_lens_q`` marks the examples of a single packed row.

    ``segment_masks`` (one boolean ``[length, length]`` mask per example) replaces the causal
    pattern, e.g. for a prompt followed by several continuations that each see only the prompt;
    ``segment_positions`` then gives each example's position ids, which a sliding window counts
    distance in. ``sliding_window`` (the layer's, as transformers passes it: a query sees the keys
    less than that many positions back) and ``softcap`` (Gemma's ``tanh`` cap on the scores) are
    honoured exactly as the model's unpacked forward honours them.
    """
    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, softcap=softcap,
                                      sliding_window=sliding_window, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if (segment_masks is None and dropout == 0.0 and softcap is None
            and _flash_varlen_usable(query, scaling, sliding_window)):
        return _flash_varlen(query, key, value, cu_seq_lens_q, scaling, groups,
                             sliding_window), None
    outputs = []
    bounds = cu_seq_lens_q.tolist()
    for number, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        mask = segment_masks[number] if segment_masks is not None else None
        positions = segment_positions[number] if segment_positions is not None else None
        mask = _windowed(mask, end - start, sliding_window, positions, query.device)
        outputs.append(_example_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], mask,
            dropout=dropout, scaling=scaling, groups=groups, softcap=softcap))
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _windowed(mask: torch.Tensor | None, length: int, window: int | None,
              positions: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """One example's boolean mask with the sliding window applied (None: plain causal).

    The band is ``0 <= q - k < window`` in position ids (transformers' ``sliding_window_overlay``
    on top of causal); an example no longer than the window needs none.
    """
    if window is None or (length <= window and mask is None):
        return mask
    if positions is None:
        positions = torch.arange(length, device=device)
    positions = positions.to(device)
    distance = positions[:, None] - positions[None, :]
    band = distance < window
    return band & (distance >= 0) if mask is None else mask & band


def _example_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None, *, dropout: float, scaling: float | None,
                       groups: int, softcap: float | None) -> torch.Tensor:
    """One example's attention ``[1, heads, length, dim]``: SDPA, or the explicit product when
    the scores are soft-capped (SDPA has no cap; this is transformers' eager computation)."""
    if softcap is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                              is_causal=mask is None, dropout_p=dropout,
                                              scale=scaling, enable_gqa=groups > 1)
    if groups > 1:
        key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool,
                          device=query.device).tril()
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return torch.matmul(weights, value)


def _flash_varlen_usable(query: torch.Tensor, scaling: float | None,
                         sliding_window: int | None) -> bool:
    default_scale = scaling is None or abs(scaling * query.shape[-1] ** 0.5 - 1) < 1e-6
    window_ok = sliding_window is None or "window_size" in _FLASH_VARLEN_ARGS
    return (_FLASH_VARLEN is not None and query.is_cuda and query.shape[-1] <= 256
            and query.dtype in (torch.bfloat16, torch.float16) and window_ok
            and ("scale" in _FLASH_VARLEN_ARGS or default_scale))


def _flash_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  cu_seq_lens_q: torch.Tensor, scaling: float | None, groups: int,
                  sliding_window: int | None = None) -> torch.Tensor:
    """The packed row through torch's flash-attention varlen kernel: ``[1, heads, T, dim]`` in,
    ``[1, T, heads, dim]`` out (what transformers' attention functions return). A sliding window
    is flash-attention's ``window_size=(window - 1, 0)``: ``window - 1`` keys back, none ahead."""
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
    if groups > 1 and "enable_gqa" not in _FLASH_VARLEN_ARGS:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    left = sliding_window - 1 if sliding_window is not None else -1
    extra = ({"window_size": (left, 0)} if "window_size" in _FLASH_VARLEN_ARGS
             else {"is_causal": True})  # torch 2.10 spelled causal is_causal
    if groups > 1 and "enable_gqa" in _FLASH_VARLEN_ARGS:
        extra["enable_gqa"] = True
    if "scale" in _FLASH_VARLEN_ARGS:
        extra["scale"] = scaling
    out = _FLASH_VARLEN(q, k, v, cu, cu, max_len, max_len, **extra)
    return out.unsqueeze(0)


def _load_flash_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    parameters = frozenset(inspect.signature(varlen_attn).parameters)
    if "window_size" not in parameters and "is_causal" not in parameters:
        warnings.warn("torch.nn.attention.varlen.varlen_attn takes neither window_size nor "
                      "is_causal: packed rows use one SDPA call per example", stacklevel=2)
        return None, frozenset()
    return varlen_attn, parameters


_FLASH_VARLEN, _FLASH_VARLEN_ARGS = _load_flash_varlen()


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative example lengths of a packed row, from position ids that restart at 0."""
    starts = torch.nonzero(position_ids[0] == 0).flatten()
    total = torch.tensor([position_ids.shape[1]], device=position_ids.device)
    return torch.cat([starts, total]).to(torch.int32)


#: attention layer kinds (``config.layer_types``) the per-example path computes exactly
HONOURED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def unsupported_features(hf_config) -> list[str]:
    """What a model's attention does that per-example attention would not (empty: none).

    Sliding windows and soft-capped scores are honoured; chunked attention (Llama 4),
    bidirectional attention, attention sinks and non-attention layers (linear attention,
    Mamba) are not, and such a model keeps transformers' own path for packed rows.
    """
    text = text_config(hf_config)
    found = []
    if getattr(text, "attention_chunk_size", None):
        found.append(f"chunked attention (attention_chunk_size={text.attention_chunk_size})")
    if getattr(text, "use_bidirectional_attention", False):
        found.append("bidirectional attention")
    other = sorted(set(getattr(text, "layer_types", None) or ()) - HONOURED_LAYER_TYPES)
    if other:
        found.append(f"layer types {', '.join(other)}")
    if getattr(text, "model_type", "") in ("gpt_oss",):
        found.append("attention sinks")
    return found


def enable(model: torch.nn.Module) -> bool:
    """Use per-example attention for packed rows if the model runs on SDPA (or on eager
    attention for its soft-capped scores); True if it did.

    A model whose attention has a feature this path cannot honour keeps transformers' own
    packed path (a block mask built from the position ids), with a one-line notice.
    """
    implementation = getattr(model.config, "_attn_implementation", None)
    capped = getattr(text_config(model.config), "attn_logit_softcapping", None) is not None
    # eager attention is what a model with soft-capped scores runs (SDPA has no cap)
    if implementation != "sdpa" and not (implementation == "eager" and capped):
        return False
    unsupported = unsupported_features(model.config)
    if unsupported:
        logger.warning("packed rows use transformers' block-mask attention, not per-example "
                       "attention: this model has %s", "; ".join(unsupported))
        return False
    model.set_attn_implementation(NAME)
    return True


AttentionInterface.register(NAME, varlen_attention_forward)
# Padded batches still need their padding mask, built exactly as for SDPA.
AttentionMaskInterface.register(NAME, sdpa_mask)
