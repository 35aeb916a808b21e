"""QLoRA on CPU: a 4-bit NF4 base (bitsandbytes' CPU backend) with a LoRA adapter that learns."""

from __future__ import annotations

import json

import pytest
from helpers import make_config
from rich.console import Console

from tunelab.model.adapters import apply_method
from tunelab.model.load import load_model
from tunelab.train.loop import train


def test_the_base_loads_as_nf4_with_double_quantisation(qlora_model_dir):
    from bitsandbytes.nn import Linear4bit

    model = load_model(qlora_model_dir, device="cpu", load_in_4bit=True)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"
    assert layer.weight.quant_state.nested  # double quantisation: the scales are quantised
    tuned = apply_method(model, kind="qlora", r=4, alpha=8, dropout=0.0, targets="all-linear",
                         rslora=False)
    trainable = [name for name, p in tuned.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_qlora_trains_on_cpu_and_saves_a_peft_adapter(tmp_path, qlora_model_dir):
    config = make_config(tmp_path, qlora_model_dir, epochs=2, samples=0,
                         method={"kind": "qlora", "r": 4, "alpha": 8, "dropout": 0.0})
    result = train(config, console=Console(quiet=True))
    assert result.val_loss_after < result.val_loss_before * 0.7
    adapter = json.loads((result.run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4


def test_the_planner_counts_the_4bit_base_as_loaded(tmp_path, qlora_model_dir):
    """tunelab plan's 4-bit line: the NF4 base's bytes (packed codes, quantised scales, their
    scales, float32 embeddings and norms) equal what bitsandbytes holds after loading."""
    from bitsandbytes.nn import Linear4bit

    from tunelab.planner.predict import plan

    method = {"kind": "qlora", "r": 4, "alpha": 8, "dropout": 0.0}
    predicted = plan(make_config(tmp_path, qlora_model_dir, method=method)).memory
    nf4_bytes = predicted["weights_by_dtype"]["nf4 (4-bit base)"]
    assert predicted["breakdown_bytes"]["weights"] == nf4_bytes
    model = load_model(qlora_model_dir, device="cpu", load_in_4bit=True)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            state = layer.weight.quant_state
            held += state.absmax.numel() * state.absmax.element_size()  # 8-bit: nested
            held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert nf4_bytes == pytest.approx(held, rel=0.01)
    float_bytes = sum(p.numel() for p in load_model(qlora_model_dir).parameters()) * 4
    assert nf4_bytes < 0.5 * float_bytes
