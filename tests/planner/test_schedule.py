"""The planner lays out the micro-batches the run trains on, a multitask mixture included."""

from __future__ import annotations

import json

from helpers import run_ok, write_project

from tunelab.config import load_config
from tunelab.data.schedule import run_schedule
from tunelab.model.load import load_tokenizer
from tunelab.planner.predict import plan
from tunelab.planner.workload import count_tokens, micro_batches


def test_the_plan_lays_out_the_schedule_a_multitask_run_trains_on(tmp_path, tiny_model_dir,
                                                                   monkeypatch, capsys):
    config_path = write_project(tmp_path, tiny_model_dir,
                                mixing={"mixing": "weights", "weights": [1.0, 3.0]}, max_steps=6)
    config = load_config(config_path, {"train.log_every": 1, "train.grad_accum": 2})
    counts = count_tokens(config, load_tokenizer(config.model.path))
    batches = micro_batches(counts, config)
    planned_steps = [sum(sum(batch["lengths"]) for batch in batches[start:start + 2])
                     for start in range(0, len(batches), 2)]
    run_ok(monkeypatch, capsys, "train", str(config_path), "--set", "train.log_every=1",
           "--set", "train.grad_accum=2")
    lines = (tmp_path / "runs" / "multi" / "metrics.jsonl").read_text().splitlines()
    trained_steps = [record["tokens"] for record in map(json.loads, lines) if "loss" in record]
    assert trained_steps == planned_steps and len(trained_steps) == 6
    # the schedule without the mixture (what the planner once laid out) is another one
    unmixed = run_schedule(config, counts.lengths).steps()
    assert [sum(counts.lengths[i] for batch in step for i in batch)
            for step in unmixed] != planned_steps
    assert plan(config).data["run_tokens"] == sum(trained_steps)
