"""Shared LoRA dropout: one mask per input, the dropout a projection sees, exact under
activation checkpointing, and nothing changed outside training."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tunelab.data.packing import Batch
from tunelab.model import varlen
from tunelab.model.adapters import apply_method
from tunelab.model.dropout import SharedDropout, share_lora_dropout
from tunelab.train.loss import batch_loss_sum

DIMS = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 128}


def lora_model(dropout: float, *, share: bool, checkpointing: bool = False):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(attn_implementation="sdpa", **DIMS))
    model.config.use_cache = False
    varlen.enable(model)
    model = apply_method(model, kind="lora", r=4, alpha=8, dropout=dropout,
                         targets="all-linear", rslora=False)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the adapters matter
            torch.nn.init.normal_(parameter, std=0.5)
    if share:
        share_lora_dropout(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def packed_batch() -> Batch:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (1, 96), generator=generator)
    positions = torch.arange(32).repeat(3)[None]
    return Batch(ids, ids.clone(), positions, None, 3, 96, 93)


def lora_inputs(model, batch: Batch) -> dict[str, torch.Tensor]:
    """What each lora_A of the first layer read, and the projections' own input, by name."""
    seen, hooks = {}, []
    layer = model.get_base_model().model.layers[0]
    for part in (layer.self_attn, layer.mlp):
        for name, module in part.named_children():
            if hasattr(module, "lora_A"):
                hooks.append(module.lora_A["default"].register_forward_pre_hook(
                    lambda _, args, name=name: seen.__setitem__(name, args[0])))
                hooks.append(module.base_layer.register_forward_pre_hook(
                    lambda _, args, name=name: seen.__setitem__(name + ".input", args[0])))
    batch_loss_sum(model, batch)
    for hook in hooks:
        hook.remove()
    return seen


def test_projections_reading_one_input_share_one_mask_of_the_right_rate():
    model = lora_model(0.5, share=True)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj
                      .lora_dropout["default"], SharedDropout)
    model.train()
    seen = lora_inputs(model, packed_batch())
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]
    assert seen["gate_proj"] is seen["up_proj"]
    for name in ("q_proj", "o_proj", "gate_proj", "down_proj"):
        dropped, original = seen[name], seen[name + ".input"]
        kept = dropped != 0
        # inverted dropout: the kept half is scaled by 1 / (1 - p)
        torch.testing.assert_close(dropped[kept], 2 * original[kept])
        assert 0.4 < kept.float().mean().item() < 0.6
    # different inputs draw different masks
    assert not torch.equal(seen["q_proj"] != 0, (seen["gate_proj"] != 0))


def test_without_training_nothing_is_dropped_and_outputs_match_peft():
    shared, own = lora_model(0.5, share=True), lora_model(0.5, share=False)
    shared.eval()
    own.eval()
    batch = packed_batch()
    with torch.no_grad():
        torch.testing.assert_close(batch_loss_sum(shared, batch), batch_loss_sum(own, batch))


def test_activation_checkpointing_reproduces_the_masks():
    batch = packed_batch()
    gradients = []
    for checkpointing in (False, True):
        model = lora_model(0.3, share=True, checkpointing=checkpointing)
        model.train()
        torch.manual_seed(7)
        batch_loss_sum(model, batch).backward()
        gradients.append({name: p.grad for name, p in model.named_parameters()
                          if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


@pytest.mark.parametrize("dropout", [0.0])
def test_nothing_to_share_without_dropout(dropout):
    model = lora_model(dropout, share=False)
    assert share_lora_dropout(model) == 0
