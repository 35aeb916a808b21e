"""tunelab assess: nested fractions, the fit and its extrapolation against hand-computed values,
the verdict rules on synthetic curves, and one real assessment on the tiny model that resumes
without redoing anything."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from helpers import make_config
from rich.console import Console

from tunelab.errors import ConfigError, RunError
from tunelab.experiments.assess import (
    VERDICTS,
    assess,
    examples_needed,
    extrapolate,
    fit_log2,
    label_entropy_bits,
    nested_subsets,
    paired_delta,
    parse_fractions,
    resample_rows,
    resampled_values,
    verdict,
)

# --- nested fractions ------------------------------------------------------------------------


def test_each_fraction_contains_the_smaller_ones_and_is_seeded():
    subsets = nested_subsets(100, [1, 0.125, 0.5, 0.25], seed=3)
    assert [len(s) for s in subsets.values()] == [13, 25, 50, 100]  # ceil(f * n), small first
    sets = [set(s) for s in subsets.values()]
    assert all(small < large for small, large in zip(sets, sets[1:], strict=False))
    assert all(s == sorted(s) for s in subsets.values())  # file order kept
    assert nested_subsets(100, [0.125, 0.25, 0.5, 1], seed=3) == subsets
    assert nested_subsets(100, [0.125, 0.25, 0.5, 1], seed=4)[0.125] != subsets[0.125]
    # the subset for a fraction does not depend on which other fractions are asked for
    assert nested_subsets(100, [0.25, 1], seed=3)[0.25] == subsets[0.25]


def test_fractions_parse_as_written_and_bad_ones_name_the_option():
    assert parse_fractions("1/8, 1/4,1/2,1") == [0.125, 0.25, 0.5, 1.0]
    for bad in ("0,1", "1/0,1", "half,1", "0.5", "1.5,1"):
        with pytest.raises(ConfigError, match="--fractions"):
            parse_fractions(bad)


# --- fit and extrapolation against hand-computed values --------------------------------------

N = [8, 16, 32, 64]  # log2: 3, 4, 5, 6 (mean 4.5; centred -1.5, -0.5, 0.5, 1.5; sum of squares 5)
VALUES = [0.50, 0.62, 0.68, 0.80]  # mean 0.65; centred products sum to 0.48


def test_least_squares_line_in_log2_examples():
    intercept, slope = fit_log2(N, VALUES)
    assert slope == pytest.approx(0.48 / 5)  # 0.096 per doubling
    assert intercept == pytest.approx(0.65 - 0.096 * 4.5)  # 0.218


def test_predictions_at_2x_and_4x_and_examples_for_a_target():
    fit = extrapolate(N, VALUES, None, target=0.9)
    assert fit["gain_per_doubling"] == {"value": pytest.approx(0.096), "ci": None}
    assert fit["predicted"]["2x"]["n"] == 128
    assert fit["predicted"]["2x"]["value"] == pytest.approx(0.218 + 0.096 * 7)  # 0.890
    assert fit["predicted"]["4x"]["value"] == pytest.approx(0.218 + 0.096 * 8)  # 0.986
    assert fit["target"]["reachable"]
    assert fit["target"]["n"] == round(2 ** ((0.9 - 0.218) / 0.096))  # 2^7.104 = 137.6 → 138
    assert fit["target"]["n"] == 138


def test_predictions_stop_at_the_metric_ceiling_and_flat_curves_never_reach_a_target():
    fit = extrapolate(N, [0.7, 0.8, 0.9, 0.95], None, target=0.99)
    assert fit["predicted"]["4x"]["value"] == 1.0  # the line alone would pass 1.1
    flat = extrapolate(N, [0.7, 0.7, 0.7, 0.7], None, target=0.8)
    assert not flat["target"]["reachable"] and "not reachable" in flat["target"]["note"]
    assert examples_needed(0.7, 0.0, 0.8) == math.inf
    above = extrapolate(N, VALUES, None, target=1.2)
    assert not above["target"]["reachable"] and "best value" in above["target"]["note"]


def correct_scores(n: int, correct: int, seed: int) -> list[float]:
    scores = [1.0] * correct + [0.0] * (n - correct)
    random.Random(seed).shuffle(scores)
    return scores


def test_resampled_metric_is_the_mean_of_resampled_scores_or_its_shift():
    scores = correct_scores(40, 25, seed=0)
    rows = resample_rows(40, 50, seed=1)
    exact = resampled_values(float(np.mean(scores)), scores, rows)
    assert np.allclose(exact, [np.mean([scores[i] for i in row]) for row in rows])
    # a 0..100 corpus metric (chrF) moves with its 0..1 per-example scores, times 100
    shifted = resampled_values(55.0, scores, rows, scale=100.0)
    assert np.allclose(shifted, 55.0 + 100 * (exact - np.mean(scores)))


def test_gain_per_doubling_interval_refits_each_resample():
    curve = [correct_scores(200, round(v * 200), seed=i) for i, v in enumerate(VALUES)]
    fit = extrapolate(N, VALUES, curve, n_resamples=400, seed=0, target=0.9)
    low, high = fit["gain_per_doubling"]["ci"]
    assert low < 0.096 < high and high - low < 0.1
    rows = resample_rows(200, 400, seed=0)
    slopes = [fit_log2(N, [np.mean(np.asarray(s)[row]) for s in curve])[1] for row in rows]
    assert [low, high] == pytest.approx(list(np.quantile(slopes, [0.025, 0.975])))
    for label in ("2x", "4x"):
        predicted = fit["predicted"][label]
        assert predicted["ci"][0] < predicted["value"] < predicted["ci"][1]
    assert fit["target"]["ci"][0] < fit["target"]["n"] < fit["target"]["ci"][1]
    # fewer test examples, a wider interval
    small = [s[:40] for s in curve]
    wide = extrapolate(N, [float(np.mean(s)) for s in small], small, n_resamples=400)
    assert np.ptp(wide["gain_per_doubling"]["ci"]) > high - low


def test_paired_delta_resamples_the_same_examples_for_both():
    tuned = correct_scores(100, 80, seed=0)
    same = paired_delta(0.8, tuned, 0.8, tuned, n_resamples=200)
    assert same == {"value": 0.0, "ci": [0.0, 0.0]}  # paired: identical scores never differ
    other = correct_scores(100, 60, seed=1)
    delta = paired_delta(0.8, tuned, 0.6, other, n_resamples=200)
    assert delta["value"] == pytest.approx(0.2) and 0 < delta["ci"][0] < 0.2 < delta["ci"][1]
    with pytest.raises(RunError, match="same examples"):
        paired_delta(0.8, tuned, 0.6, other[:50])


# --- the verdict rules, on synthetic curves --------------------------------------------------


def synthetic(curve: list[float], prompting: float, n_test: int) -> dict:
    """verdict() of a learning curve and a prompting baseline given as accuracies."""
    scores = [correct_scores(n_test, round(v * n_test), seed=i) for i, v in enumerate(curve)]
    values = [float(np.mean(s)) for s in scores]
    fit = extrapolate(N, values, scores, n_resamples=500)
    prompt_scores = correct_scores(n_test, round(prompting * n_test), seed=99)
    delta = paired_delta(values[-1], scores[-1], float(np.mean(prompt_scores)), prompt_scores,
                         n_resamples=500)
    return verdict(delta, fit["gain_per_doubling"], metric="accuracy", n_test=n_test,
                   predicted_4x=fit["predicted"]["4x"], prompting_value=prompting)


@pytest.mark.parametrize("curve, prompting, n_test, expected", [
    ([0.60, 0.70, 0.80, 0.90], 0.60, 5000, "fine-tune and collect more data"),
    ([0.88, 0.89, 0.89, 0.90], 0.60, 5000, "fine-tune"),
    ([0.60, 0.62, 0.63, 0.65], 0.60, 40, "undecided"),
    ([0.60, 0.60, 0.60, 0.60], 0.70, 5000, "not worth it yet"),
    ([0.40, 0.50, 0.55, 0.60], 0.70, 5000, "prompting is enough"),
])
def test_each_verdict_on_a_synthetic_curve(curve, prompting, n_test, expected):
    decision = synthetic(curve, prompting, n_test)
    assert decision["kind"] == expected, decision["text"]
    numbers = decision["numbers"]
    assert f"{numbers['delta']:+.3g}" in decision["text"]  # it names its numbers
    assert f"{numbers['delta_ci'][0]:+.3g}" in decision["text"]


def test_verdicts_claim_nothing_their_intervals_do_not_support():
    gain = {"value": 0.05, "ci": [0.03, 0.07]}
    # better than prompting, but only just: fine-tune, and by how much
    assert verdict({"value": 0.01, "ci": [0.001, 0.02]}, gain, metric="accuracy",
                   n_test=5000)["kind"] == "fine-tune and collect more data"
    # the interval holds 0 and also a material gain: no claim either way
    wide = verdict({"value": 0.0, "ci": [-0.1, 0.1]}, gain, metric="accuracy", n_test=100)
    assert wide["kind"] == "undecided" and "test examples would narrow it" in wide["text"]
    assert verdict({"value": 0.1, "ci": None}, gain, metric="accuracy",
                   n_test=100)["kind"] == "undecided"
    # a gain interval that reaches above the threshold but is not wholly above it: more data
    # is not shown to pay, so the verdict stays "fine-tune"
    straddling = {"value": 0.012, "ci": [0.004, 0.02]}
    better = verdict({"value": 0.1, "ci": [0.05, 0.15]}, straddling, metric="accuracy",
                     n_test=5000)
    assert better["kind"] == "fine-tune" and "not shown to pay" in better["text"]
    # flat only when the whole gain interval is below the threshold
    rising = {"value": 0.0, "ci": [-0.005, 0.02]}
    assert verdict({"value": 0.0, "ci": [-0.01, 0.01]}, rising, metric="accuracy",
                   n_test=5000)["kind"] == "prompting is enough"
    assert set(VERDICTS) == {"fine-tune and collect more data", "fine-tune", "undecided",
                             "not worth it yet", "prompting is enough"}


def test_label_entropy():
    assert label_entropy_bits(["a", "b"] * 5) == pytest.approx(1.0)
    assert label_entropy_bits(["a"] * 4) == 0.0
    assert label_entropy_bits(["a", "a", "b", "c"]) == pytest.approx(1.5)
    assert label_entropy_bits([]) is None


# --- a real assessment on the tiny model, and its resume -------------------------------------

def assess_config(tmp: Path, model_dir: str):
    """Two epochs on 48 reviews, saving every 2 steps (the resume test stops at step 2)."""
    return make_config(
        tmp, model_dir, sizes=(48, 16, 24),
        method={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        evaluation={"task": "classification", "labels": ["negative", "positive"],
                    "prompt_variants": ["Review: {text}\nSentiment:", "{text}\nThe review is"],
                    "bootstrap": 200},
        save_every=2, samples=3, max_new_tokens=16)  # samples: the config's defaults


class Counting:
    """The real function, counting its calls."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs)


