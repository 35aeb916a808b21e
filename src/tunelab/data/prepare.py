"""The data as a run sees it: read, split off validation, tokenize.

``prepare_data`` is the one place where a config's data becomes token ids. Training, the
planner and the planner's calibration run all call it, so the counts a plan predicts from are
the ones the run trains on. Its two steps are public for the commands that need the same
examples without a run: ``read_splits`` (the examples of each split, validation split off as the
run does; ``tunelab data check``) and ``tokenize_as_trained`` (the data section's template,
truncation and loss mask; ``tunelab data check`` measures untruncated lengths with it).

Evaluation reads through ``read_eval_splits``: the same splits, each file read once, with the
raw records beside their examples (index for index), so that a prompt variant re-templates the
records already read (``with_prompt``) and no split is recovered by matching file:line.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain, zip_longest

from tunelab.config import DataConfig
from tunelab.data.formats import Example, to_examples
from tunelab.data.mixture import task_data
from tunelab.data.readers import read_records
from tunelab.data.records import Record
from tunelab.data.tokenize import TokenizedExample, tokenize_examples
from tunelab.errors import ConfigError, DataError


@dataclass
class TokenizedData:
    """Tokenized train and validation examples, what was left out, and a summary for the run."""

    train: list[TokenizedExample]  # only examples with at least one target token
    validation: list[TokenizedExample]  # likewise
    validation_examples: list[Example]  # before tokenizing, for the before/after samples
    skipped: list[TokenizedExample]  # training examples with no target token left
    report: dict
    # Multitask (data.tasks): the task of each train / validation example; empty otherwise.
    train_tasks: list[str] = field(default_factory=list)
    validation_tasks: list[str] = field(default_factory=list)


def split_validation(n_examples: int, *, fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices of ``n_examples``: a seeded ``fraction`` held out, each in
    file order."""
    order = list(range(n_examples))
    random.Random(seed).shuffle(order)
    held_out = set(order[:max(1, round(len(order) * fraction))])
    return [i for i in range(n_examples) if i not in held_out], sorted(held_out)


def as_examples(records: list[Record], data: DataConfig, *,
                prompt: str | None = None) -> list[Example]:
    """``records`` normalised as the run reads them (the data section's format and templates),
    index for index; ``prompt`` in place of ``data.prompt`` (an evaluation prompt variant)."""
    return to_examples(records, data.format, prompt=data.prompt if prompt is None else prompt,
                       completion=data.completion)


@dataclass
class Split:
    """One split's raw records and the examples they normalise to, index for index."""

    records: list[Record]
    examples: list[Example]

    def pick(self, indices: Iterable[int]) -> Split:
        """The records and examples at ``indices``, in that order."""
        chosen = list(indices)
        return Split([self.records[i] for i in chosen], [self.examples[i] for i in chosen])


def read_split(paths: list[str], data: DataConfig) -> Split:
    """The files' records and the examples they normalise to (errors name file:line)."""
    return _read(paths, data)


def _read(paths: list[str], data: DataConfig) -> Split:
    """The files' records and examples (errors name file:line), one file after another."""
    split = Split([], [])
    for path in paths:
        records = read_records(path)
        split.records.extend(records)
        split.examples.extend(as_examples(records, data))
    return split


def _run_splits(data: DataConfig, *, seed: int) -> tuple[Split, Split]:
    """The run's train and validation: the validation files, or, when there are none,
    ``data.validation_split`` of train held out with the run's seed."""
    train, validation = _read(data.train, data), _read(data.validation, data)
    if not validation.records and data.validation_split > 0:
        kept, held_out = split_validation(len(train.records), fraction=data.validation_split,
                                          seed=seed)
        train, validation = train.pick(kept), train.pick(held_out)
    return train, validation


def read_run_splits(data: DataConfig, *, seed: int) -> tuple[Split, Split]:
    """The run's train and validation splits, records beside their examples (a reinforcement
    run's prompts keep their records' columns for the reward functions)."""
    return _run_splits(data, seed=seed)


@dataclass
class Splits:
    """A config's examples per split, read and normalised, before tokenizing."""

    train: list[Example]
    validation: list[Example]  # data.validation, or split off train by data.validation_split
    test: list[Example]  # read only when asked for (training never reads it)


def read_splits(data: DataConfig, *, seed: int, test: bool = False) -> Splits:
    """Read and normalise the data files (errors name file:line); split off validation data
    when there is no validation file, with the run's seed, exactly as training does."""
    train, validation = _run_splits(data, seed=seed)
    return Splits(train.examples, validation.examples,
                  _read(data.test, data).examples if test else [])


@dataclass
class EvalSplits:
    """A config's data as evaluation reads it, each file read once."""

    evaluated: Split  # the split evaluated (test or validation), its first max_examples
    train: Split  # the run's train split: the few-shot demonstrations, never a held-out record
    validation: Split  # the run's validation split (whole, unlike ``evaluated``)


