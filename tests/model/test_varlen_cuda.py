"""Packed rows through torch's flash-attention varlen kernel equal one causal SDPA per example.

Needs a CUDA GPU (the kernel exists only there): marked ``gpu`` and skipped without one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.model import varlen

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flash_varlen_equals_sdpa_per_example(kv_heads, window):
    """With a sliding window (transformers' meaning: a query sees keys < window back) the
    kernel's window_size=(window - 1, 0) against SDPA with the banded mask."""
    assert varlen._FLASH_VARLEN is not None, "torch.nn.attention.varlen is missing"
    torch.manual_seed(0)
    lengths, heads, dim = [37, 300, 1, 129], 8, 64
    total = sum(lengths)
    query, key, value = (torch.randn(1, n, total, dim, device="cuda", dtype=torch.bfloat16,
                                     requires_grad=True)
                         for n in (heads, kv_heads, kv_heads))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    cu = varlen.cu_seq_lens(position_ids)
    assert varlen._flash_varlen_usable(query, dim ** -0.5, window)
    fused, weights = varlen.varlen_attention_forward(None, query, key, value, None,
                                                     scaling=dim ** -0.5, cu_seq_lens_q=cu,
                                                     sliding_window=window)
    assert weights is None  # what transformers expects back from an attention function
    grad = torch.randn_like(fused)
    fused_grads = torch.autograd.grad(fused, (query, key, value), grad)

    bounds = cu.tolist()

    def band(n: int) -> torch.Tensor | None:
        if window is None:
            return None
        distance = torch.arange(n, device="cuda")[:, None] - torch.arange(n, device="cuda")
        return (distance >= 0) & (distance < window)

    reference = torch.cat([F.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=band(b - a),
        is_causal=window is None, enable_gqa=heads != kv_heads)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dim=2)
    reference = reference.transpose(1, 2)
    reference_grads = torch.autograd.grad(reference, (query, key, value), grad)
    assert fused.shape == (1, total, heads, dim)
    torch.testing.assert_close(fused, reference, atol=2e-2, rtol=2e-2)
    for mine, theirs in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(mine, theirs, atol=5e-2, rtol=5e-2)