@pytest.fixture(scope="module")
def assessed(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("assess")
    config = assess_config(tmp, tiny_model_dir)
    result = assess(config, shots=[0, 1], fractions=[0.5, 1], target=0.9,
                    console=Console(quiet=True))
    return config, result


def test_assessment_writes_every_part_and_chooses_prompts_on_validation(assessed):
    config, result = assessed
    folder = Path(config.output_dir) / "reviews-assess"
    saved = json.loads((folder / "assess.json").read_text())
    assert {"baselines", "learning_curve", "fit", "cost", "complexity", "verdict"} <= set(saved)
    assert [p["n_examples"] for p in saved["learning_curve"]] == [24, 48]
    for point in saved["learning_curve"]:  # ordinary, finished, evaluated run directories
        run = Path(point["run"])
        assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((run / "eval" / "test.json").read_text())["n"] == 24
    subset = Path(saved["learning_curve"][0]["run"]).parent / "data" / "train-n24.jsonl"
    half = {line for line in subset.read_text().splitlines()}
    assert half <= set(Path(config.data.train[0]).read_text().splitlines())
    for baseline in saved["baselines"]["by_shots"]:
        assert len(baseline["validation"]) == 2  # every variant measured on validation...
        chosen = baseline["validation"][baseline["chosen_variant"]]
        assert chosen["value"] == max(v["value"] for v in baseline["validation"])
        test = json.loads((Path(baseline["run"]) / "eval" / "test.json").read_text())
        assert [v["prompt"] for v in test["models"]["base"]["variants"]] == [chosen["prompt"]]
    assert saved["verdict"]["kind"] in VERDICTS
    assert saved["fit"]["gain_per_doubling"]["ci"] is not None
    assert saved["interval_method"] == "exact"  # accuracy is the mean of per-example scores
    use = saved["cost"]["at_use"]
    assert use["prompting"]["prompt_tokens_per_request"] > 0
    assert [run["n_examples"] for run in saved["cost"]["runs"]] == [24, 48]
    assert saved["cost"]["runs"][1]["tokens"] > saved["cost"]["runs"][0]["tokens"]
    assert saved["complexity"]["n_labels"] == 2
    assert 0.5 < saved["complexity"]["label_entropy_bits"] <= 1.0
    page = (folder / "report.html").read_text()
    assert "data:image/png;base64," in page and result["verdict"]["kind"].capitalize() in page


def test_the_curve_is_written_as_an_svg_that_an_unchanged_result_leaves_unchanged(assessed,
                                                                                 tmp_path):
    from tunelab.experiments.assess_report import write_curve_svg

    config, result = assessed
    svg = (Path(config.output_dir) / "reviews-assess" / "learning-curve.svg").read_bytes()
    assert svg.startswith(b"<?xml") and b"<svg" in svg and b"training examples" in svg
    assert write_curve_svg(result, tmp_path / "again.svg").read_bytes() == svg


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(assessed, tmp_path):
    import importlib.util
    import shutil

    from PIL import Image

    if not shutil.which("chromium") and not Path("/usr/bin/chromium").exists():
        pytest.fail("headless Chromium is needed for this test: "
                    "apt-get update && apt-get install -y chromium")
    script = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.py"
    spec = importlib.util.spec_from_file_location("screenshot_report", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config, _ = assessed
    page = Path(config.output_dir) / "reviews-assess" / "report.html"
    png = module.screenshot(page, tmp_path / "assess.png", height=2400, timeout_s=600)
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # the plot drew: not a blank page


def test_a_second_call_reruns_nothing_and_a_lost_evaluation_alone_is_redone(assessed,
                                                                            monkeypatch):
    import tunelab.eval.evaluate
    import tunelab.train.loop

    config, first = assessed
    trains = Counting(tunelab.train.loop.train)
    evaluations = Counting(tunelab.eval.evaluate.evaluate)
    monkeypatch.setattr(tunelab.train.loop, "train", trains)
    monkeypatch.setattr(tunelab.eval.evaluate, "evaluate", evaluations)
    again = assess(config, shots=[0, 1], fractions=[0.5, 1], target=0.9,
                   console=Console(quiet=True))
    assert trains.calls == 0 and evaluations.calls == 0
    assert again["learning_curve"] == first["learning_curve"]
    assert again["verdict"] == first["verdict"]
    Path(first["learning_curve"][1]["run"], "eval", "test.json").unlink()
    assess(config, shots=[0, 1], fractions=[0.5, 1], console=Console(quiet=True))
    assert trains.calls == 0 and evaluations.calls == 1


def test_an_assessment_of_another_config_is_refused(assessed):
    config, _ = assessed
    changed = config.model_copy(deep=True)
    changed.train.lr = 1e-3
    with pytest.raises(RunError, match="train.lr"):
        assess(changed, shots=[0, 1], fractions=[0.5, 1], console=Console(quiet=True))


def test_without_validation_data_nothing_is_started(tmp_path, tiny_model_dir):
    config = assess_config(tmp_path, tiny_model_dir)
    config.data.validation = []
    with pytest.raises(ConfigError, match="data.validation"):
        assess(config, console=Console(quiet=True))
    assert not (tmp_path / "runs").exists()


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import tunelab.train.loop

    config = assess_config(tmp_path, tiny_model_dir)
    real = tunelab.train.loop.train
    calls = []

    def stopped_once(run_config, **options):
        calls.append(options.get("resume"))
        if len(calls) == 1:  # as Ctrl-C would: stop after 2 steps with a checkpoint
            real(run_config, stop_after_steps=2, **options)
            raise KeyboardInterrupt
        return real(run_config, **options)

    monkeypatch.setattr(tunelab.train.loop, "train", stopped_once)
    with pytest.raises(KeyboardInterrupt):
        assess(config, shots=[0], fractions=[0.5, 1], console=Console(quiet=True))
    assess(config, shots=[0], fractions=[0.5, 1], console=Console(quiet=True))
    folder = tmp_path / "runs" / "reviews-assess"
    assert calls[0] is None and calls[1] == folder / "reviews-n24"  # resumed, not restarted
    assert len(calls) == 3  # then the full-data run; nothing else trained twice
    assert json.loads((folder / "assess.json").read_text())["verdict"]
