"""The start banner of train, eval and assess: device, dtype, parameters, the plan, and the
warning when ``model.device: auto`` ended on the CPU."""

from __future__ import annotations

import re

import torch
from helpers import make_config, run_ok, write_config
from rich.console import Console

from tunelab.banner import fallback_warning, plan_line, print_assessment_start


def test_train_and_eval_print_where_they_run_and_on_what(monkeypatch, capsys, tmp_path,
                                                         tiny_model_dir):
    evaluation = {"task": "classification", "labels": ["negative", "positive"]}
    config = write_config(tmp_path, tiny_model_dir, sizes=(40, 10, 10), evaluation=evaluation,
                          max_steps=2)
    out = " ".join(run_ok(monkeypatch, capsys, "train", str(config)).split())
    banner = re.search(r"tunelab train: cpu \((\d+) cores\), float32, ([\d,.]+)M? of "
                       r"([\d,.]+)M? parameters trainable \(([\d.]+)%\); plan: peak memory "
                       r"([\d.]+) GiB, about", out)
    assert banner, out[:600]
    assert 0 < float(banner.group(4)) < 100 and float(banner.group(5)) > 0
    assert ("no CUDA or MPS device found" in out) == (not torch.cuda.is_available())
    assert out.index("tunelab train:") < out.index("Validation loss before training")
    out = " ".join(run_ok(monkeypatch, capsys, "eval", str(config)).split())
    assert re.search(r"tunelab eval: cpu \(\d+ cores\), float32, [\d,.]+M? parameters "
                     r"\(adapter [\d,.]+M?\)", out), out[:600]
    assert out.count("tunelab eval:") == 1  # base and tuned are one model, the adapter off


def test_a_device_named_by_the_config_gets_no_warning():
    assert fallback_warning("cpu", torch.device("cpu"), "training") is None
    warning = fallback_warning("auto", torch.device("cpu"), "training")
    assert warning.endswith(f"training on CPU ({len(__import__('os').sched_getaffinity(0))} "
                            "cores)")


def test_a_missing_prediction_says_so_and_why():
    assert plan_line({"error": "tunelab plan does not predict grpo runs\nmore"}) == \
        "plan: no prediction (tunelab plan does not predict grpo runs)"
    assert plan_line(None).startswith("plan: no prediction")
    assert plan_line({"predicted_peak_bytes": 3 * 2**30, "predicted_wall_s": 125}) == \
        "plan: peak memory 3.00 GiB, about 2 min 5 s (tunelab plan CONFIG for details)"


def test_assess_prints_the_plan_of_one_training(tmp_path, tiny_model_dir):
    console = Console(record=True, width=300)
    print_assessment_start(console, make_config(tmp_path, tiny_model_dir, sizes=(40, 10, 10)))
    text = console.export_text()
    assert re.search(r"tunelab assess: cpu \(\d+ cores\), float32, [\d,.]+M? of [\d,.]+M? "
                     r"parameters trainable; plan of one training on all the data: peak memory "
                     r"[\d.]+ GiB", text), text
