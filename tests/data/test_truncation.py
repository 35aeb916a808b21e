"""data.truncation: what each choice does to long examples, and what data check reports."""

from __future__ import annotations

import json

from rich.console import Console

from tunelab.data.check import check_data
from tunelab.data.formats import Example, Segment
from tunelab.data.tokenize import tokenize_examples, truncation_effects


def completion(prompt: str, target: str) -> Example:
    return Example("completion", "d.jsonl", 1,
                   segments=[Segment(prompt, False), Segment(target, True)], label=target)


def test_effects_count_the_examples_each_choice_changes(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [completion("ok", " fine"),  # fits
                completion("the movie was good " * 20, " positive"),  # long prompt
                completion("ok", " the movie was good" * 20)]  # long target
    tokenized = tokenize_examples(examples, tokenizer, max_seq_len=10**9)
    effects = truncation_effects(tokenized, 24)
    assert effects["longer"] == 2 and effects["drop"] == {"dropped": 2}
    assert effects["prompt"] == {"prompt_cut": 1, "target_cut": 1}
    assert effects["end"] == {"target_cut": 2, "target_lost": 1}
    # The counts say what tokenizing with each choice really does.
    for choice in ("prompt", "end", "drop"):
        cut = tokenize_examples(examples, tokenizer, max_seq_len=24, truncation=choice)
        lost = sum(a.n_target_tokens != b.n_target_tokens
                   for a, b in zip(cut, tokenized, strict=True))
        expected = {"prompt": effects["prompt"]["target_cut"], "end": effects["end"]["target_cut"],
                    "drop": effects["drop"]["dropped"]}[choice]
        assert lost == expected, choice


def test_data_check_reports_truncation_choices(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "ok", "completion": " fine"},
            {"prompt": "the movie was good " * 20, "completion": " positive"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "config.yaml"
    config.write_text(f"name: t\nmodel: {{path: {tiny_model_dir}}}\ndata: {{train: {data}, "
                      "truncation: drop}\ntrain: {max_seq_len: 24}\n")
    console = Console(record=True, width=200)
    report = check_data(config, console=console)
    assert report["truncation"]["setting"] == "drop" and report["truncation"]["longer"] == 1
    text = console.export_text()
    assert "1 training examples are longer than max_seq_len=24 (data.truncation is drop)" in text
    assert "prompt: cuts the prompt of 1 and keeps their whole target" in text
