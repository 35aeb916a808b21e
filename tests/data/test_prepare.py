"""``data/prepare.py`` reads a config's splits once, for training and for evaluation alike: the
validation split held out of train with the run's seed, records beside their examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import DataConfig
from tunelab.data import prepare
from tunelab.data.formats import example_prompt
from tunelab.data.prepare import read_eval_splits, read_splits, split_validation, with_prompt
from tunelab.errors import ConfigError


def _reviews(path: Path, kind: str, n: int) -> str:
    path.write_text("".join(json.dumps({"text": f"{kind} {i}", "label": "ab"[i % 2]}) + "\n"
                            for i in range(n)))
    return str(path)


def _data(tmp_path: Path, **overrides) -> DataConfig:
    settings = {"train": [_reviews(tmp_path / "train.jsonl", "train", 20)],
                "test": [_reviews(tmp_path / "test.jsonl", "test", 8)],
                "validation_split": 0.25, "prompt": "Review: {text}\nLabel:",
                "completion": " {label}"}
    return DataConfig(**{**settings, **overrides})


def test_split_validation_holds_out_a_seeded_fraction_in_file_order():
    kept, held_out = split_validation(20, fraction=0.25, seed=3)
    assert len(held_out) == 5 and sorted(kept + held_out) == list(range(20))
    assert held_out == sorted(held_out) and kept == sorted(kept)
    assert split_validation(20, fraction=0.25, seed=3) == (kept, held_out)
    assert split_validation(20, fraction=0.25, seed=4) != (kept, held_out)


def test_eval_splits_are_the_runs_splits_with_their_records(tmp_path):
    data = _data(tmp_path)
    run = read_splits(data, seed=3, test=True)
    splits = read_eval_splits(data, split="test", seed=3)
    assert splits.train.examples == run.train and splits.validation.examples == run.validation
    assert splits.evaluated.examples == run.test
    for split in (splits.train, splits.validation, splits.evaluated):  # index for index
        assert [r.where for r in split.records] == [e.where for e in split.examples]
    held_out = read_eval_splits(data, split="validation", seed=3, max_examples=3)
    assert held_out.evaluated.examples == run.validation[:3]


def test_each_file_is_read_once(tmp_path, monkeypatch):
    data = _data(tmp_path)
    reads = []
    original = prepare.read_records
    monkeypatch.setattr(prepare, "read_records",
                        lambda path: reads.append(Path(path).name) or original(path))
    read_eval_splits(data, split="test", seed=3)
    assert sorted(reads) == ["test.jsonl", "train.jsonl"]


def test_a_prompt_variant_templates_the_records_already_read(tmp_path):
    data = _data(tmp_path)
    splits = read_eval_splits(data, split="test", seed=3)
    (tmp_path / "test.jsonl").unlink()  # the variant needs no file
    assert with_prompt(splits.evaluated, data, data.prompt) is splits.evaluated.examples
    variant = with_prompt(splits.evaluated, data, "{text}?")
    assert [example_prompt(e) for e in variant] == [f"test {i}?" for i in range(8)]
    assert [e.label for e in variant] == [e.label for e in splits.evaluated.examples]


@pytest.mark.parametrize("split, overrides", [("test", {"test": []}),
                                              ("validation", {"validation_split": 0.0})])
def test_a_missing_evaluation_split_is_refused(tmp_path, split, overrides):
    with pytest.raises(ConfigError, match=f"data.{split}"):
        read_eval_splits(_data(tmp_path, **overrides), split=split, seed=3)
