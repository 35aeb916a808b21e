"""Every script in benchmarks/ and scripts/ still runs at HEAD: each one's ``--smoke`` mode.

A smoke run takes a script's whole code path at tiny sizes (``benchmarks/smoke.py``: the test
suite's tiny model, a few examples, a step or two) and writes its result file to a temporary
folder. Each test runs one script's ``main(argv)`` in this process (torch and transformers are
imported once; a script starts its own subprocesses only where it needs them: a server, a
torchrun, a process to kill), then renders the result with every renderer the documents use
for the committed file it stands for (``scripts/published.py``), so that a change which breaks
a published measurement, or a field its table reads, fails here and not at the next
re-measurement. ``scripts/published.py`` and ``scripts/config_reference.py`` have their own
tests (``--check``); ``benchmarks/run_all.sh`` is the full re-measurement.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import provenance.py and smoke.py

from tunelab.planner import speed  # noqa: E402

_MODULES: dict[Path, object] = {}


def script(relative: str):
    """The script at ``relative`` (from the repository root), imported once."""
    path = ROOT / relative
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"smoke_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


def run_smoke(relative: str, *argv: str) -> None:
    """``relative``'s ``main([*argv, "--smoke"])``, which must end without an error code."""
    code = script(relative).main([*argv, "--smoke"])
    assert code in (None, 0), f"{relative} --smoke exited {code}"


def published_kinds(committed: str) -> list[str]:
    """Every renderer the documents apply to the committed result file ``committed``."""
    published = script("scripts/published.py")
    kinds = {match["kind"] for document in published.documents()
             for match in published.BLOCK.finditer(document.read_text())
             if match["path"] == committed}
    assert kinds, f"no document renders {committed}"
    return sorted(kinds)


def renders_like(committed: str, result_file: Path, *, except_kinds: dict | None = None) -> dict:
    """The smoke result at ``result_file``, after every renderer of ``committed`` rendered it
    (``except_kinds``: kind → why a smoke result cannot have what it summarises)."""
    published = script("scripts/published.py")
    result = json.loads(result_file.read_text())
    for key in published.PROVENANCE_KEYS:
        assert result.get(key), f"{result_file} lacks {key}"
    assert_finite(result)
    for kind in published_kinds(committed):
        if kind not in (except_kinds or {}):
            assert published.RENDERERS[kind](result).strip(), kind
    return result


def assert_finite(value, where: str = "result") -> None:
    """No NaN or infinity anywhere in a result: every ratio and rate came out a number."""
    if isinstance(value, float):
        assert math.isfinite(value), f"{where} is {value}"
    elif isinstance(value, dict):
        for key, item in value.items():
            assert_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            assert_finite(item, f"{where}[{index}]")


@pytest.fixture(autouse=True)
def no_matmul_benchmark(monkeypatch):
    """The planner times a dense matmul for a second before every run it plans; a tiny run
    takes less than that, so in these runs its predicted time rests on a fixed rate."""
    monkeypatch.setattr(speed, "measure_matmul_flops", lambda *args, **kwargs: 5e10)


# --- benchmarks/ -----------------------------------------------------------------------------


def test_train_throughput_compares_the_three_sides(tmp_path):
    run_smoke("benchmarks/train_throughput.py", "--out", str(tmp_path / "throughput.json"))
    result = renders_like("benchmarks/results/throughput-cpu.json",
                          tmp_path / "throughput.json")
    summary = result["summary"]["skewed"]
    for side in ("hf_padded", "hf_flattened"):
        assert summary["tunelab_vs"][side]["tokens_per_second"] > 0
    # the same examples on every side; only the padding collator computes more positions
    assert summary["tunelab"]["non_padding_tokens"] == summary["hf_padded"]["non_padding_tokens"]
    assert summary["tunelab"]["processed_tokens"] == summary["tunelab"]["non_padding_tokens"]
    assert summary["hf_padded"]["processed_tokens"] > summary["hf_padded"]["non_padding_tokens"]


