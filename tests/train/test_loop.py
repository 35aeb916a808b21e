"""Training on the tiny model: run directory, learning, exact resume, reloadable adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_config, quiet
from peft import PeftModel
from safetensors.torch import load_file

from tunelab.model.load import load_model
from tunelab.train.loop import train


def test_lora_run_learns_and_writes_a_complete_run_directory(tmp_path, tiny_model_dir):
    result = train(make_config(tmp_path, tiny_model_dir, epochs=3), console=quiet())
    run = result.run_dir
    assert result.val_loss_after < result.val_loss_before * 0.5
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["seed"] == 0
    assert len(manifest["data"]) == 2 and all(len(h) == 64 for h in manifest["data"].values())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == list(range(1, result.steps + 1))
    assert len(result.samples) == 2 and all("after" in s for s in result.samples)


def test_resume_after_interruption_ends_bit_identical(tmp_path, tiny_model_dir):
    whole = train(make_config(tmp_path / "a", tiny_model_dir, save_every=3), console=quiet())
    config = make_config(tmp_path / "b", tiny_model_dir, save_every=3)
    stopped = train(config, stop_after_steps=4, console=quiet())
    assert stopped.steps == 4 and not (stopped.run_dir / "adapter").exists()
    resumed = train(config, resume=stopped.run_dir, console=quiet())
    assert resumed.steps == whole.steps
    assert resumed.final_train_loss == whole.final_train_loss  # bit-identical on CPU
    assert resumed.val_loss_after == whole.val_loss_after
    a = load_file(whole.run_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# Reloading must give back the model that training ended with. float32 on CPU; the trained model
# runs the packed (varlen) attention and the reloaded one sdpa, which differ by float rounding
# only: 1e-5 is a thousand times below what one lost training step changes (see the tests).
LOGITS_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def record_final_model(monkeypatch) -> dict:
    """Run the real ``save_final`` and note, at that moment, the trained model's logits on a
    review and its weights: what the saved files must reproduce."""
    from tunelab.train import loop

    seen = {}

    def save_and_record(model, tokenizer, folder, **options):
        seen["input_ids"] = tokenizer("Review: the movie was dull\nSentiment: negative",
                                      return_tensors="pt").input_ids
        was_training = model.training
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=seen["input_ids"]).logits.detach().clone()
        model.train(was_training)
        seen["weights"] = {name: value.detach().clone()
                           for name, value in model.state_dict().items()}
        real_save_final(model, tokenizer, folder, **options)

    real_save_final = loop.save_final
    monkeypatch.setattr(loop, "save_final", save_and_record)
    return seen


def test_saved_adapter_reloads_with_peft_to_the_trained_model(tmp_path, tiny_model_dir,
                                                              monkeypatch):
    trained = record_final_model(monkeypatch)
    result = train(make_config(tmp_path, tiny_model_dir), console=quiet())
    base = load_model(tiny_model_dir, device="cpu").eval()
    with torch.no_grad():
        base_logits = base(input_ids=trained["input_ids"]).logits
    tuned = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    with torch.no_grad():
        tuned_logits = tuned(input_ids=trained["input_ids"]).logits
    torch.testing.assert_close(tuned_logits, trained["logits"], **LOGITS_TOLERANCE)
    assert not torch.allclose(base_logits, trained["logits"], atol=1e-2)  # training did act


def test_full_fine_tuning_saves_the_trained_weights(tmp_path, tiny_model_dir, monkeypatch):
    trained = record_final_model(monkeypatch)
    result = train(make_config(tmp_path, tiny_model_dir, lr=1e-3, method={"kind": "full"}),
                   console=quiet())
    assert result.val_loss_after < result.val_loss_before
    reloaded = load_model(str(result.run_dir / "model"), device="cpu").eval()
    saved = reloaded.state_dict()
    assert saved.keys() == trained["weights"].keys()
    for name, value in trained["weights"].items():
        torch.testing.assert_close(saved[name], value, atol=0, rtol=0, msg=name)  # bit-exact
    with torch.no_grad():
        logits = reloaded(input_ids=trained["input_ids"]).logits
    torch.testing.assert_close(logits, trained["logits"], **LOGITS_TOLERANCE)
    base = load_model(tiny_model_dir, device="cpu").state_dict()
    assert not all(torch.equal(base[name], value) for name, value in saved.items())


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir):
    from tunelab.errors import RunError

    config = make_config(tmp_path, tiny_model_dir, max_steps=2)
    train(config, console=quiet())
    with pytest.raises(RunError, match="already exists"):
        train(config, console=quiet())


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path, tiny_model_dir):
    import signal
    import subprocess
    import sys
    import time

    import yaml

    # One malloc for both processes (the command would re-execute under jemalloc): the
    # alignment of buffers can change the order of float sums in the CPU kernels.
    def config_file(folder: Path) -> Path:
        config = make_config(folder, tiny_model_dir, epochs=40, lr=1e-3,
                             allocator="system").model_dump()
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    whole = train(make_config(tmp_path / "a", tiny_model_dir, epochs=40, lr=1e-3,
                              allocator="system"), console=quiet())
    config = config_file(tmp_path / "b")
    run = tmp_path / "b" / "runs" / "reviews"
    # A disposition of SIG_IGN is inherited across exec, and some library run earlier in the same
    # pytest process (torchrun's in-process launcher) leaves SIGINT ignored: restore the default,
    # as a terminal's Ctrl-C would find it.
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600  # a loaded machine can take minutes to import torch
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"loss"') >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 130, output
    assert "Interrupted: saved checkpoint" in output
    assert not (run / "adapter").exists()
    resumed = train(config_from_yaml(config), resume=run, console=quiet())
    assert resumed.steps == whole.steps
    assert resumed.final_train_loss == whole.final_train_loss


def config_from_yaml(path: Path):
    from tunelab.config import load_config

    return load_config(path)
