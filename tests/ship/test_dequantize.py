"""tunelab export --to merged of a QLoRA run: the adapter is merged into the de-quantised NF4
base it was trained on (not into the original float weights, and not into 4-bit weights), and
the merged folder is plain float safetensors that reproduces the 4-bit base + adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_config, run_cli, run_ok
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.model.load import load_model
from tunelab.run import RunDir, load_run_model, open_run
from tunelab.run.load import attach_adapter
from tunelab.ship.export import logit_gap
from tunelab.train.loop import train

PROMPTS = ["Review: the movie was good\nSentiment:", "The capital of France is Paris."]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, qlora_model_dir) -> Path:
    config = make_config(tmp_path_factory.mktemp("qlora-run"), qlora_model_dir, max_steps=6,
                         samples=0, method={"kind": "qlora", "r": 4, "alpha": 8,
                                            "dropout": 0.0})
    return train(config, console=Console(quiet=True)).run_dir


def load_tuned(base, run: Path):
    """``base`` with the run's adapter, whatever base it is (the tests' float and NF4 bases)."""
    return attach_adapter(base, RunDir(run), open_run(run, need_data=False)[1])


def logits_for(model, tokenizer) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(text).input_ids])).logits[0].float()
                for text in PROMPTS]


def test_cli_merges_a_qlora_adapter_into_the_dequantised_base(qlora_run, qlora_model_dir,
                                                             monkeypatch, capsys):
    out = " ".join(run_ok(monkeypatch, capsys, "export", str(qlora_run), "--to",
                          "merged").split())
    assert "merged folder (transformers) vs base + adapter" in out and "FAIL" not in out, out
    folder = qlora_run / "export" / "merged"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(qlora_model_dir)
    merged = logits_for(AutoModelForCausalLM.from_pretrained(folder), tokenizer)
    # What was trained: the 4-bit base (bitsandbytes' own CPU kernel) with the adapter on top.
    # Its kernel rounds differently from a float matmul with the de-quantised weights (measured
    # on this random tiny model: 3 % of the largest logit), so it is the nearer reference, not
    # an exact one; the exact one is the weight test below.
    trained = load_tuned(load_model(qlora_model_dir, device="cpu", load_in_4bit=True), qlora_run)
    near, scale, _ = logit_gap(merged, logits_for(trained.eval(), tokenizer))
    # The adapter merged into the original float weights is another model: off by the whole
    # quantisation error (measured: 60 % of the largest logit).
    float_base = load_tuned(load_model(qlora_model_dir, device="cpu"), qlora_run)
    off, _, _ = logit_gap(merged, logits_for(float_base.eval(), tokenizer))
    assert near < 0.1 * scale and off > 5 * near, (near, off, scale)


def test_the_merged_weights_are_the_dequantised_weights_plus_the_adapter(qlora_run,
                                                                          qlora_model_dir):
    model, _, _ = load_run_model(qlora_run, dequantize=True)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(layer.base_layer) is torch.nn.Linear  # no Linear4bit left to merge into
    update = layer.get_delta_weight("default")
    assert update.abs().max() > 0  # the adapter learned something to merge
    quantised = load_model(qlora_model_dir, device="cpu", load_in_4bit=True)
    import bitsandbytes.functional as bnb_functional

    weight4 = quantised.model.layers[0].self_attn.q_proj.weight
    dequantised = bnb_functional.dequantize_4bit(weight4.data, weight4.quant_state)
    merged = model.merge_and_unload().model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged, dequantised + update, rtol=0, atol=1e-6)


def test_generate_chat_serve_and_eval_load_a_qlora_run_on_its_4bit_base(qlora_run,
                                                                   qlora_model_dir):
    """Not the float base: the adapter corrects the NF4 weights it trained on (a float base
    is off by the whole quantisation error, the first test above)."""
    from bitsandbytes.nn import Linear4bit

    from tunelab.eval.evaluate import _load_models
    from tunelab.ship.serve import load_served_models

    trained = load_tuned(load_model(qlora_model_dir, device="cpu", load_in_4bit=True), qlora_run)
    tokenizer = AutoTokenizer.from_pretrained(qlora_model_dir)
    expected = logits_for(trained.eval(), tokenizer)
    model, _, _ = load_run_model(qlora_run)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer,
                      Linear4bit)
    served, _, _ = load_served_models([str(qlora_run)])
    served.set_adapter("adapter0")
    _, config = open_run(qlora_run, need_data=False)
    evaluated, _, _ = _load_models(config, qlora_run, want_base=False, want_tuned=True)["tuned"]
    for loaded in (model, served, evaluated):
        assert all(a.equal(b) for a, b in zip(logits_for(loaded, tokenizer), expected,
                                              strict=True))


def test_a_qlora_run_and_a_lora_run_on_the_same_path_are_not_served_together(
        qlora_run, qlora_model_dir, tmp_path):
    from export_runs import train_tiny_run

    from tunelab.errors import RunError
    from tunelab.ship.serve import load_served_models

    lora_run = train_tiny_run(tmp_path, qlora_model_dir)
    with pytest.raises(RunError, match=r"different base models.*4 bits \(QLoRA\)"):
        load_served_models([str(qlora_run), str(lora_run)])


def test_without_bitsandbytes_a_qlora_run_is_a_clear_error_not_a_float_base(
        qlora_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    code, _, message = run_cli(monkeypatch, capsys, "generate", str(qlora_run), "--prompt", "Hi")
    assert code == 2
    assert "trained with QLoRA on a 4-bit (NF4) base" in message
    assert 'pip install "tunelab[qlora]"' in message and "--to merged" in message
