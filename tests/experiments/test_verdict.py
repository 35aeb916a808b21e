"""The assessment's decision rules on synthetic measurements: arm selection that noise cannot
buy, a verdict that must hold against every arm, and collapsed runs that decide nothing."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.eval.stats import paired_comparison, resampled_curve
from tunelab.experiments.verdict import VERDICTS, choose_arm, degenerate_reasons, verdict


def correct(n: int, right: int, seed: int) -> np.ndarray:
    scores = np.zeros(n)
    scores[np.random.default_rng(seed).choice(n, right, replace=False)] = 1.0
    return scores


def separated(a: dict, b: dict) -> bool:
    return paired_comparison([b["measure"]], [a["measure"]], n_resamples=500)["significant"]


def arm(name: str, shots: int, tokens: float, measure: np.ndarray) -> dict:
    return {"name": name, "validation": float(measure.mean()), "cost": (shots, tokens),
            "measure": measure}


def test_a_noise_level_validation_difference_does_not_pick_the_costlier_arm():
    # the case: 4-shot beat zero-shot on validation by one example of 100
    zero = correct(100, 51, seed=0)
    four = zero.copy()
    four[np.flatnonzero(zero == 0)[:3]] = 1.0  # right on three more...
    four[np.flatnonzero(zero == 1)[:1]] = 0.0  # ...and wrong on one more: +2 examples
    assert four.mean() > zero.mean()
    chosen = choose_arm([arm("base 0-shot", 0, 40, zero), arm("base 4-shot", 4, 200, four)],
                        separated)
    assert chosen["name"] == "base 0-shot"
    assert "cannot separate" in chosen["selection"] and chosen["tied_with"] == ["base 4-shot"]


def test_a_clear_validation_difference_picks_the_better_arm_whatever_it_costs():
    zero = correct(400, 200, seed=1)
    four = np.maximum(zero, correct(400, 200, seed=2))  # right wherever zero-shot is, and more
    chosen = choose_arm([arm("base 0-shot", 0, 40, zero), arm("base 4-shot", 4, 200, four)],
                        separated)
    assert chosen["name"] == "base 4-shot" and chosen["selection"] == "best on validation"


def test_among_equals_the_shorter_prompt_is_taken():
    same = correct(100, 60, seed=3)
    chosen = choose_arm([arm("long", 0, 90, same), arm("short", 0, 30, same)], separated)
    assert chosen["name"] == "short"


def delta(value: float, low: float, high: float) -> dict:
    return {"value": value, "ci": [low, high]}


GAIN = {"value": 0.03, "ci": [0.02, 0.04]}


def test_the_verdict_must_hold_against_the_strongest_arm_on_test_too():
    # beats the arm chosen on validation, not the arm that was strongest on test
    decision = verdict({"base 4-shot": delta(0.15, 0.07, 0.23),
                        "base 0-shot": delta(0.067, -0.01, 0.14)}, GAIN, metric="accuracy",
                       n_test=300)
    assert decision["kind"] == "undecided" and decision["against"] == "base 0-shot"
    assert decision["by_arm"] == {"base 4-shot": "fine-tune and collect more data",
                                  "base 0-shot": "undecided"}
    assert "against base 4-shot: fine-tune and collect more data" in decision["text"].lower()
    both = verdict({"a": delta(0.15, 0.07, 0.23), "b": delta(0.10, 0.02, 0.18)},
                   {"value": 0.012, "ci": [0.004, 0.02]}, metric="accuracy", n_test=300)
    assert both["kind"] == "fine-tune"


@pytest.mark.parametrize("deltas, gain, expected", [
    ({"a": delta(0.2, 0.1, 0.3)}, GAIN, "fine-tune and collect more data"),
    ({"a": delta(0.2, 0.1, 0.3)}, {"value": 0.0, "ci": [-0.01, 0.01]}, "fine-tune"),
    ({"a": delta(0.0, -0.1, 0.1)}, GAIN, "undecided"),
    ({"a": delta(-0.1, -0.15, -0.05)}, {"value": 0.0, "ci": [-0.001, 0.001]},
     "not worth it yet"),
    ({"a": delta(-0.1, -0.15, -0.05)}, GAIN, "prompting is enough"),
])
def test_each_verdict_against_one_arm(deltas, gain, expected):
    decision = verdict(deltas, gain, metric="accuracy", n_test=1000)
    assert decision["kind"] == expected, decision["text"]
    assert f"{decision['numbers']['delta']:+.3g}" in decision["text"]  # it names its numbers


def collapsed_run(n: int = 120, share_spam: float = 0.52) -> list[dict]:
    golds = ["spam"] * round(n * share_spam) + ["ham"] * (n - round(n * share_spam))
    return degenerate_reasons(["spam"] * n, golds, steps=6, losses=[3.0, 1.2, 0.8, 0.7, 0.69])


def test_a_constant_predictor_is_not_trusted_and_the_verdict_is_undecided():
    reasons = collapsed_run()
    assert [r["kind"] for r in reasons] == ["collapsed"]
    assert "100%" in reasons[0]["text"] and "train longer" in reasons[0]["fix"]
    # the spam case: every fraction scores the label's share, so the curve is flat and exact
    flat = {"value": 0.0, "ci": [0.0, 0.0]}
    decision = verdict({"base 0-shot": delta(0.0, 0.0, 0.0)}, flat, metric="accuracy",
                       n_test=120, distrust=[{"run": "spam-n120", **reasons[0]}])
    assert decision["kind"] == "undecided"
    assert "cannot be trusted" in decision["text"] and "spam-n120" in decision["text"]
    assert "Fix: train longer" in decision["text"]


def test_runs_that_learned_are_trusted_and_under_trained_or_flat_loss_runs_are_not():
    golds = ["pos", "neg"] * 30
    good = degenerate_reasons(golds[::-1], golds, steps=20, losses=[4.0, 2.0, 1.0, 0.5, 0.4])
    assert good == []
    short = degenerate_reasons(golds, golds, steps=2, losses=[4.0, 2.0])
    assert [r["kind"] for r in short] == ["under-trained"]
    stuck = degenerate_reasons(golds, golds, steps=8, losses=[4.0, 4.1, 3.9, 4.0, 4.0, 3.95])
    assert [r["kind"] for r in stuck] == ["did not learn"]
    # a task whose references are one label already is not "collapsed" for answering it
    assert degenerate_reasons(["a"] * 50, ["a"] * 50, steps=9, losses=[]) == []


def test_identical_answers_give_a_zero_width_curve_and_collapsed_runs_an_undecided_verdict():
    """The spam case in numbers: every fraction (two seeds each, resampled as the assessment
    resamples them) a constant predictor, so the curve's interval is exact, and only the
    distrust rule keeps the verdict from claiming anything."""
    from tunelab.experiments.assess import borrow_seed_noise, seed_spread

    n = 120
    golds = np.array([1.0] * 62 + [0.0] * 58)  # the 'spam' share
    groups = [[{"value": float(golds.mean()), "seed": s, "measure": golds}
               for s in (0, 1)] for _ in range(4)]
    curve = resampled_curve([[r["measure"] for r in g] for g in groups], n=n,
                            n_resamples=200)
    spreads = [seed_spread(g) for g in groups]
    borrow_seed_noise(curve, spreads, seed=0)
    assert np.ptp(curve[:, 3] - curve[:, 0]) == 0  # identical answers: a zero-width interval
    reasons = collapsed_run(n)
    decision = verdict({"base 0-shot": delta(0.0, 0.0, 0.0)}, {"value": 0.0, "ci": [0.0, 0.0]},
                       metric="accuracy", n_test=n,
                       distrust=[{"run": f"n{k}", **r} for k in (15, 30, 60, 120)
                                 for r in reasons])
    assert decision["kind"] == "undecided" and decision["kind"] in VERDICTS