def test_train_throughput_levers_switch_each_lever_against_the_default(tmp_path):
    run_smoke("benchmarks/train_throughput.py", "--levers", "--out", str(tmp_path / "l.json"))
    result = renders_like("benchmarks/results/levers-cpu.json", tmp_path / "l.json")
    rows = result["runs"]
    assert [row["lever"] for row in rows] == list(script(
        "benchmarks/train_throughput.py").SMOKE_LEVERS)
    assert rows[1]["processed_tokens"] > rows[0]["processed_tokens"]  # packing off pads


def test_train_throughput_plan_check_sets_predictions_beside_measurements(tmp_path):
    run_smoke("benchmarks/train_throughput.py", "--plan-check", "--out", str(tmp_path / "p.json"))
    result = renders_like("benchmarks/results/plan-cpu-2026-11-26.json", tmp_path / "p.json")
    assert len(result["runs"]) == 3
    for row in result["runs"]:
        assert row["predicted_peak_bytes"] > 0 and row["measured_peak_bytes"] > 0


def test_padded_growth_records_the_peak_after_every_step(tmp_path):
    run_smoke("benchmarks/padded_growth.py", "--out", str(tmp_path / "growth.json"))
    result = json.loads((tmp_path / "growth.json").read_text())  # a note, not published
    assert_finite(result)
    assert [row["step"] for row in result["per_step"]] == [1, 2]
    assert result["predicted_live_bytes"] < result["predicted_peak_bytes"]
    assert result["final_peak_rss_bytes"] >= result["per_step"][-1]["peak_rss_bytes"] > 0


def test_training_efficiency_solves_for_the_planners_constant(tmp_path):
    run_smoke("benchmarks/training_efficiency.py", "--out", str(tmp_path / "efficiency.json"))
    result = json.loads((tmp_path / "efficiency.json").read_text())  # a note, not published
    assert_finite(result)
    assert len(result["runs"]) == 1 and result["median_implied_efficiency"] > 0
    assert result["constant"] == speed.TRAINING_EFFICIENCY["cpu"]


def test_generation_times_batched_against_one_call_per_example(tmp_path):
    run_smoke("benchmarks/generation.py", "--out", str(tmp_path / "generation.json"))
    result = renders_like("benchmarks/results/generation-cpu.json", tmp_path / "generation.json")
    assert result["prompts"] == 4 and result["speedup"] > 0
    assert result["identical_outputs"].endswith("/4")


def test_train_memory_reads_each_rows_manifest(tmp_path):
    run_smoke("benchmarks/train_memory.py", "--out", str(tmp_path / "memory.json"))
    result = renders_like("benchmarks/results/memory-cpu.json", tmp_path / "memory.json")
    assert [run["row"] for run in result["runs"]] == ["before", "default"]
    assert all(run["measured_peak_rss_bytes"] > 0 and run["steps"] == 2
               for run in result["runs"])


def test_llama_cpp_check_runs_tunelabs_gguf_in_llama_cpp(tmp_path):
    checker = script("benchmarks/llama_cpp_check.py")
    run_smoke("benchmarks/llama_cpp_check.py", "--out", str(tmp_path / "llama-cpp.json"))
    result = json.loads((tmp_path / "llama-cpp.json").read_text())
    quant = result["models"][0]["quants"]["f16"]
    if checker.cached_build() is None:  # no llama.cpp to run: everything up to it ran
        assert result["llama_cpp"] is None and quant["llama_cpp"].startswith("skipped")
        assert all(check["passed"] for check in result["models"][0]["export_checks"][0]
                   ["checks"])
        return
    renders_like("benchmarks/results/llama-cpp-cpu.json", tmp_path / "llama-cpp.json")
    assert quant["summary"]["tokenization_identical"] == "2/2"
    assert all(row["llama_cpp_equals_transformers"] for row in quant["chat_template"])


