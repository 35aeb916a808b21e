"""``tunelab data check``: validate a config's data (or one file) and report on its quality."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from tunelab.config import DataConfig
from tunelab.data.formats import Example
from tunelab.data.prepare import read_splits, tokenize_as_trained
from tunelab.data.quality import quality_report, render_quality_report
from tunelab.data.tokenize import TokenizedExample, truncation_effects
from tunelab.errors import ConfigError, ModelError


def check_data(source: str | Path, *, max_seq_len: int | None = None, model: str | None = None,
               console: Console | None = None) -> dict:
    """Read and normalise every record (errors name file:line), then build the quality report.

    ``source`` is a YAML config (its train, validation and test data, template and tokenizer;
    leakage is checked between every pair of splits) or a data
    file (format auto-detected; token lengths with ``model``'s tokenizer when given).
    A config's splits are the run's (``prepare.read_splits``: validation split off train with
    the run's seed when there is no validation file) and are tokenized as the run tokenizes
    them (``prepare.tokenize_as_trained``), untruncated, to show what ``max_seq_len`` cuts.
    """
    from tunelab.config import load_config

    console = console or Console()
    source = Path(source)
    if source.suffix in (".yaml", ".yml"):
        config = load_config(source)
        data = config.data
        if data.tasks:
            raise ConfigError("data check reads one task's data; this config lists several "
                              "(data.tasks)", where="data.tasks",
                              fix="check each task's files: tunelab data check <file>")
        splits = read_splits(data, seed=config.train.seed, test=True)
        model = model or config.model.path
        max_seq_len = max_seq_len or config.train.max_seq_len
    else:
        data = DataConfig(train=[str(source)])  # the defaults: no validation split
        splits = read_splits(data, seed=0)
    examples = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    tokenized = _tokenized(examples, model, data, console=console) if model else None
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


def _tokenized(splits: dict[str, list[Example]], model: str, data: DataConfig, *,
               console: Console) -> dict[str, list[TokenizedExample]] | None:
    """Each split tokenized as the run does, untruncated (its full lengths)."""
    from tunelab.model.load import load_tokenizer

    try:
        tokenizer = load_tokenizer(model)
    except ModelError as error:
        console.print(f"[yellow]warning:[/] no token lengths: {error.render()}")
        return None
    return {split: tokenize_as_trained(examples, tokenizer, data, max_seq_len=10**9)
            for split, examples in splits.items()}


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
