"""Chat and instruction data evaluate as they were trained; generation and tool_call kinds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.data.formats import to_examples
from tunelab.data.readers import read_records
from tunelab.data.tokenize import tokenize_examples
from tunelab.errors import ConfigError
from tunelab.eval.evaluate import evaluate
from tunelab.eval.generate import score_continuations
from tunelab.eval.similarity import semantic_similarity
from tunelab.eval.tasks import Generation, ToolCall
from tunelab.model.load import load_model, load_tokenizer
from tunelab.train.loop import train

WORDS = {"positive": ["good", "great", "fun"], "negative": ["bad", "dull", "awful"]}


def chat_reviews(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            messages = [{"role": "system", "content": "Answer positive or negative."},
                        {"role": "user", "content": f"Review: the movie was "
                                                    f"{rng.choice(WORDS[label])}"},
                        {"role": "assistant", "content": label}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def instructions(path: Path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            handle.write(json.dumps({"instruction": "Say how the review feels.",
                                     "input": f"the movie was {rng.choice(WORDS[label])}",
                                     "output": f"It is {label}."}) + "\n")
    return str(path)


def make_config(tmp_path: Path, model_dir: str, data: dict, **eval_cfg):
    return config_from_dict({
        "name": "formats", "output_dir": str(tmp_path / "runs"), "model": {"path": model_dir},
        "method": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": data, "train": {"max_steps": 2, "lr": 1e-2, "batch_tokens": 256,
                                "max_seq_len": 64, "samples": 1, "max_new_tokens": 3},
        "eval": {"bootstrap": 100, **eval_cfg},
    })


def test_chat_classification_scores_labels_after_the_training_prompt(tmp_path, tiny_model_dir):
    test = chat_reviews(tmp_path / "test.jsonl", 12, 2)
    cfg = make_config(tmp_path, tiny_model_dir,
                      {"train": chat_reviews(tmp_path / "train.jsonl", 8, 1), "test": test},
                      task="classification", labels=["negative", "positive"])
    run_dir = tmp_path / "runs" / "formats"
    run_dir.mkdir(parents=True)
    result = evaluate(cfg, run_dir=run_dir, base=True, tuned=False, console=Console(quiet=True))
    base = result.models["base"]
    assert result.n == 12 and base.metrics["accuracy"].n == 12
    assert base.predictions[0].input.endswith("<|im_start|>assistant\n")
    # The same choice as scoring each label after the training ids before the reply.
    model, tokenizer = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    prompts = [ex.input_ids[:ex.n_prompt_tokens] for ex in tokenize_examples(
        to_examples(read_records(test)), tokenizer, max_seq_len=64)]
    scores = score_continuations(model, tokenizer, prompts, ["negative", "positive"])
    expected = [["negative", "positive"][i] for i in scores.argmax(1).tolist()]
    assert [p.prediction for p in base.predictions] == expected
    assert [p.gold for p in base.predictions] == [
        json.loads(line)["messages"][-1]["content"] for line in open(test)]


def test_instruction_data_trains_and_evaluates_as_generation(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir,
                      {"train": instructions(tmp_path / "train.jsonl", 16, 1),
                       "validation": instructions(tmp_path / "valid.jsonl", 2, 3),
                       "test": instructions(tmp_path / "test.jsonl", 6, 2)},
                      task="generation", max_new_tokens=4)
    run = train(cfg, console=Console(quiet=True))
    result = evaluate(cfg, run_dir=run.run_dir, console=Console(quiet=True))
    names = {"rouge_l", "exact_match", "token_f1", "chrf", "semantic_similarity"}
    for which in ("base", "tuned"):
        outcome = result.models[which]
        assert set(outcome.metrics) == names
        assert outcome.detail("output_length")["reference_mean_words"] == 3.0
        assert outcome.predictions[0].input.endswith("### Response:\n")
        assert outcome.predictions[0].gold in ("It is positive.", "It is negative.")
    for name in names:  # every metric gets its paired comparison
        entry = result.comparison[name]
        assert entry.test == "paired bootstrap" and entry.ci[0] <= entry.ci[1]
    assert run.samples and run.samples[0]["target"].startswith("It is ")


def test_prompt_variants_need_template_data(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir,
                      {"train": chat_reviews(tmp_path / "train.jsonl", 2, 1),
                       "test": chat_reviews(tmp_path / "test.jsonl", 2, 2)},
                      task="generation", prompt_variants=["{text}"])
    with pytest.raises(ConfigError, match="eval.prompt_variants"):
        evaluate(cfg, run_dir=tmp_path, base=True, tuned=False, console=Console(quiet=True))


def test_generation_metrics_on_known_outputs():
    task = Generation(n_resamples=200)
    golds = ["The cat sat on the mat.", "Paris is the capital.", "Yes"]
    outputs = ["the cat sat on the mat", "The capital is Paris.", "No, never"]
    scored = task.score(golds, outputs, [None] * 3)
    metrics = {name: metric["value"] for name, metric in scored.metrics.items()}
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["token_f1"] == pytest.approx((1 + 1 + 0) / 3)  # same bag of words
    assert metrics["rouge_l"] == pytest.approx((1 + 2 * (2 / 4 * 2 / 4) / (2 / 4 + 2 / 4)) / 3)
    assert 0 < metrics["chrf"] < 100
    similarity = scored.paired_others["semantic_similarity"]
    assert similarity[0] > 0.95 and similarity[1] > 0.8 and similarity[2] < similarity[1]
    assert scored.extra["output_length"]["mean_words"] == pytest.approx((6 + 4 + 2) / 3)


def test_semantic_similarity_ranks_meaning_not_words():
    close, far = semantic_similarity(["A man is playing a guitar.", "A man is playing a guitar."],
                                     ["Someone plays an instrument.", "The stock market fell."])
    assert close > far + 0.3
    assert semantic_similarity(["same text"], ["same text"])[0] == pytest.approx(1.0, abs=1e-5)


def test_tool_call_task_matches_names_and_json_equal_arguments():
    task = ToolCall(n_resamples=200)
    gold = task.gold('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                     '"days": 2}}\n</tool_call>')
    outputs = ['<tool_call>\n{"name": "get_weather", "arguments": {"days": 2.0, '
               '"city": "Paris"}}\n</tool_call>',  # same call, keys reordered, 2.0 == 2
               '{"name": "get_weather", "parameters": {"city": "Lyon", "days": 2}}',
               "It will be sunny.",
               "<tool_call>\n{not json"]
    parsed = [task.parse(output) for output in outputs]
    assert [failed for _, failed in parsed] == [False, False, False, True]
    scored = task.score([gold] * 4, [calls for calls, _ in parsed], [None] * 4)
    assert scored.per_example == [1.0, 0.0, 0.0, 0.0]
    assert scored.metrics["name_match"]["value"] == pytest.approx(0.5)
    assert scored.extra["no_call"] == 2


def test_tool_call_chat_data_evaluates_end_to_end(tmp_path, tiny_model_dir):
    record = {"tools": [{"type": "function", "function": {"name": "get_weather"}}],
              "messages": [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "content": None, "tool_calls": [
                               {"type": "function", "function": {
                                   "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}]}
    data = tmp_path / "tools.jsonl"
    data.write_text((json.dumps(record) + "\n") * 3)
    cfg = make_config(tmp_path, tiny_model_dir, {"train": str(data), "test": str(data)},
                      task="tool_call", max_new_tokens=4)
    result = evaluate(cfg, run_dir=tmp_path, base=True, tuned=False, console=Console(quiet=True))
    outcome = result.models["base"]
    assert result.primary_metric == "exact_match" and outcome.metrics["exact_match"].n == 3
    assert "<tools>" in outcome.predictions[0].input
    assert json.loads(outcome.predictions[0].gold.replace("'", '"')) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}}]
