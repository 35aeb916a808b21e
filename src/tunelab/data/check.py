"""``tunelab data check``: validate a config's data (or one file) and report on its quality."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.config import Config, DataConfig
from tunelab.data.formats import Example
from tunelab.data.mixture import data_rates, task_data, task_token_counts
from tunelab.data.preference import is_preference_record, read_preference_splits, tokenize_pairs
from tunelab.data.prepare import Splits, prepare_data, read_splits, tokenize_as_trained
from tunelab.data.quality import (
    preference_report,
    quality_report,
    render_preference_report,
    render_quality_report,
)
from tunelab.data.readers import read_records
from tunelab.data.tokenize import truncation_effects
from tunelab.errors import ModelError
from tunelab.objectives import OBJECTIVES, Objective


def check_data(source: str | Path | Config, *, max_seq_len: int | None = None,
               model: str | None = None, console: Console | None = None) -> dict:
    """Read and normalise every record (errors name file:line), then build the quality report.

    ``source`` is a config or its YAML file (its train, validation and test data, template and
    tokenizer; leakage is checked between every pair of splits) or a data file (format
    auto-detected; token lengths with ``model``'s tokenizer when given).
    A config's splits are the run's (``prepare.read_splits``: validation split off train with
    the run's seed when there is no validation file) and are tokenized as the run tokenizes
    them (``prepare.tokenize_as_trained``), untruncated, to show what ``max_seq_len`` cuts.
    A multitask config (``data.tasks``) is checked task by task, as each task is trained, and
    the report adds the mixture's planned token shares: ``{"tasks": {name: report},
    "mixture": ...}``. Preference data (a config whose method.objective is dpo, simpo or kto,
    or a file whose first record is a preference shape) adds ``preference``: the checks of
    ``quality.preference_report`` per split, the usual report being that of the chosen answers.
    """
    from tunelab.config import load_config

    console = console or Console()
    is_config = isinstance(source, Config) or Path(source).suffix in (".yaml", ".yml")
    if is_config:
        config = source if isinstance(source, Config) else load_config(source)
        data, seed = config.data, config.train.seed
        model = model or config.model.path
        max_seq_len = max_seq_len or config.train.max_seq_len
        objective = OBJECTIVES[config.method.objective]
    else:
        data, seed = DataConfig(train=[str(source)]), 0  # the defaults: no validation split
        objective = _file_objective(source)
    tokenizer = _tokenizer(model, console) if model else None
    if objective is not None and objective.preference:
        return _check_preference(data, objective, seed=seed, test=is_config,
                                 tokenizer=tokenizer, max_seq_len=max_seq_len, console=console)
    if data.tasks:
        return _check_tasks(data, seed=seed, tokenizer=tokenizer, max_seq_len=max_seq_len,
                            console=console)
    splits = read_splits(data, seed=seed, test=is_config)
    return _check_splits(splits, data, tokenizer=tokenizer, max_seq_len=max_seq_len,
                         console=console)


def _check_splits(splits: Splits, data: DataConfig, *, tokenizer, max_seq_len: int | None,
                  console: Console) -> dict:
    """The quality report of one data section's splits, drawn on the console."""
    examples = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    tokenized = None
    if tokenizer is not None:  # each split tokenized as the run does, untruncated
        tokenized = {split: tokenize_as_trained(items, tokenizer, data, max_seq_len=10**9)
                     for split, items in examples.items()}
    lengths = None
    if tokenized is not None:
        lengths = {split: [len(ex.input_ids) for ex in items] for split, items in tokenized.items()}
    report = quality_report(splits.train, splits.validation or None, splits.test or None,
                            token_lengths=lengths, max_seq_len=max_seq_len)
    report["warnings"] = _ignored_columns(splits.train) + report.get("warnings", [])
    if tokenized is not None and max_seq_len:
        report["truncation"] = {"setting": data.truncation,
                                **truncation_effects(tokenized["train"], max_seq_len)}
    render_quality_report(report, console)
    _render_truncation(report.get("truncation"), console)
    return report


def _file_objective(source: str | Path) -> Objective | None:
    """A data file's objective by its first record: pairs (dpo's) or unpaired (kto's)
    preference data, else None (ordinary examples)."""
    shape = is_preference_record(read_records(source)[0])
    if shape is None:
        return None
    wanted = "unpaired" if shape == "unpaired" else "pairs"
    return next(objective for objective in OBJECTIVES.values() if objective.data == wanted)


def _check_preference(data: DataConfig, objective: Objective, *, seed: int, test: bool,
                      tokenizer, max_seq_len: int | None, console: Console) -> dict:
    """The quality report of the chosen answers (duplicates; leakage of the prompts between
    splits) and the preference checks, each split tokenized as the run does, untruncated."""
    read = read_preference_splits(data, seed=seed, objective=objective, test=test)
    splits = {"train": read.train, "validation": read.validation, "test": read.test}
    pair_lengths: dict[str, list] = {}
    if tokenizer is not None:
        for split, examples in splits.items():
            pairs = tokenize_pairs(examples, tokenizer, data, max_seq_len=10**9)
            pair_lengths[split] = [(len(pair.chosen.input_ids), len(pair.rejected.input_ids)
                                    if pair.rejected is not None else None) for pair in pairs]
    # A pair is truncated when either side is: the longer side's length is the one that counts.
    lengths = ({split: [max(chosen, rejected or 0) for chosen, rejected in items]
                for split, items in pair_lengths.items()} if tokenizer is not None else None)
    if lengths is not None and len(read.test_examples) > len(read.test):
        lengths["test"] = [len(ex.input_ids) for ex in tokenize_as_trained(
            read.test_examples, tokenizer, data, max_seq_len=10**9)]
    chosen = {split: [example.chosen for example in examples]
              for split, examples in splits.items()}
    chosen["test"] = read.test_examples  # test files may be evaluation data, not pairs
    report = quality_report(chosen["train"], chosen["validation"] or None,
                            chosen["test"] or None, token_lengths=lengths,
                            max_seq_len=max_seq_len,
                            conflicting_targets=objective.data == "pairs")
    checks = {split: preference_report(examples, pair_lengths.get(split), split=split)
              for split, examples in splits.items() if examples}
    report["preference"] = {"data": objective.data, "shape": read.shape, "splits": checks}
    report["warnings"] += [warning for check in checks.values() for warning in check["warnings"]]
    render_preference_report(checks, console)
    render_quality_report(report, console)
    return report


def _check_tasks(data: DataConfig, *, seed: int, tokenizer, max_seq_len: int,
                 console: Console) -> dict:
    """Each task's report, its data read, split and tokenized as the run does for that task
    (``mixture.task_data``); then the token shares the mixture plans."""
    reports = {}
    for task in data.tasks:
        console.rule(f"task {task.name}")
        own = task_data(data, task)
        reports[task.name] = _check_splits(read_splits(own, seed=seed, test=True), own,
                                           tokenizer=tokenizer, max_seq_len=max_seq_len,
                                           console=console)
    if tokenizer is None:  # the shares are shares of tokens
        console.print("[yellow]warning:[/] no planned mixture without the model's tokenizer.")
        return {"tasks": reports, "mixture": None}
    mixture = planned_mixture(data, tokenizer, max_seq_len=max_seq_len, seed=seed)
    _render_mixture(mixture, console)
    return {"tasks": reports, "mixture": mixture}


def planned_mixture(data: DataConfig, tokenizer, *, max_seq_len: int, seed: int) -> dict:
    """Each task's training tokens as the run keeps them and the share of the training tokens
    ``data.mixing`` gives it: the rates the run's manifest records as ``mixture``.

    The run's own preparation (``prepare_data``: truncated at ``max_seq_len``, examples with no
    target left out) measures the tokens, so the shares are the run's, not an estimate.
    """
    prepared = prepare_data(data, tokenizer, max_seq_len=max_seq_len, seed=seed)
    lengths = [len(example.input_ids) for example in prepared.train]
    tokens = task_token_counts([range(len(lengths))], lengths, prepared.train_tasks)
    examples = task_token_counts([range(len(lengths))], [1] * len(lengths),
                                 prepared.train_tasks)
    return {"mixing": data.mixing, "max_seq_len": max_seq_len, "train_examples": examples,
            "train_tokens": tokens, "rates": data_rates(data, lengths, prepared.train_tasks)}


def _render_mixture(mixture: dict, console: Console) -> None:
    """Per task: what it holds and the share of the training tokens it will get."""
    total = sum(mixture["train_tokens"].values())
    table = Table(title=f"Mixture ({mixture['mixing']}): planned share of the training tokens")
    for column in ("task", "train examples", "train tokens", "share of the data",
                   "planned share"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, rate in mixture["rates"].items():
        tokens = mixture["train_tokens"][name]
        table.add_row(name, f"{mixture['train_examples'][name]:,}", f"{tokens:,}",
                      f"{tokens / max(1, total):.1%}", f"{rate:.1%}")
    console.print(table)


def _render_truncation(effects: dict | None, console: Console) -> None:
    """How many training examples each data.truncation choice changes, when any is too long."""
    if not effects or not effects["longer"]:
        return
    prompt, end = effects["prompt"], effects["end"]
    console.print(
        f"{effects['longer']:,} training examples are longer than max_seq_len="
        f"{effects['max_seq_len']} (data.truncation is {effects['setting']}). prompt: cuts the "
        f"prompt of {prompt['prompt_cut']:,} and keeps their whole target"
        + (f"; {prompt['target_cut']:,} have a target longer than max_seq_len by itself, which "
           "loses its end" if prompt["target_cut"] else "")
        + f". drop: leaves out {effects['drop']['dropped']:,}. end: cuts the target of "
        f"{end['target_cut']:,} ({end['target_lost']:,} lose all of it).")


def _tokenizer(model: str, console: Console):
    """The model's tokenizer, or None (with a warning) when it cannot be loaded."""
    from tunelab.model.load import load_tokenizer

    try:
        return load_tokenizer(model)
    except ModelError as error:
        console.print(f"[yellow]warning:[/] no token lengths: {error.render()}")
        return None


def _ignored_columns(examples: list[Example]) -> list[str]:
    """Plain-text records with a label-like column: the label would be silently ignored."""
    text_examples = [ex for ex in examples if ex.format == "text"]
    if not text_examples:
        return []
    return [f"{len(text_examples)} records were read as plain text (format 'text'): every token is "
            "trained and any other column (a label, say) is ignored. For classification-style "
            "data set data.prompt and data.completion, e.g. prompt: \"{text}\\nLabel:\" and "
            "completion: \" {label}\""] if _has_other_columns(text_examples[0]) else []


def _has_other_columns(example: Example) -> bool:
    from tunelab.data.readers import read_records

    records = read_records(example.source.split("::")[0]) if Path(
        example.source.split("::")[0]).is_file() else []
    return bool(records) and set(records[0].fields) - {"text"} != set()
