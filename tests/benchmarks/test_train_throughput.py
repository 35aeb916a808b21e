"""benchmarks/train_throughput.py: what makes its comparison fair, checked without timing.

The benchmark itself is run by the measurement queue, never by the test suite; these tests keep
its fairness rules and its configs honest (a renamed config field would otherwise only surface
as a failed lever row after twenty minutes of measuring).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from tunelab.config import config_from_dict
from tunelab.data.packing import plan_batches

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports provenance.py from beside it
_spec = importlib.util.spec_from_file_location("train_throughput",
                                               BENCHMARKS / "train_throughput.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_loss_at_equal_tokens_weights_each_step_by_its_tokens_in_the_last_quarter():
    # 100 tokens: the last quarter is tokens 75..100, 15 of them in step 2 and 10 in step 3.
    assert bench.last_quarter_loss([50, 40, 10], [9.0, 6.0, 3.0]) == pytest.approx(
        (15 * 6.0 + 10 * 3.0) / 25)
    # One step holding every token: its own loss.
    assert bench.last_quarter_loss([80], [4.5]) == pytest.approx(4.5)


def test_tunelab_gets_the_smallest_budget_that_packs_into_the_trainers_steps():
    lengths = [180, 220, 90, 400, 150, 310, 60, 240, 205, 130, 350, 170]
    steps, seed = 3, 0
    budget = bench.matched_batch_tokens(lengths, steps, seed)
    assert budget >= sum(lengths) / steps
    assert len(plan_batches(lengths, batch_tokens=budget, packing=True, seed=seed)) <= steps
    assert len(plan_batches(lengths, batch_tokens=budget - 16, packing=True, seed=seed)) > steps


def test_lengths_are_uniform_or_skewed_as_named(tmp_path):
    for name in ("uniform", "skewed"):
        bench.write_dataset(tmp_path / f"{name}.jsonl", 200, 0, name)
    words = {name: [len(line.split("\"output\": ")[1].split()) for line in
                    (tmp_path / f"{name}.jsonl").read_text().splitlines()]
             for name in ("uniform", "skewed")}
    assert 110 <= min(words["uniform"]) and max(words["uniform"]) <= 140
    assert max(words["skewed"]) > 4 * sorted(words["skewed"])[100]  # a long tail


@pytest.mark.parametrize("lever", list(bench.LEVERS))
def test_every_lever_is_a_valid_train_config_that_differs_from_the_default(lever, tmp_path):
    bench.write_dataset(tmp_path / "skewed.jsonl", 4, 0, "skewed")
    spec = {"scratch": str(tmp_path), "model_dir": str(tmp_path),
            "data_path": str(tmp_path / "skewed.jsonl"),
            "gpu": False, "lr": 1e-3, "seed": 0, "batch_tokens": 4096, "max_seq_len": 512}
    switch = bench.LEVERS[lever]
    default = config_from_dict(bench.tunelab_config(spec), base_dir=tmp_path)
    switched = config_from_dict(bench.tunelab_config(spec, switch.get("config")),
                                base_dir=tmp_path)
    changed = switched != default or "threads" in switch or switch.get("varlen") is False
    assert changed == bool(switch)
    assert default.train.samples == 0 and default.data.validation == []


def test_tunelab_side_gets_the_malloc_the_cli_gives_it_and_the_trainer_sides_do_not(
        monkeypatch):
    from tunelab import allocator

    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # a setting of the shell is not inherited
    spec = {"model_dir": "m", "data_path": "d.jsonl", "gpu": False, "lr": 1e-3, "seed": 0,
            "batch_tokens": 4096, "max_seq_len": 512}
    tunelab = bench.worker_environment("tunelab", spec)
    assert tunelab["LD_PRELOAD"] == "libjemalloc.so.2"
    assert tunelab["MALLOC_CONF"] == allocator.JEMALLOC_CONF
    for side in ("hf_padded", "hf_flattened"):
        environment = bench.worker_environment(side, spec)
        assert "LD_PRELOAD" not in environment and "MALLOC_CONF" not in environment
    glibc = {**spec, "lever": bench.LEVERS["glibc's malloc instead of jemalloc "
                                            "(train.allocator: system)"]}
    assert "LD_PRELOAD" not in bench.worker_environment("tunelab", glibc)


@pytest.mark.parametrize("source", ["a model folder", "tokenizer files only"])
def test_the_random_model_goes_to_its_folder_and_the_tokenizer_source_is_left_as_it_was(
        source, tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = tmp_path / "tokenizer"
    if source == "a model folder":
        shutil.copytree(tiny_model_dir, tokenizer)
    else:  # what tokenizer.save_pretrained writes
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tokenizer)
    before = {path.name: path.stat().st_mtime_ns for path in tokenizer.iterdir()}
    dims = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2}
    bench.build_model(tmp_path / "model", dims, seed=0, tokenizer_path=str(tokenizer))
    assert AutoConfig.from_pretrained(tmp_path / "model").num_hidden_layers == 1
    assert (tmp_path / "model" / "tokenizer_config.json").is_file()
    assert {path.name: path.stat().st_mtime_ns for path in tokenizer.iterdir()} == before
