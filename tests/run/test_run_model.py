"""A run's model loaded again (run/load.py): a run whose data files or base path are gone (copied
to another machine) still loads its model, on the base its adapter names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from export_runs import copied_run, liven_adapter, train_tiny_run
from helpers import run_cli

from tunelab.errors import ConfigError, ModelError
from tunelab.model.load import BASE_SIDECAR, describe_base, resolve_model_path
from tunelab.run import load_run_model, open_run

PROMPT = "Review: the movie was good\nSentiment:"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    run = train_tiny_run(tmp_path_factory.mktemp("portable"), tiny_model_dir)
    liven_adapter(run)  # so that the base alone, or another base, gives other logits
    return run


def logits_of(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text).input_ids])).logits[0]


def test_a_run_whose_data_is_gone_loads_its_model_but_eval_and_resume_say_so(
        tiny_run, tmp_path, monkeypatch, capsys):
    model, tokenizer, _ = load_run_model(tiny_run)
    expected = logits_of(model, tokenizer)
    copy = copied_run(tiny_run, tmp_path / "copy")
    moved, _, config = load_run_model(copy)
    assert logits_of(moved, tokenizer).equal(expected)
    assert config.data.train == ["/elsewhere/tiny-run/train.jsonl"]  # read as saved, not checked
    gone = "data.train: data file '/elsewhere/tiny-run/train.jsonl' does not exist"
    with pytest.raises(ConfigError, match=gone):
        open_run(copy)  # training (resume) and evaluation need the data
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(copy / "config.yaml"))
    assert code == 2 and "/elsewhere/tiny-run/train.jsonl" in err


def test_a_copied_run_whose_base_path_is_gone_loads_on_the_base_its_adapter_names(
        tiny_run, tiny_model_dir, tmp_path):
    model, tokenizer, _ = load_run_model(tiny_run)
    copy = copied_run(tiny_run, tmp_path / "copy", model_path="/elsewhere/tiny")
    moved, _, _ = load_run_model(copy)  # the sidecar finds the same weights here by hash
    assert logits_of(moved, tokenizer).equal(logits_of(model, tokenizer))


def test_a_copied_run_whose_base_is_nowhere_says_which_weights_it_needs(tiny_run, tmp_path):
    sidecar = json.loads((tiny_run / "adapter" / BASE_SIDECAR).read_text())
    copy = copied_run(tiny_run, tmp_path / "copy", model_path="/elsewhere/tiny",
                      sidecar={**sidecar, "reference": "/elsewhere/tiny"})
    with pytest.raises(ModelError, match="sha256") as error:
        load_run_model(copy)
    assert "/elsewhere/tiny" in str(error.value)


@pytest.mark.slow
def test_a_run_trained_elsewhere_on_smollm2_loads_on_the_embedded_copy(embedded_model,
                                                                       tiny_run, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_folder = resolve_model_path(embedded_model)
    # trained on the same SmolLM2 weights, kept at a path that does not exist here
    sidecar = {**describe_base(base_folder), "reference": "/elsewhere/smollm2"}
    copy = copied_run(tiny_run, tmp_path / "copy", model_path="/elsewhere/smollm2")
    shutil.rmtree(copy / "adapter")
    adapter = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    expected = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), adapter)
    with torch.no_grad():  # an adapter that changes the outputs, so another base would show
        for name, parameter in expected.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    expected.save_pretrained(copy / "adapter")
    (copy / "adapter" / BASE_SIDECAR).write_text(json.dumps(sidecar))
    model, tokenizer, _ = load_run_model(copy)
    assert logits_of(model, tokenizer).equal(logits_of(expected.eval(), tokenizer))
