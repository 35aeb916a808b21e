"""evaluate() → eval/*.json → render_report() on a real run of the tiny model: every number the
evaluation measured reaches the page, so a change in the result's shape fails here instead of
showing as an empty cell in a report."""

from __future__ import annotations

import pytest
from helpers import make_config, quiet

from tunelab.eval.evaluate import evaluate
from tunelab.eval.result import SCHEMA_VERSION, read_eval
from tunelab.report.html import load_run, render_report
from tunelab.train.loop import train


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("eval-report")
    config = make_config(
        tmp, tiny_model_dir, name="typed", sizes=(40, 8, 24),
        method={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        evaluation={"task": "classification", "labels": ["negative", "positive"],
                    "prompt_variants": ["Review: {text}\nSentiment:", "{text}\nSentiment:"],
                    "bootstrap": 200},
        max_steps=4, batch_tokens=256, samples=0)
    run_dir = train(config, console=quiet()).run_dir
    returned = evaluate(config, run_dir=run_dir, console=quiet())
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
            shown = (entry.p_text.replace("<", "&lt;") if entry.p_text  # the comparison's own
                     else "p &lt; 0.001" if entry.p_value < 0.001 else f"p = {entry.p_value:.3f}")
            assert f"{shown} <span class=\"muted\">{entry.test}</span>" in section, name
    assert "mcnemar" in section and "n/a" not in section
    assert "could not be drawn" not in page and "Left out" not in page
