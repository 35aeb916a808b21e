"""benchmarks/preference_vs_trl.py: its data, its fairness rules and its whole path (--smoke).

The benchmark itself is run by hand, never by the test suite; these tests keep its data honest
(a rejected answer must be a name the context does not hold), its tunelab config valid, and
its smoke mode running at HEAD where TRL is installed (TRL is not a tunelab dependency).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tunelab.config import config_from_dict

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports provenance.py and smoke.py from beside it
_spec = importlib.util.spec_from_file_location("preference_vs_trl",
                                               BENCHMARKS / "preference_vs_trl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_rejected_answers_are_names_the_context_does_not_hold(tmp_path):
    pairs = bench.write_pairs(tmp_path / "pairs.jsonl", 60, seed=0)
    rows = [json.loads(line) for line in bench.QA_DATA.read_text().splitlines()[:60]]
    assert [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()] \
        == pairs
    for pair, row in zip(pairs, rows, strict=True):
        assert pair["prompt"] == bench.PROMPT.format(context=row["context"],
                                                     question=row["question"])
        assert pair["chosen"] == f" {row['answer']}"
        assert pair["rejected"] != pair["chosen"]
        assert pair["rejected"].strip() not in row["context"]
    assert bench.write_pairs(tmp_path / "again.jsonl", 60, seed=0) == pairs  # seeded
    assert bench.write_pairs(tmp_path / "other.jsonl", 60, seed=1) != pairs


def test_the_tunelab_config_is_dpo_on_the_same_lora_with_a_constant_rate(tmp_path):
    bench.write_pairs(tmp_path / "p.jsonl", 4, seed=0)
    spec = {"scratch": str(tmp_path), "tunelab_model": str(tmp_path),
            "data_path": str(tmp_path / "p.jsonl"),
            "tunelab_steps": 3, "lr": 5e-5, "seed": 0, "batch_tokens": 1024,
            "max_seq_len": 256}
    config = config_from_dict(bench.tunelab_config(spec), base_dir=tmp_path)
    assert (config.method.objective, config.method.beta) == ("dpo", bench.BETA)
    assert (config.method.r, config.method.alpha, config.method.dropout) == (16, 32, 0.0)
    assert (config.train.schedule, config.train.warmup_steps, config.train.max_steps) == (
        "constant", 0, 3)
    assert config.train.samples == 0 and config.data.validation == []


def test_trl_batches_count_real_tokens_and_padded_positions():
    rows = [{"prompt_ids": [1] * 10, "chosen_ids": [2] * 3, "rejected_ids": [3] * 5},
            {"prompt_ids": [1] * 4, "chosen_ids": [2] * 2, "rejected_ids": [3] * 1},
            {"prompt_ids": [1] * 6, "chosen_ids": [2] * 2, "rejected_ids": [3] * 2}]
    batches = bench.trl_batches(rows, batch_pairs=2)
    assert batches[0] == {"pairs": 2, "tokens": 13 + 15 + 6 + 5, "positions": 4 * 15}
    assert batches[1] == {"pairs": 1, "tokens": 16, "positions": 2 * 8}


def test_smoke_runs_both_sides_and_agrees_at_step_one(tmp_path):
    pytest.importorskip("trl")
    bench.main(["--smoke", "--out", str(tmp_path / "result.json")])
    result = json.loads((tmp_path / "result.json").read_text())
    assert set(result["summary"]) == {"trl", "tunelab", "tunelab_vs_trl"}
    for side in ("trl", "tunelab"):
        assert result["runs"][side]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
        assert sum(result["runs"][side]["pairs_per_step"]) == 8
    # TRL's own token count is the one recounted from its tokenized pairs, step by step
    assert result["runs"]["trl"]["tokens_per_step"] == \
        result["runs"]["trl"]["tokens_per_step_recounted"]
    step_one = result["step_one"]
    assert step_one["within_tolerance"], step_one
    assert step_one["tokenization"]["identical_answer_ids"] == step_one["tokenization"]["answers"]
    assert "against TRL's `DPOTrainer`" in published().headline_preference_trl(result)


def test_the_grpo_reward_credits_the_name_on_the_first_line():
    completions = [" Arnold", " Arnold\nQuestion: who?", " Arnold Schwarzenegger", " Leon",
                   " none\nArnold"]
    assert bench.names_the_answer(None, completions, ["Arnold"] * 5) == [1.0, 1.0, 0.5, 0.0,
                                                                         0.0]


def test_the_tunelab_grpo_config_matches_trls_settings(tmp_path):
    bench.write_prompts(tmp_path / "prompts.jsonl", 4)
    spec = {"scratch": str(tmp_path), "tunelab_model": str(tmp_path),
            "data_path": str(tmp_path / "prompts.jsonl"), "steps": 2, "lr": 5e-5, "seed": 0,
            "batch_tokens": 8192, "max_seq_len": 256, "objective": "grpo",
            **bench.GRPO_WORKLOADS["smoke"]}
    config = config_from_dict(bench.tunelab_config(spec), base_dir=tmp_path)
    rl = config.rl
    assert config.method.objective == "grpo" and config.method.dropout == 0.0
    assert (rl.group_size, rl.prompts_per_step, rl.max_new_tokens) == (4, 2, 4)
    assert (rl.loss, rl.kl_weight, rl.scale_rewards, rl.mask_truncated, rl.preflight_prompts) \
        == ("dapo", 0.0, True, bench.MASK_TRUNCATED, 0)
    assert rl.rewards[0].function.endswith("preference_vs_trl.py:names_the_answer")


def test_grpo_smoke_scores_trls_first_answers_alike_on_both_sides(tmp_path):
    pytest.importorskip("trl")
    bench.main(["--smoke", "--objective", "grpo", "--out", str(tmp_path / "grpo.json")])
    result = json.loads((tmp_path / "grpo.json").read_text())
    assert result["objective"] == "grpo"
    for side in ("trl", "tunelab"):
        assert result["runs"][side]["prompts_per_step"] == [2, 2]
    step_one = result["step_one"]
    assert step_one["within_tolerance"], step_one
    assert step_one["identical_prompt_ids"] == step_one["prompts"]
    assert "against TRL's `GRPOTrainer`" in published().headline_grpo_trl(result)


def published():
    """scripts/published.py, whose renderers the documents use for the committed results."""
    spec = importlib.util.spec_from_file_location(
        "published", BENCHMARKS.parent / "scripts" / "published.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

