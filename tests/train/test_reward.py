"""Rewards of reinforcement runs: the task's scorer per answer, TRL-style python functions whose
bad returns fail with the function and the row named, and advantages as TRL computes them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tunelab.config import EvalConfig
from tunelab.errors import ConfigError, TrainingError
from tunelab.eval.metrics import sentence_chrf
from tunelab.train.reward import advantages, load_rewards, reward_columns, tie_share


def entry(function: str, weight: float = 1.0):
    """One rl.rewards entry as config.RewardConfig reads it (function, weight)."""
    return SimpleNamespace(function=function, weight=weight)


def score(rewards, completions, references=None, fields=None, group_size=1):
    """Rewards.score on answers to one prompt each (fields: one dict per prompt)."""
    n = len(completions)
    references = references or [""] * n
    return rewards.score([f"prompt {i}" for i in range(n)], completions, references,
                         reward_columns(fields or [{}] * n, group_size=group_size),
                         [None] * n, [f"train.jsonl:{i + 1}" for i in range(n)])


# --- the task reward ---------------------------------------------------------------------------


def test_task_reward_classification_matches_labels():
    rewards = load_rewards([entry("task")], EvalConfig(task="classification",
                                                       labels=["negative", "positive"]),
                           config_dir=None)
    scores = score(rewards, [" positive", "Negative.", "no idea", "negative"],
                   [" positive", " positive", " negative", " negative"])
    assert scores.per_function["task"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert scores.total.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_task_reward_qa_exact_match_read_as_evaluation_reads():
    rewards = load_rewards([entry("task")], EvalConfig(task="qa"), config_dir=None)
    # cut at eval.stop ("\n\n") and thinking stripped, as evaluation scores answers
    scores = score(rewards, ["Paris.", "London", "<think>hm</think> paris\n\nand more"],
                   ["Paris", "Paris", "Paris"])
    assert scores.total.tolist() == [1.0, 0.0, 1.0]


def test_task_reward_translation_is_sentence_chrf_over_100():
    rewards = load_rewards([entry("task")], EvalConfig(task="translation"), config_dir=None)
    answers, references = ["guten Morgen", "hallo Welt", ""], ["Guten Morgen!", "Hallo", "ja"]
    scores = score(rewards, answers, references)
    expected = [sentence_chrf(a, r) / 100 for a, r in zip(answers, references, strict=True)]
    np.testing.assert_allclose(scores.total, expected)
    assert 0 < scores.total[0] <= 1 and scores.total[2] == 0


def test_task_reward_without_eval_section_names_the_entry():
    with pytest.raises(ConfigError) as error:
        load_rewards([entry("python:os:getcwd"), entry("task")], None, config_dir=None)
    assert error.value.where == "rl.rewards[1]" and "eval section" in str(error.value)


def test_unknown_reward_kind_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        load_rewards([entry("accuracy")], None, config_dir=None)
    assert error.value.where == "rl.rewards[0]" and "python:module:function" in str(error.value)


# --- python rewards --------------------------------------------------------------------------

REWARDS_FILE = '''
def length(prompts, completions, **columns):
    return [min(len(c), 10) / 10 for c in completions]


def by_answer(completions, answer, **kwargs):
    return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]


def short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def wordy(prompts, completions, **columns):
    return [1.0, "great", 0.5][:len(completions)]


def not_a_number(prompts, completions, **columns):
    return [0.0, 1.0, float("nan")][:len(completions)]


def broken(prompts, completions, **columns):
    raise KeyError("score")


NOT_CALLABLE = 3
'''


@pytest.fixture
def rewards_file(tmp_path):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text(REWARDS_FILE)
    return tmp_path


def test_python_reward_gets_columns_and_weights_sum_skipping_none(rewards_file):
    rewards = load_rewards([entry("python:rewards/mine.py:by_answer", 2.0),
                            entry("python:rewards/mine.py:length", 0.5)],
                           None, config_dir=rewards_file)
    fields = [{"answer": "4"}, {"answer": None}]
    scores = score(rewards, ["4", "5", "5", "4"], fields=fields, group_size=2)
    np.testing.assert_array_equal(scores.per_function["by_answer"], [1.0, 0.0, np.nan, np.nan])
    # a None leaves that reward out of that answer's total; the others still count
    np.testing.assert_allclose(scores.total, [2.05, 0.05, 0.05, 0.05])


def test_answer_no_reward_judged_has_nan_total(rewards_file):
    rewards = load_rewards([entry("python:rewards/mine.py:by_answer")], None,
                           config_dir=rewards_file)
    scores = score(rewards, ["4", "5"], fields=[{"answer": "4"}, {"answer": None}])
    assert scores.total[0] == 1.0 and np.isnan(scores.total[1])


def test_python_reward_by_module_name_beside_the_config(rewards_file):
    rewards = load_rewards([entry("python:mine:length")], None,
                           config_dir=rewards_file / "rewards")
    assert score(rewards, ["abcde"]).total.tolist() == [0.5]


@pytest.mark.parametrize("spec, says", [
    ("python:rewards/mine.py:missing", "has no function 'missing'"),
    ("python:rewards/mine.py:NOT_CALLABLE", "not a function"),
    ("python:rewards/absent.py:length", "does not exist"),
    ("python:no_such_reward_module:length", "no module named"),
    ("python:rewards/mine.py", "names no function"),
])
def test_python_reward_that_cannot_be_loaded_names_the_entry(rewards_file, spec, says):
    with pytest.raises(ConfigError) as error:
        load_rewards([entry("task"), entry(spec)], EvalConfig(task="qa"),
                     config_dir=rewards_file)
    assert error.value.where == "rl.rewards[1]"
    assert says in str(error.value) and error.value.fix


@pytest.mark.parametrize("function, row, says", [
    ("short", 0, "returned 2 values for 3 completions"),
    ("wordy", 1, "'great'"),
    ("not_a_number", 2, "nan"),
])
def test_bad_return_names_function_row_and_value(rewards_file, function, row, says):
    rewards = load_rewards([entry(f"python:rewards/mine.py:{function}")], None,
                           config_dir=rewards_file)
    with pytest.raises(TrainingError) as error:
        score(rewards, ["a", "b", "c"])
    assert error.value.where == f"train.jsonl:{row + 1}"
    message = str(error.value)
    assert says in message and function in message and "mine.py:" in message


def test_exception_in_reward_is_chained_with_first_row(rewards_file):
    rewards = load_rewards([entry("python:rewards/mine.py:broken")], None,
                           config_dir=rewards_file)
    with pytest.raises(TrainingError) as error:
        score(rewards, ["a", "b"])
    assert error.value.where == "train.jsonl:1" and "broken" in str(error.value)
    assert isinstance(error.value.__cause__, KeyError)


# --- advantages ------------------------------------------------------------------------------


def trl_grpo(rewards: np.ndarray, scale: bool) -> np.ndarray:
    """TRL GRPOTrainer's advantages (scale_rewards "group" or "none")."""
    grouped = torch.tensor(rewards, dtype=torch.float64)
    advantage = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantage = advantage / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantage.numpy()