def test_serve_load_drives_two_adapters_without_errors(tmp_path):
    run_smoke("benchmarks/serve_load.py", "--out", str(tmp_path / "serve.json"))
    result = renders_like("benchmarks/results/serve-load.json", tmp_path / "serve.json")
    assert result["under_load"]["requests"] > 0 and result["under_load"]["errors"] == 0
    assert set(result["per_model"]) == {"smoke-a", "smoke-b"}


def test_serve_load_measures_both_engines_on_the_same_runs(tmp_path):
    from tunelab.ship.llamacpp import find_server

    if find_server() is None:
        pytest.skip("no llama-server on PATH or in tunelab's cache; build one: "
                    "python benchmarks/llama_cpp_check.py --build-only (~15 min)")
    run_smoke("benchmarks/serve_load.py", "--engine", "both", "--out",
              str(tmp_path / "engines.json"))
    result = renders_like("benchmarks/results/serve-engines.json", tmp_path / "engines.json")
    assert set(result["engines"]) == {"own", "llama.cpp"}
    for measured in result["engines"].values():
        assert measured["under_load"]["requests"] > 0 and measured["under_load"]["errors"] == 0
        assert set(measured["per_model"]) == {"smoke-a", "smoke-b"}
    assert result["comparison"]["greedy_compared"] == 4  # 2 prompts x 2 runs


def test_ship_checks_export_every_way_and_serve(tmp_path):
    run_smoke("benchmarks/ship_checks.py", "--out", str(tmp_path / "ship.json"))
    result = renders_like("benchmarks/results/serve-ship-checks.json", tmp_path / "ship.json")
    assert [e["export"] for e in result["exports"]] == ["merged", "gguf-f16", "gguf-q8_0",
                                                         "adapter"]
    assert result["serve"]["completions"][0]["model"] == "smoke-sentiment"


@pytest.mark.slow
def test_distributed_loss_two_ranks_match_one_process(tmp_path):
    run_smoke("benchmarks/distributed_loss.py", "--out", str(tmp_path / "distributed.json"))
    result = renders_like("examples/sentiment/results/distributed.json",
                          tmp_path / "distributed.json")
    assert result["complete"] and result["comparison"]["dropout_0"]["within_tolerance"]


# --- scripts/ --------------------------------------------------------------------------------


def test_architecture_matrix_records_its_cells(tmp_path):
    run_smoke("scripts/architecture_matrix.py", "--out", str(tmp_path / "matrix.json"))
    result = renders_like("docs/results/architectures.json", tmp_path / "matrix.json",
                          except_kinds={"architectures_headline": "names the families that "
                                        "passed every column; the smoke runs 3 checks"})
    assert result["pytest_exit"] == 0
    assert {column: [c["outcome"] for c in checks]
            for column, checks in result["cells"]["llama"].items()} == {
        "train": ["passed"], "plan": ["passed", "passed"]}


def test_run_example_trains_and_evaluates_as_the_readme_says(tmp_path):
    run_smoke("scripts/run_example.py", "examples/sentiment", "--out", str(tmp_path))
    result = renders_like("examples/sentiment/results/result.json", tmp_path / "result.json")
    assert result["manifest"]["steps"] == 2 and result["eval"]["n"] == 8
    assert {path.name for path in tmp_path.iterdir()} >= {"manifest.json", "metrics.jsonl",
                                                           "train.log", "eval.log", "eval"}


def test_run_assess_keeps_the_assessment_with_a_served_endpoint_arm(tmp_path):
    run_smoke("scripts/run_assess.py", "examples/sentiment", "--serve", "tiny", "--out",
              str(tmp_path))
    result = renders_like("examples/sentiment/results/assess/result.json",
                          tmp_path / "result.json")
    assess = json.loads((tmp_path / "assess.json").read_text())
    arms = {arm["name"]: arm for arm in assess["baselines"]["arms"]}
    assert set(arms) == {"base 0-shot", "served 0-shot"}
    assert arms["served 0-shot"]["usage"]["requests"] > 0  # asked the server, not the cache
    assert [p["seeds"]["n_seeds"] for p in assess["learning_curve"]] == [2, 1]
    scores = json.loads((tmp_path / "curve-scores.json").read_text())
    assert len(scores["fractions"][0]["seeds"]) == 2
    assert result["wall_s"] > 0 and not result["measured_alone"]


