"""The run directory: its metrics log streams to the trackers train.report_to names; a run
whose data files or base path are gone (copied to another machine) still loads its model."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from tunelab import cli
from tunelab.config import config_from_dict
from tunelab.errors import ConfigError, ModelError
from tunelab.model.load import BASE_SIDECAR, describe_base, resolve_model_path
from tunelab.runs import MetricsLog, load_run_model, open_run, open_trackers, stream_metrics_to
from tunelab.train.loop import train

sys.path.insert(0, str(Path(__file__).parent / "ship"))
from export_runs import copied_run, liven_adapter, train_tiny_run  # noqa: E402

PROMPT = "Review: the movie was good\nSentiment:"


def test_report_to_streams_the_same_metrics_to_tensorboard_and_mlflow(tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"the movie was {word}", "label": label}) + "\n"
                            for word, label in [("good", "positive"), ("bad", "negative")] * 8))
    config = config_from_dict({
        "name": "tracked", "output_dir": str(tmp_path / "runs"), "model": {"path": tiny_model_dir},
        "method": {"kind": "lora", "r": 2, "alpha": 4},
        "data": {"train": str(data), "validation": str(data),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"max_steps": 3, "batch_tokens": 64, "max_seq_len": 32, "samples": 0,
                  "report_to": ["tensorboard", "mlflow"]},
    })
    run_dir = train(config, console=Console(quiet=True)).run_dir
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    val_losses = {r["step"]: r["val_loss"] for r in logged if "val_loss" in r}

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)
    assert {e.step: e.value for e in events.Scalars("val_loss")} == pytest.approx(val_losses)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.run_name == "tracked" and run.data.params["train.max_steps"] == "3"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(losses)


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"report_to": ["mlflow"]}}))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "mlflow.entities", None)
    with pytest.raises(ConfigError, match=r'pip install "tunelab\[mlflow\]"'):
        open_trackers(tmp_path)


def test_stream_metrics_to_sees_each_record_inside_the_block_only(tmp_path):
    seen = []
    log = MetricsLog(tmp_path / "metrics.jsonl")
    with stream_metrics_to(seen.append):
        inside = MetricsLog(tmp_path / "metrics.jsonl")
        inside.write(step=1, loss=2.0)
    log.write(step=2, loss=1.0)
    assert [record["step"] for record in seen] == [1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


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
    monkeypatch.setattr(sys, "argv", ["tunelab", "eval", str(copy / "config.yaml")])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2 and "/elsewhere/tiny-run/train.jsonl" in capsys.readouterr().err


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
