"""DPO, SimPO, KTO and GRPO from the CLI on real files: runs that learn, resume bit-identically,
start from another run, evaluate like SFT runs, and stop clearly on bad input."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.train.loop import train

ADAPTER = "adapter/adapter_model.safetensors"
GOOD, BAD = ["good", "great", "fun", "lovely"], ["bad", "dull", "awful", "weak"]


def reviews(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        adjective = rng.choice(GOOD + BAD)
        rows.append((f"Review: The movie was {adjective}. Sentiment:",
                     "positive" if adjective in GOOD else "negative"))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_pairs(folder: Path) -> tuple[str, str, str]:
    flip = {"positive": "negative", "negative": "positive"}
    pair = lambda p, label: {"prompt": p, "chosen": f" {label}",  # noqa: E731
                             "rejected": f" {flip[label]}"}
    train_file = write_jsonl(folder / "pairs.jsonl", [pair(*r) for r in reviews(32, 0)])
    valid_file = write_jsonl(folder / "pairs-valid.jsonl", [pair(*r) for r in reviews(12, 1)])
    test_file = write_jsonl(folder / "test.jsonl", [{"prompt": p, "completion": f" {label}"}
                                                    for p, label in reviews(12, 2)])
    return train_file, valid_file, test_file


def write_config(folder: Path, model_dir: str, name: str, method: dict, *, data: dict,
                 train: dict | None = None, **sections) -> Path:
    config = {"name": name, "output_dir": str(folder / "runs"), "model": {"path": model_dir},
              "method": {"kind": "lora", "r": 4, "alpha": 8, **method}, "data": data,
              "train": {"max_steps": 6, "lr": 0.01, "batch_tokens": 256, "eval_every": 3,
                        "samples": 1, "save_every": 2, **(train or {})}, **sections}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    train_file, valid_file, test_file = write_pairs(folder)
    return folder, {"train": train_file, "validation": valid_file, "test": test_file}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["dpo", "simpo", "kto"])
def test_preference_objective_learns_from_the_cli(monkeypatch, capsys, pairs, tiny_model_dir,
                                                   objective):
    folder, data = pairs
    config = write_config(folder, tiny_model_dir, f"{objective}-run",
                          {"objective": objective, "beta": 0.5}, data=data)
    code, out, err = run_cli(monkeypatch, capsys, "train", str(config), "--overwrite")
    assert code == 0, err
    run = folder / "runs" / f"{objective}-run"
    logged = records(run)
    validations = [r for r in logged if "val_reward_accuracy" in r]
    first, last = validations[0], validations[-1]
    assert last["val_loss"] < first["val_loss"]
    assert last["val_margin"] > first["val_margin"]
    assert last["val_pairs"] == (12 if objective != "kto" else 24)  # KTO: each pair unpaired
    low, high = last["val_reward_accuracy_ci"]
    assert low <= last["val_reward_accuracy"] <= high
    if objective == "dpo":  # policy == reference before the first step
        assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    if objective != "simpo":  # KL(policy ‖ reference) on the validation prompts, at the end
        assert last["val_kl_ci"][0] <= last["val_kl"] <= last["val_kl_ci"][1]
    else:
        assert "val_kl" not in last
    steps = [r for r in logged if "reward_accuracy" in r]
    assert len(steps) == 6 and all("chosen_logp" in r and "rejected_logp" in r for r in steps)
    # tunelab eval treats the run like an SFT run (its test file is ordinary examples)
    with_eval = yaml.safe_load(config.read_text())
    with_eval["eval"] = {"task": "classification", "labels": ["positive", "negative"]}
    config.write_text(yaml.safe_dump(with_eval))
    code, out, err = run_cli(monkeypatch, capsys, "eval", str(config))
    assert code == 0, err
    result = json.loads((run / "eval" / "test.json").read_text())
    assert set(result["models"]) == {"base", "tuned"} and result["n"] == 12


def test_dpo_resume_is_bit_identical_and_full_fine_tuning_uses_precomputed_references(
        pairs, tiny_model_dir, tmp_path):
    folder, data = pairs
    config = load_config(write_config(tmp_path, tiny_model_dir, "whole",
                                      {"objective": "dpo"}, data=data))
    whole = load_file(train(config).run_dir / ADAPTER)
    stopped = load_config(write_config(tmp_path, tiny_model_dir, "stopped",
                                       {"objective": "dpo"}, data=data))
    run = train(stopped, stop_after_steps=4).run_dir
    train(load_config(run / "config.yaml"), resume=run)
    resumed = load_file(run / ADAPTER)
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)
    # full fine-tuning: the references are the starting model's, so step 1's loss is ln 2
    full = load_config(write_config(tmp_path, tiny_model_dir, "full", {"objective": "dpo",
                                    "kind": "full"}, data=data, train={"lr": 1e-3}))
    result = train(full)
    first_step = next(r for r in records(result.run_dir) if "reward_accuracy" in r)
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.val_loss_after < result.val_loss_before


def test_dpo_after_sft_starts_from_the_sft_adapter(monkeypatch, capsys, pairs, tiny_model_dir,
                                                    tmp_path):
    folder, data = pairs
    sft_data = {"train": data["test"], "validation": data["test"]}
    sft = write_config(tmp_path, tiny_model_dir, "sft", {}, data=sft_data)
    assert run_cli(monkeypatch, capsys, "train", str(sft))[0] == 0
    sft_adapter = load_file(tmp_path / "runs" / "sft" / ADAPTER)
    dpo = write_config(tmp_path, tiny_model_dir, "dpo-after-sft", {"objective": "dpo"},
                       data=data, train={"init_from": "runs/sft", "max_steps": 1, "lr": 1e-12})
    code, out, err = run_cli(monkeypatch, capsys, "train", str(dpo))
    assert code == 0, err
    after = load_file(tmp_path / "runs" / "dpo-after-sft" / ADAPTER)
    assert all(torch.allclose(after[name], sft_adapter[name], atol=1e-6) for name in after)
    # the reference stays the base: the SFT adapter already moved the margin off ln 2
    first = next(r for r in records(tmp_path / "runs" / "dpo-after-sft") if "val_loss" in r)
    assert first["val_loss"] != pytest.approx(math.log(2), abs=1e-4)
    wrong = write_config(tmp_path, tiny_model_dir, "bad-start", {"objective": "dpo",
                         "r": 8}, data=data, train={"init_from": "runs/sft"})
    code, out, err = run_cli(monkeypatch, capsys, "train", str(wrong))
    assert code != 0 and "train.init_from" in out + err and "method.r" in out + err


def test_malformed_pairs_name_the_line_and_leave_no_run(monkeypatch, capsys, pairs,
                                                        tiny_model_dir, tmp_path):
    _, data = pairs
    lines = Path(data["train"]).read_text().splitlines()
    lines[4] = json.dumps({"prompt": "Review: fine. Sentiment:", "chosen": " positive"})
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path, tiny_model_dir, "broken", {"objective": "dpo"},
                          data={**data, "train": str(broken)})
    code, out, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code != 0 and f"{broken}:5" in out + err
    assert not (tmp_path / "runs" / "broken").exists()
    # and SFT refuses preference pairs with the fix
    sft = write_config(tmp_path, tiny_model_dir, "sft-on-pairs", {}, data=data)
    code, out, err = run_cli(monkeypatch, capsys, "train", str(sft))
    assert code != 0 and "method.objective: dpo" in " ".join((out + err).split())


# --- reinforcement ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    rows = lambda n, seed: [{"prompt": p, "completion": f" {label}"}  # noqa: E731
                            for p, label in reviews(n, seed)]
    return folder, {"train": write_jsonl(folder / "train.jsonl", rows(24, 0)),
                    "validation": write_jsonl(folder / "valid.jsonl", rows(6, 1))}


GRPO_EVAL = {"task": "classification", "labels": ["positive", "negative"], "predict": "generate",
             "max_new_tokens": 3}


def grpo_config(folder: Path, model_dir: str, data: dict, name: str, **rl) -> Path:
    return write_config(folder, model_dir, name, {"objective": "grpo"}, data=data,
                        train={"max_steps": 4, "eval_every": 2, "batch_tokens": 512},
                        eval=GRPO_EVAL, rl={"group_size": 4, "prompts_per_step": 2,
                                            "max_new_tokens": 3, "preflight_prompts": 4,
                                            "max_tied_share": 1.0, "mask_truncated": False,
                                            **rl})


@pytest.fixture(scope="module")
def sft_start(prompts, tiny_model_dir):
    """An SFT run on the same prompts: its answers sometimes match, so groups do not all tie."""
    folder, data = prompts
    config = write_config(folder, tiny_model_dir, "sft-start", {}, data=data,
                          train={"max_steps": 30, "lr": 0.02})
    return train(load_config(config)).run_dir


def test_grpo_from_the_cli_logs_rewards_and_resumes_bit_identically(
        monkeypatch, capsys, prompts, tiny_model_dir, sft_start, tmp_path):
    _, data = prompts
    start = {"init_from": str(sft_start)}
    config = grpo_config(tmp_path, tiny_model_dir, data, "grpo")
    raw = yaml.safe_load(config.read_text())
    raw["train"].update(start)
    config.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 0, err
    run = tmp_path / "runs" / "grpo"
    assert "Pre-flight on 4 prompts × 4 answers" in " ".join(out.split())
    preflight = json.loads((run / "preflight.json").read_text())
    assert 0 <= preflight["pass_at_1"]["value"] <= preflight["pass_at_group"]["value"] <= 1
    steps = [r for r in records(run) if "reward" in r]
    assert len(steps) == 4
    for record in steps:
        assert record["logprob_gap"] < 1e-3  # on-policy: the trainer sees the sampler's tokens
        assert 0 <= record["tied_share"] <= 1 and "reward_task" in record
    assert any(r.get("val_reward") is not None for r in records(run))
    whole = load_file(run / ADAPTER)
    # stopped after 2 steps and resumed: the same answers are sampled, the same adapter results
    stopped = grpo_config(tmp_path, tiny_model_dir, data, "grpo-stopped")
    raw = yaml.safe_load(stopped.read_text())
    raw["train"].update(start)
    stopped.write_text(yaml.safe_dump(raw))
    partial = train(load_config(stopped), stop_after_steps=2).run_dir
    train(load_config(partial / "config.yaml"), resume=partial)
    resumed = load_file(partial / ADAPTER)
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)


def test_grpo_preflight_stops_when_every_group_ties(monkeypatch, capsys, prompts,
                                                     tiny_model_dir, tmp_path):
    _, data = prompts  # the random tiny model never answers a label: every reward is 0
    config = grpo_config(tmp_path, tiny_model_dir, data, "tied", max_tied_share=0.75)
    code, out, err = run_cli(monkeypatch, capsys, "train", str(config))
    text = " ".join((out + err).split())
    assert code != 0 and "nothing to learn from" in text and "train.init_from" in text
    assert not (tmp_path / "runs" / "tied").exists()


def test_grpo_guard_fails_past_its_tolerance(monkeypatch, capsys, prompts, tiny_model_dir,
                                             tmp_path):
    _, data = prompts
    config = grpo_config(tmp_path, tiny_model_dir, data, "guarded", guard_tolerance=1e-12)
    code, out, err = run_cli(monkeypatch, capsys, "train", str(config))
    text = " ".join((out + err).split())
    assert code != 0 and "at step 1 the trainer's log-probabilities" in text
    assert "rl.guard_tolerance" in text


def test_python_reward_with_a_bad_return_names_the_function_and_row(
        monkeypatch, capsys, prompts, tiny_model_dir, tmp_path):
    _, data = prompts
    (tmp_path / "rewards.py").write_text(
        "def half(prompts, completions, **columns):\n"
        "    return [0.5 if i != 1 else 'high' for i in range(len(completions))]\n")
    config = grpo_config(tmp_path, tiny_model_dir, data, "bad-reward",
                         rewards=["python:rewards.py:half"], preflight_prompts=0)
    code, out, err = run_cli(monkeypatch, capsys, "train", str(config))
    text = " ".join((out + err).split())
    assert code != 0 and "half" in text and "'high'" in text and ".jsonl:2" in text
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