def test_grpo_advantages_by_hand_and_as_trl():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]])
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 3: mean 0.25, std 0.5
    std = np.sqrt(1 / 3)
    expected = [[0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4)],
                [0, 0, 0, 0],
                [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001]]
    np.testing.assert_allclose(advantages(rewards, estimator="grpo", scale=True), expected)
    np.testing.assert_allclose(advantages(rewards, estimator="grpo", scale=True),
                               trl_grpo(rewards, True))
    np.testing.assert_allclose(advantages(rewards, estimator="grpo", scale=False),
                               rewards - rewards.mean(axis=1, keepdims=True))


def test_rloo_advantages_leave_one_out():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    expected = [[1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], [3 - 5 / 3, 1 - 7 / 3, 0, 0]]
    np.testing.assert_allclose(advantages(rewards, estimator="rloo"), expected)
    # RLOO's advantage is GRPO's unscaled one times G / (G - 1)
    np.testing.assert_allclose(advantages(rewards, estimator="rloo"),
                               advantages(rewards, estimator="grpo", scale=False) * 4 / 3)


def test_nan_rewards_leave_the_group_statistics():
    rewards = np.array([[1.0, np.nan, 0.0, 0.0], [np.nan, 1.0, np.nan, np.nan],
                        [np.nan] * 4])
    grpo = advantages(rewards, estimator="grpo", scale=True)
    np.testing.assert_allclose(grpo[0, [0, 2, 3]], trl_grpo(np.array([[1.0, 0.0, 0.0]]), True)[0])
    assert np.isnan(grpo[0, 1]) and np.isnan(grpo[2]).all()
    assert grpo[1, 1] == 0 and np.isnan(grpo[1, [0, 2, 3]]).all()  # alone in its group: 0
    rloo = advantages(rewards, estimator="rloo")
    np.testing.assert_allclose(rloo[0, [0, 2, 3]], [1.0, -0.5, -0.5])
    assert rloo[1, 1] == 0 and np.isnan(rloo[0, 1])


def test_tie_share_counts_groups_with_equal_finite_rewards():
    rewards = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, np.nan, 0.5], [np.nan] * 3])
    assert tie_share(rewards) == 0.75
    assert tie_share(np.zeros((0, 3))) == 0.0
