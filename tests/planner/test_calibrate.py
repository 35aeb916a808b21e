"""``tunelab plan --calibrate``: a few real steps of the run's own schedule, measured in a fresh
process, and the plan scaled by what they measured."""

from __future__ import annotations

from helpers import write_project

from tunelab.config import load_config
from tunelab.data.schedule import run_schedule
from tunelab.model.load import load_tokenizer
from tunelab.planner.predict import plan
from tunelab.planner.workload import count_tokens
from tunelab.train.calibrate import calibrate_run, measure_steps


def timed_tokens(config, *, mixed: bool, steps: int) -> int:
    """The tokens calibration times: the heaviest step goes first (the memory peak, untimed),
    then the run's first other steps, timed."""
    counts = count_tokens(config, load_tokenizer(config.model.path))
    schedule = run_schedule(config, counts.lengths, counts.tasks if mixed else None).steps()
    tokens = lambda batch: sum(counts.lengths[i] for i in batch)  # noqa: E731
    heaviest = max(range(len(schedule)), key=lambda g: max(map(tokens, schedule[g])))
    timed = [g for g in range(len(schedule)) if g != heaviest][:steps - 1]
    return sum(tokens(batch) for g in timed for batch in schedule[g])


def test_calibration_times_steps_of_the_runs_own_multitask_schedule(tmp_path, tiny_model_dir):
    config = load_config(write_project(tmp_path, tiny_model_dir,
                                       mixing={"mixing": "weights", "weights": [1.0, 3.0]},
                                       max_steps=6))
    measured = measure_steps(config, steps=3)
    assert measured["steps"] == 3
    assert measured["timed_tokens"] == timed_tokens(config, mixed=True, steps=3)
    assert measured["timed_tokens"] != timed_tokens(config, mixed=False, steps=3)


def test_a_calibrated_plan_takes_the_measured_rate(tmp_path, tiny_model_dir):
    config = load_config(write_project(tmp_path, tiny_model_dir, mixing={}, max_steps=4))
    calibration = calibrate_run(config, steps=2)
    assert calibration["tokens_per_second"] > 0 and calibration["measured_peak_bytes"] > 2**20
    calibrated = plan(config, calibration=calibration)
    assert calibrated.time["source"] == "calibration run"
    assert calibrated.predicted_tokens_per_second == calibration["tokens_per_second"]
    assert "prediction_error" in calibrated.memory
