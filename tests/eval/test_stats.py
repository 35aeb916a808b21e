"""Bootstrap intervals, paired comparisons, McNemar and spread: coverage, power, exact p-values."""

import math

import numpy as np
import pytest

from tunelab.eval.stats import (
    bootstrap_ci,
    mcnemar,
    metric_with_ci,
    p_text,
    paired_bootstrap,
    paired_comparison,
    ratio_statistic,
    resampled_curve,
    spread,
)


def test_95_percent_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1234)
    covered = 0
    for trial in range(200):
        sample = (rng.random(100) < 0.7).astype(float)
        low, high = bootstrap_ci(sample, seed=trial)
        covered += low <= 0.7 <= high
    assert 0.90 <= covered / 200 <= 0.99


def test_interval_narrows_as_examples_grow():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 800):
        low, high = bootstrap_ci((rng.random(n) < 0.7).astype(float))
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # width ∝ 1/√n


def test_bootstrap_is_seeded_and_statistic_path_uses_the_same_resamples():
    values = np.random.default_rng(3).random(40)
    assert bootstrap_ci(values, seed=5) == bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) != bootstrap_ci(values, seed=6)
    by_statistic = bootstrap_ci(statistic=lambda idx: values[idx].mean(), n=40, seed=5)
    assert by_statistic == pytest.approx(bootstrap_ci(values, seed=5))


def test_bootstrap_rejects_ambiguous_or_broken_input():
    with pytest.raises(TypeError, match="exactly one"):
        bootstrap_ci([1.0], statistic=lambda idx: 0.0, n=1)
    with pytest.raises(ValueError, match="needs n"):
        bootstrap_ci(statistic=lambda idx: 0.0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="no per-example scores"):
        bootstrap_ci([])


def test_metric_with_ci_reports_value_interval_and_settings():
    values = [1.0, 0.0, 1.0, 1.0]
    result = metric_with_ci(values, n_resamples=200, seed=1)
    assert result["value"] == 0.75 and result["n"] == 4
    assert result["ci"][0] <= 0.75 <= result["ci"][1]
    assert (result["confidence"], result["n_resamples"], result["seed"]) == (0.95, 200, 1)
    by_statistic = metric_with_ci(statistic=ratio_statistic([3, 1], [4, 4]), n=2)
    assert by_statistic["value"] == 0.5
    assert metric_with_ci([])["value"] is None and metric_with_ci([])["ci"] == [None, None]


def _improved(base: np.ndarray, rng: np.random.Generator, fix: float, break_: float):
    """Tuned correctness: fixes a share of base's errors and breaks a share of its successes."""
    draw = rng.random(len(base))
    return np.where(base, draw >= break_, draw < fix).astype(float)


def test_paired_bootstrap_detects_a_real_improvement():
    rng = np.random.default_rng(7)
    base = (rng.random(300) < 0.6).astype(float)
    tuned = _improved(base, rng, fix=0.4, break_=0.05)
    result = paired_bootstrap(base, tuned)
    assert result["delta"] == pytest.approx(tuned.mean() - base.mean())
    assert result["delta"] > 0.1
    assert result["significant"] and result["ci"][0] > 0 and result["p_value"] < 0.01
    assert result["test"] == "paired bootstrap" and result["n"] == 300


def test_paired_bootstrap_does_not_flag_a_null_difference():
    rng = np.random.default_rng(11)
    base = (rng.random(300) < 0.6).astype(float)
    tuned = _improved(base, rng, fix=0.1, break_=0.0667)  # same accuracy in expectation
    result = paired_bootstrap(base, tuned)
    assert not result["significant"] and result["p_value"] > 0.05
    assert result["ci"][0] < 0 < result["ci"][1]
    same = paired_bootstrap(base, base)
    assert same["delta"] == 0 and same["p_value"] == 1.0 and not same["significant"]


def test_paired_bootstrap_over_corpus_statistics_matches_per_example_path():
    rng = np.random.default_rng(2)
    base, tuned = rng.random(50), rng.random(50) + 0.1
    by_scores = paired_bootstrap(base, tuned, seed=4)
    by_statistic = paired_bootstrap(lambda idx: base[idx].mean(), lambda idx: tuned[idx].mean(),
                                    n=50, seed=4)
    assert by_statistic["delta"] == pytest.approx(by_scores["delta"])
    assert by_statistic["ci"] == pytest.approx(by_scores["ci"])
    assert by_statistic["p_value"] == pytest.approx(by_scores["p_value"])


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1.0, 0.0], [1.0])
    # scores and a statistic of the same examples pair: the statistic is the scores' mean
    scores = np.array([1.0, 0.0, 1.0, 1.0])
    mixed = paired_bootstrap([0.0, 0.0, 1.0, 0.0], lambda idx: float(scores[idx].mean()), n=4)
    plain = paired_bootstrap([0.0, 0.0, 1.0, 0.0], scores)
    assert mixed["ci"] == pytest.approx(plain["ci"]) and mixed["delta"] == plain["delta"]


