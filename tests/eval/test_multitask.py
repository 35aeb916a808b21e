"""A multitask run on the tiny model, from the CLI: the realised mixture in metrics.jsonl, a
validation loss per task, exact resume, and ``tunelab eval`` with one result per task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import quiet, run_ok, write_project

from tunelab.config import load_config
from tunelab.data.prepare import prepare_data
from tunelab.errors import RunError
from tunelab.eval.multitask import paired_difference
from tunelab.eval.result import read_eval
from tunelab.model.load import load_tokenizer
from tunelab.train.distributed import Cluster, StepLoss
from tunelab.train.loop import Batching, prepare, validation_loss, validation_losses


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_multitask_run_logs_its_mixture_and_per_task_losses(tmp_path, tiny_model_dir,
                                                            monkeypatch, capsys):
    config_path = write_project(tmp_path, tiny_model_dir,
                                mixing={"mixing": "weights", "weights": [1.0, 3.0]},
                                max_steps=30)
    run_ok(monkeypatch, capsys, "train", str(config_path))
    run = tmp_path / "runs" / "multi"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["mixture"] == {"mixing": "weights",
                                   "rates": {"sentiment": 0.25, "echo": 0.75}}
    assert set(manifest["data_report"]["tasks"]) == {"sentiment", "echo"}
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 30
    for record in steps:  # every token of a step belongs to one task
        assert sum(record["task_tokens"].values()) == record["tokens"]
    drawn = {name: sum(r["task_tokens"][name] for r in steps) for name in ("sentiment", "echo")}
    # 30 steps of 128 tokens (~3,800 tokens, ~250 examples drawn): within 8 points of 1:3
    assert drawn["echo"] / sum(drawn.values()) == pytest.approx(0.75, abs=0.08)
    validations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validations] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    tokens = validation_target_tokens(load_config(config_path))
    for record in validations:
        losses = record["val_loss_tasks"]
        assert set(losses) == {"sentiment", "echo"}
        # the overall loss is per target token over both tasks: their token-weighted mean
        weighted = sum(losses[name] * tokens[name] for name in tokens) / sum(tokens.values())
        assert record["val_loss"] == pytest.approx(weighted, rel=1e-9)
    assert validations[-1]["val_loss_tasks"]["echo"] < validations[0]["val_loss_tasks"]["echo"]


def validation_target_tokens(config) -> dict[str, int]:
    """Each task's validation target tokens, as the run tokenizes them."""
    data = prepare_data(config.data, load_tokenizer(config.model.path),
                        max_seq_len=config.train.max_seq_len, seed=config.train.seed)
    tokens = dict.fromkeys(data.validation_tasks, 0)
    for example, task in zip(data.validation, data.validation_tasks, strict=True):
        tokens[task] += example.n_target_tokens
    return tokens


class CountingStepLoss(StepLoss):
    """The loop's step loss, counting the examples it scores."""

    def __init__(self, model, chunk_tokens: int):
        super().__init__(model, chunk_tokens)
        self.examples_scored = 0

    def forward(self, batch):
        self.examples_scored += batch.n_examples
        return super().forward(batch)


def test_validation_scores_each_example_once_for_the_overall_and_task_losses(tmp_path,
                                                                             tiny_model_dir):
    config = load_config(write_project(tmp_path, tiny_model_dir,
                                       mixing={"mixing": "proportional"}))
    prepared = prepare(config, quiet())
    step_model = CountingStepLoss(prepared.model, config.train.loss_chunk_tokens)
    options = Batching(batch_tokens=128, packing=True, pad_id=0, device=prepared.device,
                       cluster=Cluster())
    overall, logged = validation_losses(step_model, prepared.validation,
                                        prepared.validation_tasks, options)
    assert step_model.examples_scored == len(prepared.validation) == 16 + 8  # one pass
    losses, tokens = logged["val_loss_tasks"], validation_target_tokens(config)
    for name in ("sentiment", "echo"):  # each task's loss is its examples' alone
        own = [ex for ex, task in zip(prepared.validation, prepared.validation_tasks,
                                      strict=True) if task == name]
        assert losses[name] == pytest.approx(validation_loss(step_model, own, options),
                                             rel=1e-6)
    weighted = sum(losses[name] * tokens[name] for name in tokens) / sum(tokens.values())
    assert overall == pytest.approx(weighted, rel=1e-9)
    # and it is the loss over all the examples together (batched across tasks)
    assert overall == pytest.approx(validation_loss(step_model, prepared.validation, options),
                                    rel=1e-5)
    single, nothing = validation_losses(step_model, prepared.validation, [], options)
    assert nothing == {} and single == pytest.approx(overall, rel=1e-5)


def test_multitask_resume_draws_the_same_examples(tmp_path, tiny_model_dir):
    from tunelab.train.loop import train

    whole = train(load_config(write_project(tmp_path / "a", tiny_model_dir,
                                            mixing={"mixing": "proportional"})), console=quiet())
    config = load_config(write_project(tmp_path / "b", tiny_model_dir,
                                       mixing={"mixing": "proportional"}))
    stopped = train(config, stop_after_steps=5, console=quiet())
    assert stopped.steps == 5
    resumed = train(config, resume=stopped.run_dir, console=quiet())
    drawn = lambda run: [(r["step"], r["task_tokens"], r["loss"])  # noqa: E731
                         for r in read_metrics(run) if "loss" in r]
    assert drawn(resumed.run_dir) == drawn(whole.run_dir)
    assert resumed.val_loss_after == whole.val_loss_after


def test_eval_writes_one_result_per_task_with_its_own_metric(tmp_path, tiny_model_dir,
                                                            monkeypatch, capsys):
    config_path = write_project(tmp_path, tiny_model_dir,
                                mixing={"mixing": "temperature", "temperature": 2.0})
    run_ok(monkeypatch, capsys, "train", str(config_path))
    out = run_ok(monkeypatch, capsys, "eval", str(config_path))
    assert "task sentiment" in out and "task echo" in out
    run = tmp_path / "runs" / "multi"
    sentiment = read_eval(run / "eval" / "test-sentiment.json")
    echo = read_eval(run / "eval" / "test-echo.json")
    assert (sentiment.task, sentiment.n, sentiment.primary_metric) == \
        ("classification", 24, "accuracy")
    assert (echo.task, echo.n, echo.primary_metric) == ("translation", 10, "chrf")
    for result, prompt in ((sentiment, "Sentiment:"), (echo, "Repeat:")):
        assert set(result.models) == {"base", "tuned"}
        assert all(prompt in p.input for p in result.models["tuned"].predictions)
        metric = result.models["tuned"].metrics[result.primary_metric]
        assert metric.ci[0] <= metric.value <= metric.ci[1]
    # The report reads both files.
    run_ok(monkeypatch, capsys, "report", str(run))
    page = (run / "report.html").read_text()
    assert "test-sentiment.json" in page and "test-echo.json" in page

    # Paired difference between two evaluations of the same examples: tuned minus base here,
    # so it must agree with evaluate's own comparison of the two.
    config = load_config(config_path)
    eval_cfg = config.data.tasks[1].eval
    base_only = echo.model_copy(update={"models": {"tuned": echo.models["base"]}})
    difference = paired_difference(base_only, echo, eval_cfg)
    assert difference["metric"] == "chrf"
    assert difference["delta"] == pytest.approx(echo.comparison["chrf"].delta, abs=1e-9)
    assert difference["ci"] == pytest.approx(echo.comparison["chrf"].ci, abs=1e-9)
    with pytest.raises(RunError, match="not of the same examples"):
        paired_difference(sentiment, echo, eval_cfg)
