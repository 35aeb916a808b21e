"""The forgetting probe: shipped samples, tuned − base with paired intervals, the base cached,
packed losses equal to unpacked ones, and a tiny run trained through the CLI measured."""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import pytest
import torch
from helpers import run_ok, write_config

from tunelab.data.packing import collate
from tunelab.data.tokenize import tokenize_examples
from tunelab.experiments import forgetting
from tunelab.experiments.forgetting import (
    PROBE_LABELS,
    forgetting_of_run,
    forgetting_probe,
    passage_losses,
    samples,
)
from tunelab.train.loss import batch_loss_sum

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model with a fresh LoRA adapter (B = 0: the same function as the base)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj",
                                                                  "down_proj"]))
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _set_lora_b(model, value: float | None) -> None:
    """LoRA B matrices to zero (None) or to seeded noise of scale ``value``."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.zeros_like(parameter) if value is None else
                                torch.randn(parameter.shape, generator=generator) * value)


def _finite(result: dict) -> bool:
    numbers = [result[part][key] for part in ("general_loss", "probe_task")
               for key in ("base", "tuned", "delta")]
    numbers += [bound for part in ("general_loss", "probe_task") for bound in result[part]["ci"]]
    return all(math.isfinite(number) for number in numbers)


def test_shipped_samples_load_and_ship_in_the_wheel():
    general, probe = samples()
    assert len(general) == 32 and len(probe) == 64
    assert all(len(example.segments[0].text.split()) >= 18 for example in general)
    assert sorted({example.label for example in probe}) == sorted(PROBE_LABELS)
    assert all(example.segments[0].text.strip() for example in probe)
    # pyproject.toml's package-data names every data file beside the samples
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["tunelab"]
    folder = ROOT / "src" / "tunelab" / "assets" / "forgetting"
    for path in [*folder.glob("*.jsonl"), folder / "README.md"]:
        relative = str(path.relative_to(ROOT / "src" / "tunelab"))
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_zeroed_adapter_costs_exactly_nothing(tiny):
    model, tokenizer = tiny
    _set_lora_b(model, None)
    result = forgetting_probe(model, tokenizer, n_resamples=200)
    assert _finite(result)
    assert result["n_passages"] == 32 and result["n_probe"] == 64
    for part in ("general_loss", "probe_task"):
        assert result[part]["delta"] == 0.0
        assert result[part]["ci"] == [0.0, 0.0]
        assert result[part]["tuned"] == result[part]["base"]


def test_perturbed_adapter_changes_the_loss_and_delta_is_tuned_minus_base(tiny):
    model, tokenizer = tiny
    _set_lora_b(model, 0.5)
    try:
        result = forgetting_probe(model, tokenizer, n_resamples=200)
    finally:
        _set_lora_b(model, None)
    assert _finite(result)
    loss, probe = result["general_loss"], result["probe_task"]
    assert loss["delta"] != 0.0
    assert loss["ci"][0] <= loss["delta"] <= loss["ci"][1]
    for part in (loss, probe):
        assert part["delta"] == pytest.approx(part["tuned"] - part["base"], abs=1e-12)
    assert probe["metric"] == "accuracy" and 0 <= probe["base"] <= 1


def test_base_is_measured_once_per_cache(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = []
    measure = forgetting.measure
    monkeypatch.setattr(forgetting, "measure",
                        lambda *args: calls.append(1) or measure(*args))
    cache: dict = {}
    first = forgetting_probe(model, tokenizer, base_cache=cache, n_resamples=50)
    second = forgetting_probe(model, tokenizer, base_cache=cache, n_resamples=50)
    assert len(calls) == 3 and len(cache) == 1  # base once, tuned twice
    assert first == second
    with pytest.raises(ValueError, match="peft model"):
        forgetting_probe(model.get_base_model(), tokenizer)


def test_packed_passage_losses_equal_each_passage_alone_and_the_training_loss(tiny):
    model, tokenizer = tiny
    general, _ = samples()
    passages = general[:6]
    with torch.no_grad():
        sums, tokens = passage_losses(model, tokenizer, passages)
        tokenized = tokenize_examples(passages, tokenizer, max_seq_len=512, train_on="all")
        alone = [float(batch_loss_sum(model, collate([example], packing=True)))
                 for example in tokenized]
        together = float(batch_loss_sum(model, collate(tokenized, packing=True)))
    assert sums == pytest.approx(alone, rel=1e-4)
    assert sum(sums) == pytest.approx(together, rel=1e-4)
    assert tokens == [len(example.input_ids) - 1 for example in tokenized]


@pytest.mark.parametrize("method", [None, {"kind": "full"}], ids=["lora", "full"])
def test_forgetting_of_a_tiny_run_trained_from_the_cli(tmp_path, tiny_model_dir, monkeypatch,
                                                       capsys, method):
    # a full fine-tuning run has no adapter to disable: its base is loaded apart, once
    config = write_config(tmp_path, tiny_model_dir, sizes=(40, 8), max_steps=3, samples=0,
                          method=method)
    run_ok(monkeypatch, capsys, "train", str(config))
    cache: dict = {}
    result = forgetting_of_run(tmp_path / "runs" / "reviews", base_cache=cache)
    assert _finite(result) and len(cache) == 1
    assert result["general_loss"]["delta"] != 0.0  # three steps at lr 1e-2 moved the model
    assert result["probe_task"]["name"].startswith("language identification")
    assert forgetting_of_run(tmp_path / "runs" / "reviews", base_cache=cache) == result