def _outcomes(b: int, c: int, both_right: int = 5, both_wrong: int = 3):
    base = [True] * b + [False] * c + [True] * both_right + [False] * both_wrong
    tuned = [False] * b + [True] * c + [True] * both_right + [False] * both_wrong
    return base, tuned


@pytest.mark.parametrize("b, c, expected", [
    (1, 5, 2 * (1 + 6) / 2**6),  # 2·P(X ≤ 1), X ~ Bin(6, ½) = 14/64
    (0, 10, 2 / 2**10),
    (2, 8, 2 * (1 + 10 + 45) / 2**10),  # 112/1024
    (8, 2, 2 * (1 + 10 + 45) / 2**10),  # symmetric
    (3, 3, 1.0),  # 2·42/64 > 1, capped
    (0, 0, 1.0),
])
def test_mcnemar_exact_p_values(b, c, expected):
    result = mcnemar(*_outcomes(b, c))
    assert (result["b"], result["c"]) == (b, c)
    assert result["p_value"] == pytest.approx(expected)
    assert result["significant"] == (expected < 0.05)
    assert result["test"] == "mcnemar" and result["method"] == "exact binomial"


def test_mcnemar_switches_to_chi_square_above_1000_discordant_pairs():
    result = mcnemar(*_outcomes(480, 530))
    assert result["method"] == "chi-square with continuity correction"
    # (|480 − 530| − 1)² / 1010 = 2.3772; P(χ²₁ > 2.3772) = 2·(1 − Φ(1.5418)) ≈ 0.1232
    assert result["p_value"] == pytest.approx(0.1232, abs=5e-4)
    exact = 2 * sum(math.comb(1010, k) for k in range(481)) / 2**1010
    assert result["p_value"] == pytest.approx(exact, abs=5e-3)
    assert not result["significant"]


def test_spread_across_prompt_variants():
    result = spread([0.5, 0.7, 0.6])
    assert result == pytest.approx({"mean": 0.6, "std": 0.1, "min": 0.5, "max": 0.7,
                                    "n_variants": 3})
    assert spread([0.4])["std"] == 0.0


def test_ratio_statistic_sums_before_dividing():
    statistic = ratio_statistic([1, 0, 2], [2, 0, 2])
    assert statistic(np.array([0, 2])) == pytest.approx(3 / 4)
    assert statistic(np.array([1, 1])) == 0.0


def test_seed_noise_widens_the_interval_and_one_seed_is_the_paired_bootstrap():
    rng = np.random.default_rng(3)
    base = (rng.random(300) < 0.6).astype(float)
    # three training seeds of the tuned model that disagree by about 0.1 in accuracy
    seeds = [(rng.random(300) < p).astype(float) for p in (0.65, 0.75, 0.85)]
    single = paired_comparison([base], [seeds[1]], n_resamples=500)
    assert single["ci"] == pytest.approx(paired_bootstrap(base, seeds[1], n_resamples=500)["ci"])
    assert single["test"] == "paired bootstrap" and single["seeds"] == {"base": 1, "tuned": 1}
    pooled = np.concatenate(seeds)  # the seeds' examples as if one run: test noise only
    hierarchical = paired_comparison([base], seeds, n_resamples=500)
    assert hierarchical["tuned"] == pytest.approx(float(np.mean(pooled)))
    assert "training seeds" in hierarchical["test"]
    width = lambda r: r["ci"][1] - r["ci"][0]  # noqa: E731
    assert width(hierarchical) > 1.3 * width(paired_comparison([base], [seeds[1]] * 3,
                                                                 n_resamples=500))


def test_p_value_at_the_resampling_floor_says_so():
    base, tuned = [0.0] * 200, [1.0] * 200
    result = paired_comparison([base], [tuned], n_resamples=999)
    assert result["p_value"] == pytest.approx(2 / 1000) == result["p_floor"]
    assert result["p_text"] == "p < 0.002"
    assert p_text(0.0312, 0.002) == "p = 0.031"
    exact = paired_comparison([base], [tuned], exact_test=True)
    assert exact["test"] == "mcnemar" and exact["p_value"] < 1e-50
    assert exact["p_text"].startswith("p = ")


def test_resampled_curve_shares_rows_across_fractions():
    scores = np.random.default_rng(0).random((2, 50))
    curve = resampled_curve([[scores[0]], [scores[0]], [scores[1]]], n_resamples=200)
    assert curve.shape == (200, 3)
    assert np.array_equal(curve[:, 0], curve[:, 1])  # same rows, same measure: same values
    delta = paired_comparison([scores[0]], [scores[1]], n_resamples=200)
    assert delta["ci"] == pytest.approx(list(np.quantile(curve[:, 2] - curve[:, 0],
                                                         [0.025, 0.975])))