def read_eval_splits(data: DataConfig, *, split: str, seed: int,
                     max_examples: int | None = None) -> EvalSplits:
    """The run's train and validation splits (as ``read_splits``) and the ``split`` evaluated:
    the test files, or the run's own validation (the files, or the records held out of train).

    Raises ConfigError when the config has no such split.
    """
    if (split == "test" and not data.test) or (
            split == "validation" and not data.validation and data.validation_split <= 0):
        raise ConfigError(f"eval.split is {split!r} but data.{split} is empty",
                          where=f"data.{split}",
                          fix=f"add data.{split}: <file>, or set eval.split")
    train, validation = _run_splits(data, seed=seed)
    evaluated = _read(data.test, data) if split == "test" else validation
    if max_examples:
        evaluated = Split(evaluated.records[:max_examples], evaluated.examples[:max_examples])
    return EvalSplits(evaluated, train, validation)


def with_prompt(split: Split, data: DataConfig, prompt: str | None) -> list[Example]:
    """The split's examples under ``prompt`` (an evaluation prompt variant): its records
    templated again, or the examples already read when ``prompt`` is the data section's own."""
    if prompt == data.prompt:
        return split.examples
    return as_examples(split.records, data, prompt=prompt)


def tokenize_as_trained(examples: list[Example], tokenizer, data: DataConfig, *,
                        max_seq_len: int) -> list[TokenizedExample]:
    """``examples`` as a run tokenizes them: the data section's chat template, loss mask
    (``train_on``) and ``truncation`` at ``max_seq_len`` (10**9: untruncated lengths)."""
    return tokenize_examples(examples, tokenizer, max_seq_len=max_seq_len,
                             train_on=data.train_on, chat_template=data.chat_template,
                             chat_template_kwargs=data.chat_template_kwargs,
                             truncation=data.truncation)


def prepare_data(data: DataConfig, tokenizer, *, max_seq_len: int, seed: int) -> TokenizedData:
    """Read and normalise the data files, split off validation data, tokenize both in batches.

    Raises DataError when no training example keeps a target token to learn from. A multitask
    config's tasks are each prepared so, then joined task after task.
    """
    if data.tasks:
        return _prepare_tasks(data, tokenizer, max_seq_len=max_seq_len, seed=seed)
    splits = read_splits(data, seed=seed)
    train_examples, validation_examples = splits.train, splits.validation
    train_tokens, validation_tokens = (
        tokenize_as_trained(examples, tokenizer, data, max_seq_len=max_seq_len)
        for examples in (train_examples, validation_examples))
    report = {
        "format": train_examples[0].format if train_examples else None,
        "train_examples": len(train_tokens), "validation_examples": len(validation_tokens),
        "train_tokens": sum(len(ex.input_ids) for ex in train_tokens),
        "train_target_tokens": sum(ex.n_target_tokens for ex in train_tokens),
        "truncated": sum(ex.truncated for ex in train_tokens),
    }
    kept = [ex for ex in train_tokens if ex.n_target_tokens > 0]
    if not kept:
        raise DataError("no training example has a target token to learn from",
                        where=", ".join(data.train),
                        fix="check data.prompt/data.completion and train.max_seq_len")
    return TokenizedData(kept, [ex for ex in validation_tokens if ex.n_target_tokens > 0],
                         validation_examples, [ex for ex in train_tokens
                                               if ex.n_target_tokens == 0], report)


def _prepare_tasks(data: DataConfig, tokenizer, *, max_seq_len: int, seed: int) -> TokenizedData:
    """Every task prepared on its own files and templates, joined; each example's task kept."""
    parts = {task.name: prepare_data(task_data(data, task), tokenizer, max_seq_len=max_seq_len,
                                     seed=seed) for task in data.tasks}
    joined = lambda pick: list(chain.from_iterable(pick(part) for part in parts.values()))  # noqa: E731
    tags = lambda pick: [name for name, part in parts.items()  # noqa: E731
                         for _ in pick(part)]
    # Before/after samples: the tasks' validation examples taken in turn, so each task shows.
    samples = [ex for group in zip_longest(*(part.validation_examples for part in
                                             parts.values())) for ex in group if ex is not None]
    report = {key: sum(part.report[key] for part in parts.values()) for key in
              ("train_examples", "validation_examples", "train_tokens", "train_target_tokens",
               "truncated")}
    report.update(format="multitask", tasks={name: part.report for name, part in parts.items()})
    return TokenizedData(joined(lambda part: part.train), joined(lambda part: part.validation),
                         samples, joined(lambda part: part.skipped), report,
                         train_tasks=tags(lambda part: part.train),
                         validation_tasks=tags(lambda part: part.validation))
