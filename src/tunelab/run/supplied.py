"""What a Python caller hands a run instead of data files and a model path (``tunelab.finetune``).

In-memory data (a list of dicts, a ``datasets.Dataset``, a DataFrame) is read into records that
name their row ("train row 17", ``data.readers.read_rows``) and checked as the run will read it
(the objective's format detection and validation), so a bad row is named before any work. Then
it is written as JSONL into the run directory, ``data/<split>.jsonl`` (row N is line N), and the
run's saved config names those files: the run stays reproducible, and ``tunelab eval``,
``tunelab report`` and ``--resume`` read them later from the CLI like any other run's files.

A run's data is read before its directory exists (bad data leaves nothing behind), so a new
run's in-memory data is written first to a staging folder beside it (``StagedData``) and moved
in when the loop creates the directory (``Supplied.settle``).

A model and tokenizer the caller loaded (``model.load.Preloaded``) are trained instead of
loading ``model.path``; the manifest's ``supplied`` says so.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import Config, dump_config
from tunelab.data.preference import (
    check_preference_section,
    is_preference_record,
    to_preference_examples,
)
from tunelab.data.prepare import as_examples
from tunelab.data.readers import read_rows
from tunelab.data.records import Record
from tunelab.errors import DataError
from tunelab.model.load import Preloaded
from tunelab.objectives import OBJECTIVES
from tunelab.run.directory import RunDir, write_text

SPLITS = ("train", "validation", "test")
#: The run directory's folder of in-memory data (RunDir owns every other path of a run).
DATA_FOLDER = "data"


def data_file(run: RunDir | Path, split: str) -> Path:
    """Where a run keeps the in-memory data of ``split``: ``data/<split>.jsonl``, absolute
    (a saved config's relative path would resolve against the config's own folder)."""
    return (Path(run) / DATA_FOLDER / f"{split}.jsonl").resolve()


def read_splits_in_memory(given: dict[str, Any], config: Config) -> dict[str, list[Record]]:
    """``{split: rows}`` (None: not given) as records, each split checked as ``config``'s run
    reads it; DataError naming the split, row and field of the first bad row."""
    splits = {split: read_rows(rows, split) for split, rows in given.items() if rows is not None}
    objective = OBJECTIVES[config.method.objective]
    if objective.preference and splits:
        check_preference_section(config.data)
    for split, records in splits.items():
        # as prepare and data/preference read them; a preference run's test split may hold
        # ordinary examples (what tunelab eval scores)
        if objective.preference and (split != "test" or is_preference_record(records[0])):
            to_preference_examples(records, config.data, objective)
        else:
            as_examples(records, config.data)
    return splits


def jsonl_text(records: list[Record]) -> str:
    """The records as JSON Lines, one row a line; DataError naming the row whose value JSON
    cannot hold (a datetime, an object)."""
    lines = []
    for record in records:
        try:
            lines.append(json.dumps(record.fields, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise DataError(f"the row cannot be written as JSON ({error})", where=record.where,
                            fix="give the columns text, numbers, booleans, lists or dicts "
                            "(convert dates and other objects to strings first)") from None
    return "".join(line + "\n" for line in lines)


def with_files(config: Config, files: dict[str, Path]) -> Config:
    """``config`` whose data splits named in ``files`` read those files instead."""
    copy = config.model_copy(deep=True)
    for split, path in files.items():
        setattr(copy.data, split, [str(path)])
    return copy


def write_into_run(run: RunDir, splits: dict[str, list[Record]]) -> dict[str, Path]:
    """Write ``splits`` as the run's ``data/<split>.jsonl`` (atomically); split → file."""
    files = {split: data_file(run, split) for split in splits}
    for split, records in splits.items():
        write_text(files[split], jsonl_text(records))
    return files


def repoint_saved_config(run: RunDir, files: dict[str, Path]) -> None:
    """The run's saved config names ``files`` for their splits (evaluation data handed in
    later: ``tunelab eval`` on the run then reads what was evaluated)."""
    dump_config(with_files(run.read_config(need_data=False), files), run.config_path)


@dataclass
class StagedData:
    """A new run's in-memory data, written beside the run directory before it exists."""

    folder: Path  # <output_dir>/.<name>-data-XXXX/, holding <split>.jsonl
    splits: tuple[str, ...]

    @classmethod
    def stage(cls, splits: dict[str, list[Record]], config: Config) -> tuple[StagedData, Config]:
        """The staged files, and ``config`` reading them."""
        output = Path(config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{config.name}-data-", dir=output)).resolve()
        files = {split: folder / f"{split}.jsonl" for split in splits}
        for split, records in splits.items():
            write_text(files[split], jsonl_text(records))
        return cls(folder, tuple(splits)), with_files(config, files)

    def settle(self, run: RunDir, config: Config) -> Config:
        """Move the files into the new ``run`` (``data/``) and save its config naming them
        there; the config the run goes on with."""
        target = Path(run) / DATA_FOLDER
        shutil.move(str(self.folder), str(target))
        moved = with_files(config, {split: data_file(run, split) for split in self.splits})
        dump_config(moved, run.config_path)
        return moved

    def discard(self) -> None:
        """Remove the staging folder if no run took it (training failed before its start)."""
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Supplied:
    """What ``tunelab.finetune`` hands the loop besides the config."""

    preloaded: Preloaded | None = None
    data: StagedData | None = None
    carried: dict[str, Any] | None = None  # a resumed run's earlier ``Manifest.supplied``

    def settle(self, run: RunDir, config: Config) -> Config:
        """The new run takes its in-memory data (see ``StagedData.settle``)."""
        return self.data.settle(run, config) if self.data is not None else config

    def manifest_entry(self) -> dict[str, Any] | None:
        """``Manifest.supplied``: the base handed in and the in-memory splits, or None."""
        entry = dict(self.carried or {})
        if self.preloaded is not None:
            entry["base"] = self.preloaded.describe()
        if self.data is not None:
            entry["data"] = {split: f"{DATA_FOLDER}/{split}.jsonl" for split in self.data.splits}
        return entry or None
