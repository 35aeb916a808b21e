"""Per-example attention over packed rows: soft-capped scores, and the features it refuses."""

from __future__ import annotations

import logging

import architectures
import torch
import transformers

from tunelab.model import varlen


def test_soft_capped_scores_equal_the_eager_forward_one_example_at_a_time():
    """Gemma 2's attn_logit_softcapping: SDPA has no cap (transformers refuses it there, so the
    model runs eager attention), and the packed path computes the capped product itself; the
    reference is transformers' eager attention on each example alone, window included."""
    hf_config = transformers.Gemma2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=architectures.WINDOW, attn_logit_softcapping=0.5)  # a cap that bites
    hf_config._attn_implementation = "eager"  # Gemma 2 has no SDPA: it needs the cap
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.1)
    lengths = [19, 6, 12]
    rows = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n))
            for n in lengths]
    body = model.get_decoder()
    with torch.no_grad():
        expected = torch.cat([body(input_ids=r[None]).last_hidden_state[0] for r in rows])
        assert varlen.enable(model)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        packed = body(input_ids=torch.cat(rows)[None], position_ids=positions,
                      cu_seq_lens_q=varlen.cu_seq_lens(positions)).last_hidden_state[0]
    torch.testing.assert_close(packed, expected, atol=2e-5, rtol=1e-4)
    # and the cap mattered: without it the same rows give other hidden states
    for layer in body.layers:
        layer.self_attn.attn_logit_softcapping = None
    with torch.no_grad():
        free = body(input_ids=torch.cat(rows)[None], position_ids=positions,
                    cu_seq_lens_q=varlen.cu_seq_lens(positions)).last_hidden_state[0]
    assert (free - expected).abs().max() > 1e-2


def test_a_feature_the_packed_path_cannot_honour_keeps_transformers_path_with_a_notice(caplog):
    model = architectures.build("llama")
    model.config.attention_chunk_size = 16  # Llama 4's chunked attention
    with caplog.at_level(logging.WARNING, logger="tunelab.model.varlen"):
        assert not varlen.enable(model)
    assert model.config._attn_implementation == "sdpa"
    assert len(caplog.records) == 1 and "chunked attention" in caplog.records[0].getMessage()
    assert varlen.unsupported_features(architectures.config("gemma3")) == []
