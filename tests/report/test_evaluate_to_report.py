"""evaluate() → eval/*.json → render_report() on a real run of the tiny model: every number the
evaluation measured reaches the page, so a change in the result's shape fails here instead of
showing as an empty cell in a report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.eval.evaluate import evaluate
from tunelab.eval.result import SCHEMA_VERSION, read_eval
from tunelab.report.html import load_run, render_report
from tunelab.train.loop import train

WORDS = {"positive": ["good", "great", "lovely", "fun"], "negative": ["bad", "awful", "dull"]}


def write_reviews(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            handle.write(json.dumps({"text": f"the movie was {rng.choice(WORDS[label])}",
                                     "label": label}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("eval-report")
    config = config_from_dict({
        "name": "typed", "output_dir": str(tmp / "runs"), "model": {"path": tiny_model_dir},
        "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": write_reviews(tmp / "train.jsonl", 40, 0),
                 "validation": write_reviews(tmp / "valid.jsonl", 8, 1),
                 "test": write_reviews(tmp / "test.jsonl", 24, 2),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"max_steps": 4, "lr": 1e-2, "batch_tokens": 256, "max_seq_len": 64,
                  "samples": 0},
        "eval": {"task": "classification", "labels": ["negative", "positive"],
                 "prompt_variants": ["Review: {text}\nSentiment:", "{text}\nSentiment:"],
                 "bootstrap": 200},
    })
    run_dir = train(config, console=Console(quiet=True)).run_dir
    returned = evaluate(config, run_dir=run_dir, console=Console(quiet=True))
    return run_dir, returned


def test_evaluate_writes_a_typed_versioned_result(evaluated_run):
    run_dir, returned = evaluated_run
    result = read_eval(run_dir / "eval" / "test.json")
    assert result.schema_version == SCHEMA_VERSION
    assert returned == result  # evaluate() returns exactly what the file holds
    assert result.task == "classification" and result.primary_metric == "accuracy"
    assert set(result.models) == {"base", "tuned"} and result.n == 24
    tuned = result.models["tuned"]
    assert tuned.metrics["accuracy"].value == returned.models["tuned"].metrics["accuracy"].value
    assert len(tuned.variants) == 2 and len(tuned.predictions) == 24
    assert result.comparison["accuracy"].test == "mcnemar"


def test_every_measured_number_reaches_the_report(evaluated_run):
    run_dir, _ = evaluated_run
    result = read_eval(run_dir / "eval" / "test.json")
    page = render_report(load_run(run_dir))
    section = page[page.index("From <code>eval/test.json</code>"):]
    for which, outcome in result.models.items():
        for name, metric in outcome.metrics.items():
            low, high = metric.ci
            for number in (metric.value, low, high):
                assert f"{number:.3f}" in section, (which, name, number)
        for variant in outcome.variants:
            assert f"{variant.metrics['accuracy'].value:.3f}" in section
    for name, entry in result.comparison.items():
        assert f"{entry.delta:+.3f}" in section, name
        if entry.p_value is not None:  # the paired test, where the task runs one
            shown = "p &lt; 0.001" if entry.p_value < 0.001 else f"p = {entry.p_value:.3f}"
            assert f"{shown} <span class=\"muted\">{entry.test}</span>" in section, name
    assert "mcnemar" in section and "n/a" not in section
    assert "could not be drawn" not in page and "Left out" not in page
