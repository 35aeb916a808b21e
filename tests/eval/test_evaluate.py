"""Evaluation end to end on the tiny model: label scoring, base vs tuned, variants, few-shot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.data.formats import Record
from tunelab.eval.evaluate import build_prompts, evaluate
from tunelab.eval.generate import score_continuations
from tunelab.model.load import load_model, load_tokenizer
from tunelab.train.loop import train

sys.path.insert(0, str(Path(__file__).parent.parent / "train"))
from test_loop import write_reviews  # noqa: E402


def reference_score(model, tokenizer, prompt: str, option: str) -> float:
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    option_ids = tokenizer(option, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(sum(logp[p, ids[0, p + 1]] for p in positions))


def test_label_scores_equal_one_forward_per_pair(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    prompts = ["Review: the movie was good\nSentiment:", "Review: bad\nSentiment:", "fine"]
    options = [" positive", " negative", " not sure at all"]
    scores = score_continuations(model, tokenizer, prompts, options, batch_tokens=40)
    for i, prompt in enumerate(prompts):
        for j, option in enumerate(options):
            assert scores[i, j].item() == pytest.approx(
                reference_score(model, tokenizer, prompt, option), abs=1e-4)


def config(tmp_path: Path, model_dir: str, **eval_overrides) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    eval_cfg = {"task": "classification", "labels": ["negative", "positive"],
                "prompt_variants": ["Review: {text}\nSentiment:", "{text}\nSentiment:"],
                "bootstrap": 200}
    eval_cfg.update(eval_overrides)
    return config_from_dict({
        "name": "reviews", "output_dir": str(tmp_path / "runs"), "model": {"path": model_dir},
        "method": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": write_reviews(tmp_path / "train.jsonl", 160, 0),
                 "validation": write_reviews(tmp_path / "valid.jsonl", 20, 1),
                 "test": write_reviews(tmp_path / "test.jsonl", 60, 2),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"epochs": 3, "lr": 1e-2, "batch_tokens": 256, "max_seq_len": 64,
                  "samples": 0},
        "eval": eval_cfg,
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = config(tmp, tiny_model_dir)
    result = train(cfg, console=Console(quiet=True))
    return cfg, result.run_dir


def test_base_vs_tuned_classification_writes_the_eval_file(trained):
    cfg, run_dir = trained
    result = evaluate(cfg, run_dir=run_dir, console=Console(quiet=True))
    saved = json.loads((run_dir / "eval" / "test.json").read_text())
    assert saved["n"] == 60 and saved["task"] == "classification"
    base, tuned = saved["models"]["base"], saved["models"]["tuned"]
    assert tuned["metrics"]["accuracy"]["value"] >= 0.9
    assert tuned["metrics"]["accuracy"]["value"] > base["metrics"]["accuracy"]["value"]
    low, high = tuned["metrics"]["accuracy"]["ci"]
    assert low <= tuned["metrics"]["accuracy"]["value"] <= high
    assert len(tuned["variants"]) == 2 and tuned["sensitivity"]["accuracy"]["n_variants"] == 2
    assert sum(map(sum, tuned["confusion"]["matrix"])) == 60
    comparison = result["comparison"]["accuracy"]
    assert comparison["test"] == "mcnemar" and comparison["delta"] > 0
    assert len(tuned["predictions"]) == 60 and "input" in tuned["predictions"][0]


def test_generation_mode_parses_and_counts_failures(trained):
    cfg, run_dir = trained
    cfg.eval.predict = "generate"
    cfg.eval.max_new_tokens = 3
    cfg.eval.stop = ["\n"]
    result = evaluate(cfg, run_dir=run_dir, base=False, console=Console(quiet=True))
    tuned = result["models"]["tuned"]
    assert "base" not in result["models"]
    failures = tuned["parse_failures"]["count"]
    assert 0 <= failures <= 60 and tuned["parse_failures"]["rate"] == failures / 60
    assert tuned["metrics"]["accuracy"]["value"] >= 0.8


def test_few_shot_prompts_exclude_the_example_itself():
    pool = [Record({"text": f"text {i}", "label": "a"}, "train.jsonl", i + 1) for i in range(6)]
    prompts = build_prompts(pool[:3], "Q: {text}\nA:", " {label}", shots=2, pool=pool, seed=0)
    assert prompts == build_prompts(pool[:3], "Q: {text}\nA:", " {label}", shots=2, pool=pool,
                                    seed=0)
    for index, prompt in enumerate(prompts):
        blocks = prompt.split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == f"Q: text {index}\nA:"
        assert f"Q: text {index}\nA: a" not in blocks[:-1]


GENERATIVE = {
    "ner": ({"text": "Ada met Bob in Paris", "target": "PERSON: Ada\nPERSON: Bob\nGPE: Paris"},
            "Text: {text}\nEntities:\n", "{target}",
            {"entity_types": ["PERSON", "GPE"], "context": "{text}"}),
    "qa": ({"context": "the movie was good", "question": "How was it?", "answer": "good"},
           "Context: {context}\nQuestion: {question}\nAnswer:", " {answer}",
           {"context": "{context}"}),
    "translation": ({"en": "the movie was good", "fr": "le film était bon"},
                    "English: {en}\nFrench:", " {fr}", {}),
    "summarisation": ({"document": "the movie was good and fun and long", "summary": "good"},
                      "{document}\nSummary:", " {summary}", {}),
}


@pytest.mark.parametrize("task", sorted(GENERATIVE))
def test_every_generative_task_runs_end_to_end(task, tmp_path, tiny_model_dir):
    record, prompt, completion, options = GENERATIVE[task]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(record) for _ in range(6)) + "\n")
    cfg = config_from_dict({
        "name": task, "output_dir": str(tmp_path / "runs"), "model": {"path": tiny_model_dir},
        "data": {"train": str(data), "test": str(data), "prompt": prompt,
                 "completion": completion},
        "eval": {"task": task, "max_new_tokens": 4, "bootstrap": 100,
                 "prompt_variants": [prompt, "Again: " + prompt], **options},
    })
    run_dir = tmp_path / "runs" / task
    run_dir.mkdir(parents=True)
    result = evaluate(cfg, run_dir=run_dir, base=True, tuned=False, console=Console(quiet=True))
    outcome = result["models"]["base"]
    primary = outcome["metrics"][result["primary_metric"]]
    assert primary["n"] == 6 and primary["ci"][0] <= primary["value"] <= primary["ci"][1]
    assert outcome["sensitivity"][result["primary_metric"]]["n_variants"] == 2
    assert 0 <= outcome["parse_failures"]["rate"] <= 1
    assert len(outcome["predictions"]) == 6
    if "context" in options:
        assert 0 <= outcome["hallucination"]["rate"] <= 1
    saved = json.loads((run_dir / "eval" / "test.json").read_text())
    assert saved["task"] == task
