"""Which base to tune: the cheapest base that meets the target, never one that does not, and
intervals that overlap called out rather than ranked (experiments/bases.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tunelab.errors import RunError
from tunelab.experiments.bases import compare_bases, render_bases, write_bases_report

ROOT = Path(__file__).resolve().parents[2]


def assessment(name: str, value: float, ci: tuple[float, float], *, verdict: str = "fine-tune",
               training_s: float = 100.0, s_per_request: float = 0.05,
               prompting: float = 0.5, peak_bytes: int = 2 * 2**30) -> dict:
    """An assess.json with the fields the comparison reads: the tuned metric with all data
    (``value``, ``ci``), the strongest prompting arm on test, the verdict and the costs."""
    delta = value - prompting
    return {
        "name": name, "task": "classification", "primary_metric": "accuracy",
        "metric_scale": 1.0, "n_test": 200, "interval_method": "bootstrap",
        "baselines": {"arms": [{"name": "base-0shot", "source": "base", "shots": 0,
                                "test": {"value": prompting - 0.1, "ci": None, "n": 200},
                                "prompt_tokens_per_request": 40.0, "eval_wall_s": 4.0},
                               {"name": "base-4shot", "source": "base", "shots": 4,
                                "test": {"value": prompting, "ci": [prompting - 0.05,
                                                                    prompting + 0.05],
                                         "n": 200},
                                "prompt_tokens_per_request": 180.0, "eval_wall_s": 9.0}],
                      "chosen": "base-4shot", "strongest_on_test": "base-4shot"},
        "learning_curve": [
            {"fraction": 0.5, "n_examples": 64, "value": value - 0.05,
             "ci": [ci[0] - 0.05, ci[1] - 0.05], "seeds": {"n_seeds": 2}, "distrust": []},
            {"fraction": 1.0, "n_examples": 128, "value": value, "ci": list(ci),
             "seeds": {"n_seeds": 1}, "distrust": []}],
        "fit": None,
        "tuned_vs_arms": {"base-0shot": {"value": delta + 0.1, "ci": None},
                          "base-4shot": {"value": delta, "ci": [delta - 0.04, delta + 0.04]}},
        "cost": {"runs": [{"n_examples": 64, "steps": 8, "measured_wall_s": training_s / 2,
                           "train_s": training_s / 2, "tokens": 1000,
                           "measured_peak_bytes": peak_bytes, "eval_wall_s": 5.0},
                          {"n_examples": 128, "steps": 16, "measured_wall_s": training_s,
                           "train_s": training_s * 0.9, "tokens": 2000,
                           "measured_peak_bytes": peak_bytes, "eval_wall_s": 5.0}],
                 "at_use": {"tuned": {"prompt_tokens_per_request": 40.0,
                                      "s_per_request": s_per_request},
                            "prompting": {"shots": 4, "prompt_tokens_per_request": 180.0,
                                          "s_per_request": 0.09},
                            "training_s": training_s}},
        "verdict": {"kind": verdict, "text": "…", "against": "base-4shot", "by_arm": {},
                    "numbers": {}},
        "time": {"this_call_s": training_s * 3, "phases_s": {"baselines": 10.0}},
    }


def test_the_cheaper_of_two_bases_that_meet_the_target_is_chosen():
    small = assessment("small", 0.86, (0.82, 0.90), training_s=60.0)
    large = assessment("large", 0.92, (0.88, 0.96), training_s=600.0)
    summary = compare_bases([large, small], bases=["org/large", "org/small"], target=0.8)
    assert summary["choice"] == "org/small"
    assert [row["meets"] for row in summary["rows"]] == [True, True]
    row = summary["rows"][1]
    assert row["base"] == "org/small" and row["tuned"]["value"] == 0.86
    assert row["training_s"] == 60.0 and row["s_per_request"] == 0.05
    assert row["strongest_arm"]["name"] == "base-4shot"
    assert row["tuned_minus_strongest"]["value"] == pytest.approx(0.36)
    assert row["peak_bytes"] == 2 * 2**30 and row["prompt_tokens_per_request"] == 40.0
    assert row["assessment_wall_s"] == 180.0
    assert "org/small" in summary["text"] and "0.86" in summary["text"]
    # the two intervals overlap: the choice rests on cost, and the sentence says so
    assert "cannot be told apart" in summary["why"]
    assert summary["not_told_apart"] == [["org/large", "org/small"]]


def test_equal_training_time_is_decided_by_time_per_request():
    slow = assessment("slow", 0.86, (0.82, 0.90), s_per_request=0.2)
    fast = assessment("fast", 0.86, (0.82, 0.90), s_per_request=0.02)
    summary = compare_bases([slow, fast], bases=["slow", "fast"], target=0.8)
    assert summary["choice"] == "fast"


def test_a_base_below_the_target_is_never_chosen_even_when_cheaper():
    cheap = assessment("cheap", 0.84, (0.78, 0.90), training_s=10.0)  # lower end under 0.8
    dear = assessment("dear", 0.95, (0.92, 0.98), training_s=900.0)
    summary = compare_bases([cheap, dear], bases=["cheap", "dear"], target=0.8)
    assert summary["choice"] == "dear"
    assert [row["meets"] for row in summary["rows"]] == [False, True]
    assert "the only base that does" in summary["why"]


def test_without_a_target_the_verdict_decides():
    cheap = assessment("cheap", 0.9, (0.85, 0.95), training_s=10.0,
                       verdict="prompting is enough")
    more_data = assessment("more", 0.7, (0.65, 0.75), training_s=500.0,
                           verdict="fine-tune and collect more data")
    summary = compare_bases([cheap, more_data], bases=["cheap", "more"])
    assert summary["choice"] == "more"
    # cheap scores higher with intervals apart: said, with why it is not chosen
    assert "cheap is better on accuracy" in summary["why"]
    assert "its verdict is 'prompting is enough'" in summary["why"]
    assert summary["not_told_apart"] == []


def test_when_no_base_meets_the_target_the_choice_is_none_and_the_closest_is_named():
    near = assessment("near", 0.78, (0.74, 0.82))
    far = assessment("far", 0.6, (0.55, 0.65))
    summary = compare_bases([far, near], bases=["far", "near"], target=0.8)
    assert summary["choice"] is None
    assert "No base meets the target 0.8" in summary["why"]
    assert "the closest is near" in summary["why"]
    assert "0.06 short of the target" in summary["why"]
    assert summary["text"].startswith("No base to tune yet.")


def test_without_a_target_and_no_go_verdict_the_sentence_lists_each_verdict():
    undecided = assessment("u", 0.62, (0.5, 0.74), verdict="undecided")
    enough = assessment("p", 0.6, (0.5, 0.7), verdict="prompting is enough")
    summary = compare_bases([enough, undecided], bases=["p", "u"])
    assert summary["choice"] is None
    assert "p: prompting is enough; u: undecided" in summary["why"]
    assert "the closest is u" in summary["why"]
    assert "cannot be told apart from p's 0.6" in summary["why"]


def test_assessments_of_different_metrics_are_refused():
    other = assessment("b", 0.8, (0.7, 0.9))
    other["primary_metric"] = "f1"
    with pytest.raises(RunError, match="different metrics"):
        compare_bases([assessment("a", 0.8, (0.7, 0.9)), other], bases=["a", "b"])


def test_the_report_is_written_with_each_base_and_printed(tmp_path):
    summary = compare_bases([assessment("a", 0.86, (0.82, 0.90)),
                             assessment("b", 0.7, (0.6, 0.8))],
                            bases=["org/model-a", "org/model-<b>"], target=0.8)
    json_path, html_path = write_bases_report(summary, tmp_path / "out")
    assert json.loads(json_path.read_text()) == summary
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "org/model-a" in page and "org/model-&lt;b&gt;" in page
    assert not list((tmp_path / "out").glob(".*.tmp"))
    console = Console(record=True, width=200)
    render_bases(summary, console)
    screen = console.export_text()
    assert "org/model-a (chosen)" in screen and "org/model-<b>" in screen


def test_ruff_is_clean():
    paths = ["src/tunelab/experiments/bases.py", "tests/experiments/test_bases.py"]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
