"""The packaged SmolLM2-135M end to end: the shipped example's data, a few LoRA steps, from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rich.console import Console

from tunelab.config import load_config
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
