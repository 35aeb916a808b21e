"""The report of preference and reinforcement runs, on real tiny DPO and GRPO runs: the numbers
they logged reach their sections, the caption says so when the chosen answers were pushed down,
and an SFT run's page gains none of it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import BAD, GOOD, quiet

from tunelab.config import config_from_dict
from tunelab.report.html import load_run, render_report
from tunelab.run.directory import RunDir
from tunelab.run.metrics import read_metrics
from tunelab.train.loop import train

LETTERS_REWARD = '''
def letters(completions, **columns):
    """Partial credit, so groups do not all tie: the share of letters in the answer."""
    return [sum(ch.isalpha() for ch in text) / max(len(text), 1) for text in completions]
'''


def _reviews(path: Path, n: int, seed: int, *, pairs: bool) -> str:
    """Seeded one-line reviews as preference pairs (right label chosen) or as completions."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            positive = rng.random() < 0.5
            prompt = f"Review: the movie was {rng.choice(GOOD if positive else BAD)}\nSentiment:"
            right, wrong = (" positive", " negative") if positive else (" negative", " positive")
            row = {"prompt": prompt, "chosen": right, "rejected": wrong} if pairs else \
                {"prompt": prompt, "completion": right}
            handle.write(json.dumps(row) + "\n")
    return str(path)


def _config(folder: Path, model_dir: str, objective: str, **sections) -> dict:
    pairs = objective != "grpo"
    return {
        "name": objective, "output_dir": str(folder / "runs"), "model": {"path": model_dir},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "objective": objective},
        "data": {"train": _reviews(folder / "train.jsonl", 24, 0, pairs=pairs),
                 "validation": _reviews(folder / "valid.jsonl", 8, 1, pairs=pairs)},
        "train": {"lr": 1e-2, "batch_tokens": 128, "max_seq_len": 64, "eval_every": 2,
                  "samples": 0, "seed": 0},
        **sections,
    }


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("dpo-report")
    config = _config(folder, tiny_model_dir, "dpo")
    config["train"]["max_steps"] = 4
    return train(config_from_dict(config), console=quiet()).run_dir


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("grpo-report")
    (folder / "rewards.py").write_text(LETTERS_REWARD)
    config = _config(
        folder, tiny_model_dir, "grpo",
        eval={"task": "classification", "labels": ["positive", "negative"],
              "predict": "generate"},
        rl={"rewards": ["task", f"python:{folder / 'rewards.py'}:letters"], "group_size": 2,
            "prompts_per_step": 2, "max_new_tokens": 4, "preflight_prompts": 4,
            "max_tied_share": 1.0})
    config["train"]["max_steps"] = 3
    return train(config_from_dict(config), console=quiet()).run_dir


def _page(run_dir: Path) -> str:
    page = render_report(load_run(run_dir))
    assert "could not be drawn" not in page
    return page


def _section(page: str, anchor: str) -> str:
    start = page.index(f'<section id="{anchor}">')
    return page[start:page.index("</section>", start)]


def _validation(run_dir: Path, key: str) -> list[dict]:
    return [m for m in read_metrics(RunDir(run_dir)) if key in m]


def _first_and_last(run_dir: Path, key: str) -> tuple[dict, dict]:
    records = _validation(run_dir, key)
    return records[0], records[-1]


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def test_preference_section_shows_held_out_accuracy_before_and_after(dpo_run):
    page = _page(dpo_run)
    section = _section(page, "preference")
    first, last = _first_and_last(dpo_run, "val_reward_accuracy")
    assert first["step"] == 0 and last["step"] == 4
    for record in (first, last):
        low, high = record["val_reward_accuracy_ci"]
        assert (f"{record['val_reward_accuracy']:.3f} <span class=\"ci\">[{low:.3f}, "
                f"{high:.3f}]</span>") in section
        for key in ("val_margin", "val_chosen_logp", "val_rejected_logp"):
            assert f"{record[key]:.3f}" in section, key
    assert f"<td>held-out pairs</td><td>{last['val_pairs']}</td>" in section
    low, high = last["val_kl_ci"]  # KL to the reference, measured once after training
    assert "KL to the reference (nats)" in section
    assert f"{last['val_kl']:.3f} <span class=\"ci\">[{low:.3f}, {high:.3f}]</span>" in section
    assert f"{last['val_margin'] - first['val_margin']:+.3f}" in section
    assert section.count("data:image/png;base64,") == 2  # log-probs; accuracy and margin
    assert "Preference · DPO</h2>" in section and 'href="#preference"' in page
    assert "LoRA · DPO · β 0.1" in page  # the method line names the objective
    assert "Validation reward accuracy" in page  # and a card gives the held-out change


