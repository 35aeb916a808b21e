"""The fused SwiGLU: the same outputs and gradients as transformers' MLP, one saved tensor less."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

from tunelab.model.swiglu import SwiGLU, fuse_gated_activations


def test_gradients_are_silu_times_up_differentiated():
    generator = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(6, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    up = torch.randn(6, 5, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(SwiGLU.apply, (gate, up))
    grad = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    fused = torch.autograd.grad(SwiGLU.apply(gate, up), (gate, up), grad)
    reference = torch.autograd.grad(F.silu(gate) * up, (gate, up), grad)
    for mine, theirs in zip(fused, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_a_fused_model_trains_like_the_original_and_keeps_less():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         num_hidden_layers=2, vocab_size=64))
    fused = copy.deepcopy(model)
    assert fuse_gated_activations(fused) == 2
    ids = torch.randint(0, 64, (2, 12))
    saved = {}
    for name, candidate in (("original", model), ("fused", fused)):
        sizes: list[int] = []

        def pack(tensor, sizes=sizes):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = candidate(input_ids=ids, labels=ids).loss
        loss.backward()
        saved[name] = (loss.item(), sum(size for size in sizes if size == 2 * 12 * 64))
    assert saved["fused"][0] == saved["original"][0]
    assert saved["original"][1] - saved["fused"][1] == 2 * (2 * 12 * 64)  # one per layer
    for (name, mine), theirs in zip(fused.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gelu_mlps_are_left_alone():
    model = GemmaForCausalLM(GemmaConfig(hidden_size=32, intermediate_size=64, head_dim=8,
                                         num_attention_heads=4, num_key_value_heads=1,
                                         num_hidden_layers=1, vocab_size=64))
    assert fuse_gated_activations(model) == 0
