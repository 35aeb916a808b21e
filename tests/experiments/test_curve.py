"""Learning-curve fits (experiments/curve.py): the form chosen on the points, predictions that
respect the metric's bounds, intervals that count the misfit and hold on curves of known form,
the flags, the hierarchical bootstrap, and the calibration benchmark's smoke run."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tunelab.experiments.curve import fit_curve, hierarchical_resamples

N = [150, 300, 600, 1200]
SENTIMENT = [0.785, 0.730, 0.82, 0.845]  # the sentiment curve, accuracy
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def saturating(n, asymptote=0.9, scale=0.6, alpha=0.4):
    return asymptote - scale * np.asarray(n, dtype=float) ** -alpha


# --- the form ---------------------------------------------------------------------------------


def test_a_saturating_curve_gets_a_saturating_form_that_stays_below_the_ceiling():
    fit = fit_curve(N, saturating(N, asymptote=0.97, scale=1.5))
    assert fit["form"]["name"] != "line"
    assert fit["residual_rmse"] < 1e-3
    four = fit["predicted"]["4x"]
    assert four["n"] == 4800 and four["value"] <= 1.0 and four["ci"][1] <= 1.0
    assert four["value"] == pytest.approx(float(saturating(4800, 0.97, 1.5)), abs=0.01)
    assert all(point["value"] <= 1.0 and point["ci"][1] <= 1.0 for point in fit["band"])
    # the gain from 1200 to 2400 examples is the fitted curve's, smaller than the mean slope
    assert 0 < fit["gain_per_doubling"]["value"] < (fit["band"][-1]["value"]
                                                   - fit["band"][0]["value"]) / 5


def test_a_curve_below_its_plateau_gets_the_free_asymptote():
    n = 150 * 2.0 ** np.arange(6)
    fit = fit_curve(n, saturating(n, asymptote=0.8, scale=0.9, alpha=0.5))
    assert fit["form"]["name"] == "power"
    assert fit["params"]["asymptote"] == pytest.approx(0.8, abs=0.01)
    assert fit["predicted"]["4x"]["value"] < 0.8


def test_a_straight_log_linear_curve_gets_the_line():
    values = 0.3 + 0.05 * np.log2(N)
    fit = fit_curve(N, values)
    assert fit["form"]["name"] == "line"
    assert fit["gain_per_doubling"]["value"] == pytest.approx(0.05)
    assert fit["predicted"]["2x"]["value"] == pytest.approx(0.3 + 0.05 * np.log2(2400))
    assert "least leave-one-out error" in fit["form"]["why"]


def test_losses_fall_toward_the_floor_and_their_gain_is_negative():
    n = 200 * 2.0 ** np.arange(6)
    losses = 1.2 + 3.0 * n ** -0.3
    fit = fit_curve(n, losses, ceiling=None, floor=0.0, lower_is_better=True)
    four = fit["predicted"]["4x"]
    assert 1.2 <= four["value"] < losses[-1] and four["ci"][0] >= 0.0
    assert fit["gain_per_doubling"]["value"] < 0
    assert four["value"] == pytest.approx(1.2 + 3.0 * (4 * n[-1]) ** -0.3, abs=0.005)


# --- intervals --------------------------------------------------------------------------------


def test_the_sentiment_curves_gain_interval_includes_zero_and_its_drop_is_flagged():
    fit = fit_curve(N, SENTIMENT, test_se=[0.021] * 4)
    low, high = fit["gain_per_doubling"]["ci"]
    assert low < 0 < high  # the misfit (residual RMSE 0.031 over 4 points) is counted
    assert fit["residual_rmse"] == pytest.approx(0.031, abs=0.001)
    drops = [flag for flag in fit["flags"] if flag["kind"] == "drop"]
    assert len(drops) == 1 and "at 150 examples to 0.73 at 300" in drops[0]["text"]
    # a drop within twice the test standard error is noise, not a flag
    calm = fit_curve(N, SENTIMENT, test_se=[0.03] * 4)
    assert not [flag for flag in calm["flags"] if flag["kind"] == "drop"]


def test_a_flat_curve_has_a_narrow_gain_interval_and_an_unreachable_target():
    values = np.array([0.80, 0.801, 0.799, 0.80])
    resampled = values + np.random.default_rng(0).normal(0, 0.002, (500, 4))
    fit = fit_curve(N, values, resampled=resampled, target=0.9)
    low, high = fit["gain_per_doubling"]["ci"]
    assert -0.01 < low <= 0.0 <= high < 0.01
    assert fit["target"]["reachable"] is False and fit["target"]["n"] is None
    assert fit["n_resamples"] == 500


def test_intervals_hold_the_outcome_on_curves_of_known_form():
    rng = np.random.default_rng(7)
    n = np.asarray(N, dtype=float)
    noise_sd, held, started = 0.01, 0, time.perf_counter()
    for draw in range(100):
        truth = saturating(np.append(n, 4 * n[-1]), asymptote=rng.uniform(0.85, 0.97),
                           scale=rng.uniform(0.8, 2.0), alpha=rng.uniform(0.2, 0.6))
        values = truth[:4] + rng.normal(0, noise_sd, 4)
        resampled = values + rng.normal(0, noise_sd, (200, 4))  # what the caller's bootstrap sees
        fit = fit_curve(n, values, resampled=resampled, seed_sd=noise_sd, seed=draw)
        low, high = fit["predicted"]["4x"]["ci"]
        held += low <= truth[4] + rng.normal(0, noise_sd) <= high
    assert held / 100 >= 0.85
    assert time.perf_counter() - started < 30


def test_without_misfit_or_resampling_there_is_no_interval():
    fit = fit_curve([100, 200], [0.5, 0.6])
    assert fit["gain_per_doubling"]["ci"] is None and fit["predicted"]["4x"]["ci"] is None
    assert [flag["kind"] for flag in fit["flags"]] == ["too few points"]
    assert fit["form"]["name"] == "line"


def test_a_thousand_resamples_of_eight_fractions_fit_in_well_under_a_second():
    n = 100 * 2.0 ** np.arange(8)
    values = saturating(n)
    resampled = values + np.random.default_rng(1).normal(0, 0.01, (1000, 8))
    started = time.perf_counter()
    fit = fit_curve(n, values, resampled=resampled, target=0.88)
    assert time.perf_counter() - started < 1.0
    assert fit["n_draws"] == 1000 and len(fit["band"]) == 24


# --- what sits beside the fit ---------------------------------------------------------------


def test_persistence_and_the_two_point_line_are_reported_beside_the_fit():
    fit = fit_curve(N, SENTIMENT, test_se=[0.021] * 4)
    persistence = fit["persistence"]
    assert persistence["value"] == persistence["predicted"]["4x"]["value"] == 0.845
    assert persistence["ci"][0] < 0.845 < persistence["ci"][1]
    two = fit["two_point"]
    assert two["gain_per_doubling"]["value"] == pytest.approx(0.025)
    assert two["predicted"]["2x"]["value"] == pytest.approx(0.87)
    assert two["predicted"]["4x"] == {"n": 4800, "value": pytest.approx(0.895), "ci": None}
    json.dumps(fit)  # JSON-ready


def test_a_curve_that_accelerates_is_flagged_on_a_form_that_cannot():
    fit = fit_curve(N, [20.0, 20.7, 23.1, 28.5], ceiling=None, floor=None,
                    test_se=[0.5] * 4)  # unbounded: no logit, which could follow it
    assert fit["form"]["name"] == "line"
    assert [flag["kind"] for flag in fit["flags"]] == ["curvature"]
    assert "+0.7, +2.4, +5.4" in fit["flags"][0]["text"]


def test_a_reachable_target_is_inverted_on_the_fitted_curve():
    values = 0.3 + 0.05 * np.log2(N)
    fit = fit_curve(N, values, target=0.3 + 0.05 * 12)
    assert fit["target"]["reachable"] and fit["target"]["n"] == 4096
    beyond = fit_curve(N, values, target=1.2)
    assert beyond["target"]["reachable"] is False and "best value" in beyond["target"]["note"]


def test_bad_inputs_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="resampled must be"):
        fit_curve(N, SENTIMENT, resampled=np.zeros((10, 3)))
    with pytest.raises(ValueError, match="distinct"):
        fit_curve([100, 100, 200], [0.1, 0.2, 0.3])


# --- the hierarchical bootstrap ---------------------------------------------------------------


def test_hierarchical_resamples_share_test_examples_and_draw_seeds():
    rng = np.random.default_rng(0)
    scores = (rng.random((1, 50)) < 0.7).astype(float)
    # two fractions scored alike: one draw of test examples serves both, so columns agree
    same = hierarchical_resamples([[scores.mean()], [scores.mean()]], [scores, scores],
                                  n_resamples=300)
    assert same.shape == (300, 2) and np.array_equal(same[:, 0], same[:, 1])
    assert same[:, 0].std() == pytest.approx(np.sqrt(0.7 * 0.3 / 50), rel=0.3)
    # seeds that answer every example alike differ only in value: their mean is drawn
    constant = np.full((2, 50), 0.5)
    seeds = hierarchical_resamples([[0.6, 0.8]], [constant], n_resamples=300, seed=1)
    assert set(np.round(seeds[:, 0], 6)) == {0.6, 0.7, 0.8}
    # chrF-like: a metric on 0..100 moves by 100 × the change of the scores' mean
    scaled = hierarchical_resamples([[70.0]], [scores], scale=100.0, n_resamples=300)
    unscaled = hierarchical_resamples([[0.7]], [scores], n_resamples=300)
    assert np.allclose(scaled - 70.0, 100 * (unscaled - 0.7))


# --- the calibration benchmark ----------------------------------------------------------------


def _benchmark():
    sys.path.insert(0, str(BENCHMARKS))  # it imports smoke.py and provenance.py from beside it
    spec = importlib.util.spec_from_file_location("assess_calibration",
                                                  BENCHMARKS / "assess_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_calibration_benchmark_smoke_replays_both_parts(tmp_path):
    bench = _benchmark()
    out = tmp_path / "calibration.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["git_commit"] and result["machine"]["cpu_cores"]
    published = result["published"]
    assert set(published["forms"]) == {"1/4 all", "1/4 last 4", "1/2 all", "1/2 last 4"}
    assert published["n_cases"] == 24  # 2 models × 3 datasets × 2 cuts × 2 windows
    assert published["summary"]["1/4 last 4"]["n_cases"] == 6
    assert published["summary"]["1/4 last 4"]["log-linear (old)"]["coverage"] is None
    assert all(not case["methods"]["curve"]["covered"] for case in published["missed_cases"])
    part_b = result["assessments"]
    assert part_b["synthetic"] and part_b["n_cases"] == 6  # 3 seeds × 2 cuts
    assert part_b["summary"]["1/4 all"]["curve"]["n_intervals"] == 3
    assert all(row["met"] in (True, False) for row in result["goals"])


def test_the_benchmark_reads_an_assessments_curve_file(tmp_path):
    bench = _benchmark()
    folder = bench.write_synthetic(tmp_path, 1, seed=3)[0]
    curve = bench.read_curve_scores(folder)
    assert [f["n_examples"] for f in curve["fractions"]] == [100, 200, 400, 800, 1600, 3200]
    cases = bench.assessment_cases(curve, "1/4", 4, n_resamples=100, seed=0)
    assert len(cases) == 3 and all(case["n_points"] == 4 for case in cases)
    with pytest.raises(SystemExit, match="no such file"):
        bench.read_curve_scores(tmp_path / "nowhere")
