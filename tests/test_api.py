"""The Python API (``tunelab.finetune``, ``evaluate``, ``plan``, ``check_data``, ``load_run``) on
the tiny model: what the commands do, from Python, a multitask config included."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import make_config, quiet, write_project

import tunelab
from tunelab.errors import ConfigError


def test_import_tunelab_is_cheap_and_lists_the_api():
    code = ("import sys, tunelab; names = dir(tunelab); "
            "print('finetune' in names, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_finetune_then_load_run_gives_the_run_back(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, max_steps=3, samples=0)
    planned = tunelab.plan(config)
    assert planned.data["steps"] == 3 and planned.predicted_peak_bytes > 0
    result = tunelab.finetune(config, console=quiet())
    run = tunelab.load_run(result.run_dir)
    assert run.config.name == config.name and run.manifest.finished
    assert run.manifest.steps == 3 == max(record["step"] for record in run.metrics)
    model, tokenizer = run.model()
    assert sum("lora_" in name for name, _ in model.named_parameters()) > 0
    report = tunelab.check_data(config, console=quiet())
    assert report["splits"]["train"]["n_records"] == 120


def test_evaluate_a_multitask_config_from_python(tmp_path, tiny_model_dir):
    config = tunelab.load_config(write_project(tmp_path, tiny_model_dir, mixing={},
                                               max_steps=2))
    # no run yet: the base model alone, filed in a run of its own
    base_only = tunelab.evaluate(config, console=quiet())
    assert set(base_only) == {"sentiment", "echo"}
    assert all(set(result.models) == {"base"} for result in base_only.values())
    assert (tmp_path / "runs" / "multi-base" / "config.yaml").is_file()
    tunelab.finetune(config, console=quiet())
    both = tunelab.evaluate(config, console=quiet())
    assert all(set(result.models) == {"base", "tuned"} for result in both.values())


def test_finetune_needs_a_config_or_a_run():
    with pytest.raises(ConfigError, match="give a config"):
        tunelab.finetune()
