"""tunelab assess: nested fractions, the fit and its extrapolation against hand-computed values,
the verdict rules on synthetic curves, and one real assessment on the tiny model that resumes
without redoing anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import make_config
from rich.console import Console

from tunelab.errors import ConfigError, RunError
from tunelab.experiments.assess import (
    assess,
    default_seeds,
    examples_needed,
    fit_log2,
    nested_subsets,
    parse_fractions,
    parse_seeds,
)
from tunelab.experiments.assess_cost import label_entropy_bits
from tunelab.experiments.verdict import VERDICTS

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


def test_examples_for_a_target_on_the_line():
    assert examples_needed(0.218, 0.096, 0.9) == pytest.approx(2 ** ((0.9 - 0.218) / 0.096))
    assert examples_needed(0.7, 0.0, 0.8) == math.inf


def test_seeds_parse_as_one_count_or_one_per_fraction():
    fractions = [0.125, 0.25, 0.5, 1.0]
    assert default_seeds(fractions) == [2, 2, 1, 1]
    assert parse_seeds("3", fractions) == [3, 3, 3, 3]
    assert parse_seeds("3,3,2,1", fractions) == [3, 3, 2, 1]
    for bad in ("0", "2,2", "two", "1,1,1,0"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad, fractions)


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
    result = assess(config, shots=[0, 1], fractions=[0.5, 1], seeds=[2, 1], target=0.9,
                    console=Console(quiet=True))
    return config, result


def test_assessment_writes_every_part_and_chooses_prompts_on_validation(assessed):
    config, result = assessed
    folder = Path(config.output_dir) / "reviews-assess"
    saved = json.loads((folder / "assess.json").read_text())
    assert {"baselines", "learning_curve", "fit", "cost", "complexity", "verdict"} <= set(saved)
    assert [p["n_examples"] for p in saved["learning_curve"]] == [24, 48]
    assert [p["seeds"]["n_seeds"] for p in saved["learning_curve"]] == [2, 1]
    half = saved["learning_curve"][0]
    assert half["value"] == pytest.approx(sum(half["seeds"]["values"]) / 2)
    assert len(half["runs"]) == 2 and half["runs"][1].endswith("reviews-n24-seed1")
    for point in saved["learning_curve"]:  # ordinary, finished, evaluated run directories
        for run_dir in point["runs"]:
            run = Path(run_dir)
            assert json.loads((run / "manifest.json").read_text())["status"] == "finished"
            assert (run / "adapter" / "adapter_model.safetensors").is_file()
            assert json.loads((run / "eval" / "test.json").read_text())["n"] == 24
    assert [yaml.safe_load((Path(r) / "config.yaml").read_text())["train"]["seed"]
            for r in half["runs"]] == [0, 1]  # the config's seed, then the next
    subset = Path(saved["learning_curve"][0]["run"]).parent / "data" / "train-n24.jsonl"
    lines = set(subset.read_text().splitlines())
    assert lines <= set(Path(config.data.train[0]).read_text().splitlines())
    arms = saved["baselines"]["arms"]
    assert [a["name"] for a in arms] == ["base 0-shot", "base 1-shot"]
    for baseline in arms:
        assert len(baseline["validation"]) == 2  # every variant measured on validation...
        chosen = baseline["validation"][baseline["chosen_variant"]]
        best = max(v["value"] for v in baseline["validation"])
        assert chosen["value"] == best or "cannot separate" in baseline["selection"]
        test = json.loads((Path(baseline["run"]) / "eval" / "test.json").read_text())
        assert [v["prompt"] for v in test["models"]["base"]["variants"]] == [chosen["prompt"]]
    assert saved["baselines"]["chosen"] in {a["name"] for a in arms}
    assert set(saved["tuned_vs_arms"]) == {a["name"] for a in arms}
    assert saved["verdict"]["kind"] in VERDICTS
    if saved["fit"] is not None:
        assert saved["fit"]["gain_per_doubling"]["ci"] is not None
    else:  # the tiny random model's runs may collapse to one label: then it says so
        assert saved["verdict"]["kind"] == "undecided"
    assert "training seeds" in saved["interval_method"]
    assert saved["seeds"]["per_fraction"][0]["std"] is not None
    scores = json.loads((folder / "curve-scores.json").read_text())
    assert [len(f["seeds"]) for f in scores["fractions"]] == [2, 1]
    assert len(scores["fractions"][0]["seeds"][0]["scores"]) == 24
    assert all(entry["general_loss"]["delta"] is not None for entry in saved["forgetting"])
    use = saved["cost"]["at_use"]
    assert use["prompting"]["prompt_tokens_per_request"] > 0
    assert [run["n_examples"] for run in saved["cost"]["runs"]] == [24, 24, 48]  # per seed
    assert saved["cost"]["runs"][2]["tokens"] > saved["cost"]["runs"][0]["tokens"]
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
    again = assess(config, shots=[0, 1], fractions=[0.5, 1], seeds=[2, 1], target=0.9,
                   console=Console(quiet=True))
    assert trains.calls == 0 and evaluations.calls == 0
    assert again["learning_curve"] == first["learning_curve"]
    assert again["verdict"] == first["verdict"]
    Path(first["learning_curve"][1]["run"], "eval", "test.json").unlink()
    assess(config, shots=[0, 1], fractions=[0.5, 1], seeds=[2, 1],
           console=Console(quiet=True))
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


def test_two_bases_from_the_cli_are_assessed_and_compared_on_one_page(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    import architectures
    from helpers import run_ok, write_config
    from transformers import AutoTokenizer

    qwen = architectures.save("qwen2", tmp_path / "tiny-qwen2",
                              AutoTokenizer.from_pretrained(tiny_model_dir))
    config = write_config(tmp_path, tiny_model_dir, sizes=(24, 12, 12),
                          method={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                          evaluation={"task": "classification",
                                      "labels": ["negative", "positive"], "bootstrap": 100})
    out = run_ok(monkeypatch, capsys, "assess", str(config), "--shots", "0", "--fractions",
                 "1/2,1", "--seeds", "1", "--base", tiny_model_dir, "--base", str(qwen))
    folder = tmp_path / "runs"
    summary = json.loads((folder / "reviews-bases" / "bases.json").read_text())
    assert [row["base"] for row in summary["rows"]] == [tiny_model_dir, str(qwen)]
    for row in summary["rows"]:  # one whole assessment per base, each on its own model
        assessed = json.loads((folder / f"{row['name']}-assess" / "assess.json").read_text())
        assert assessed["verdict"]["kind"] in VERDICTS
        run_config = yaml.safe_load((Path(assessed["learning_curve"][-1]["run"])
                                     / "config.yaml").read_text())
        assert run_config["model"]["path"] == row["base"]
    assert summary["choice"] in (None, tiny_model_dir, str(qwen)) and summary["why"]
    assert "tiny-qwen2" in (folder / "reviews-bases" / "bases.html").read_text()
    assert "Which base to tune" in out  # the comparison was printed