def test_the_caption_says_plainly_when_the_chosen_log_prob_fell(dpo_run, tmp_path):
    first, last = _first_and_last(dpo_run, "val_chosen_logp")
    rose = last["val_chosen_logp"] - first["val_chosen_logp"]
    caption = _section(_page(dpo_run), "preference")
    if rose > 0:  # what this seed's run did: the neutral caption, with its number
        assert f"rose by {rose:.3f} nats" in caption and "fell by" not in caption
    copied = _copy(dpo_run, tmp_path)
    records = read_metrics(RunDir(copied))
    first, last = records[0], records[-1]
    assert "val_chosen_logp" in first and "val_chosen_logp" in last
    last.update(val_chosen_logp=first["val_chosen_logp"] - 1.5,
                val_margin=first["val_margin"] + 0.5)
    (copied / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    section = _section(_page(copied), "preference")
    assert ("the chosen answers' log-probability fell by 1.500 nats while the margin grew "
            f"({first['val_margin']:.3f} → {last['val_margin']:.3f}): DPO can widen the margin "
            "by pushing both down; check the task metric (<code>tunelab eval</code>), not the "
            "margin alone") in section


def test_kto_names_its_answers_desirable_and_undesirable(dpo_run, tmp_path):
    copied = _copy(dpo_run, tmp_path)
    config = yaml.safe_load((copied / "config.yaml").read_text())
    config["method"]["objective"] = "kto"
    (copied / "config.yaml").write_text(yaml.safe_dump(config))
    section = _section(_page(copied), "preference")
    assert "Preference · KTO" in section and "desirable log-prob" in section
    assert "held-out answers" in section and "chosen log-prob" not in section


def test_reinforcement_section_shows_preflight_rewards_rollouts_and_time(grpo_run):
    page = _page(grpo_run)
    section = _section(page, "reinforcement")
    preflight = json.loads(RunDir(grpo_run).preflight_file.read_text())
    for label, key in (("pass@1", "pass_at_1"), ("pass@2", "pass_at_group"),
                       ("tied groups (share)", "tied_share")):
        value, (low, high) = preflight[key]["value"], preflight[key]["ci"]
        assert (f"<td>{label}</td><td>{value:.3f}</td><td><span class=\"ci\">[{low:.3f}, "
                f"{high:.3f}]</span></td>") in section, key
    assert f"<td>mean reward</td><td>{preflight['mean_reward']:.3f}</td>" in section
    assert f"<td>mean reward: letters</td><td>{preflight['per_reward']['letters']:.3f}" in section
    assert f"<td>truncated answers (share)</td><td>{preflight['truncated_share']:.3f}" in section
    first, last = _first_and_last(grpo_run, "val_reward")
    for record in (first, last):
        low, high = record["val_reward_ci"]
        assert (f"{record['val_reward']:.3f} <span class=\"ci\">[{low:.3f}, {high:.3f}]"
                "</span>") in section
    steps = [m for m in read_metrics(RunDir(grpo_run)) if "rollout_s" in m]
    rollout_s = sum(m["rollout_s"] for m in steps)
    step_s = sum(max(m["step_s"], m["rollout_s"]) for m in steps)
    assert f"Sampling answers took {rollout_s:,.1f} s of {step_s:,.1f} s of step time" in section
    largest_gap = max(m["logprob_gap"] for m in steps)
    assert f"gap {largest_gap:.3g} nats per token, under the guard's tolerance 0.02" in section
    assert section.count("data:image/png;base64,") == 3  # reward; rollouts; time per step
    assert "LoRA · GRPO" in page and "Pre-flight pass@1" in page


def test_reinforcement_section_without_a_preflight_says_so(grpo_run, tmp_path):
    copied = _copy(grpo_run, tmp_path)
    RunDir(copied).preflight_file.unlink()
    section = _section(_page(copied), "reinforcement")
    assert "No <code>preflight.json</code>" in section and "Reward" in section


def test_an_sft_run_gets_no_objective_section(tmp_path):
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"name": "sft", "method": {"kind": "lora", "r": 4, "objective": "sft"}}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 2.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 5)))
    page = _page(run_dir)
    assert 'id="preference"' not in page and 'id="reinforcement"' not in page
    assert "LoRA · r 4" in page and "supervised" not in page