def test_multitask_experiment_compares_the_adapters_per_task(tmp_path):
    run_smoke("scripts/multitask_experiment.py", "--out", str(tmp_path / "multitask.json"))
    result = renders_like("examples/multitask/results/result.json", tmp_path / "multitask.json")
    assert set(result["tasks"]) == {"sentiment", "ner", "translation"}
    assert result["cost"]["multitask"]["steps"] == sum(
        result["cost"][task]["steps"] for task in result["tasks"])


@pytest.mark.slow
def test_run_sweep_keeps_the_trials_and_the_final_word(tmp_path):
    run_smoke("scripts/run_sweep.py", "examples/sentiment/sweep.yaml", "--out", str(tmp_path))
    result = renders_like("examples/sentiment/results/sweep/result.json",
                          tmp_path / "result.json")
    entry = result["sweeps"]["sentiment-sweep"]
    assert len(entry["trials"]) == 2 and entry["final"]["test"]["n"] == 8
    assert (tmp_path / "sentiment-sweep" / "compare.html").is_file()


@pytest.mark.slow
def test_crash_drills_resume_bit_identical(tmp_path):
    run_smoke("scripts/crash_drills.py", "--out", str(tmp_path / "drills.json"))
    result = renders_like("benchmarks/results/crash-drills-cpu.json", tmp_path / "drills.json")
    kills = result["sigkill"]["summary"]
    assert kills["resumed_bit_identical"] == kills["killed"] == 1
    assert [row["passed"] for row in result["damaged_checkpoint"]] == [True]


def test_screenshot_report_writes_a_png(tmp_path):
    run_smoke("scripts/screenshot_report.py", str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_run_objectives_compares_every_stage_with_the_base_and_with_sft(tmp_path):
    published = script("scripts/published.py")
    for example, later in (("qa/preference", ["dpo", "dpo-after-sft", "simpo", "kto"]),
                           ("arithmetic", ["grpo"])):
        out = tmp_path / example.replace("/", "-")
        run_smoke("scripts/run_objectives.py", f"examples/{example}", "--out", str(out))
        result = json.loads((out / "result.json").read_text())
        assert all(result.get(key) for key in published.PROVENANCE_KEYS)
        # the documents' renderers (docs/objectives.md, README) take the smoke result too
        table, headline = published.render_objectives(result), published.headline_objectives(result)
        assert all(f"`{name}`" in table and f"{name} " in headline for name in ["sft", *later])
        assert_finite(result)
        assert list(result["stages"]) == ["sft", *later]
        comparisons = result["comparisons"]
        for name in ["sft", *later]:
            assert result["stages"][name]["manifest"]["steps"] == 2
            assert (out / name / "eval" / "test.json").is_file()
            assert set(comparisons[f"{name} vs base"]["exact_match"]) >= {
                "value", "ci", "p_value", "p_text"}
        for name in later:
            assert comparisons[f"{name} vs sft"]["exact_match"]["n"] == 8
        grounded = example == "qa/preference"
        assert ("hallucination_rate" in comparisons["sft vs base"]) == grounded
    assert result["stages"]["grpo"]["preflight"]["prompts"] == 2
    assert "val_reward" in result["stages"]["grpo"]["validation"]["after"]


@pytest.mark.slow  # a tiny training, then `tunelab serve` started as a process (~30 s)
def test_serve_tool_call_asks_the_served_run_through_the_openai_client(tmp_path):
    run_smoke("scripts/serve_tool_call.py", "--out", str(tmp_path / "serve.json"))
    result = renders_like("examples/tools/results/serve.json", tmp_path / "serve.json")
    assert result["n_requests"] == 3
    for model in ("tuned", "base"):
        for way in ("non_streamed", "streamed"):
            measured = result[model][way]
            assert measured["n"] == 3 and sum(measured["finish_reasons"].values()) == 3
            assert 0 <= measured["right_call"] <= 1
