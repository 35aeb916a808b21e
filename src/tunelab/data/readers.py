"""Read data files (JSONL, JSON, CSV, Parquet, Hugging Face datasets) into records with file:line.

Every record remembers where it came from, so later stages can say "train.jsonl:17: ...". Bad
user data never escapes as a parser traceback: it becomes a DataError naming the file, the line
and the fix.

Line numbers: JSONL/JSON/CSV give the physical line (1-based; a CSV header is line 1), Parquet
and Hugging Face datasets give the row number (1-based). Rows handed in from Python
(``read_rows``: a list of dicts, a ``datasets.Dataset``, a DataFrame) have no file: their
records name the split and the row ("train row 17").
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.records import Record
from tunelab.errors import DataError

SUPPORTED = (
    ".jsonl, .jsonl.gz, .json, .csv, .tsv, .parquet, a folder written by "
    "datasets' save_to_disk (optionally 'folder::split'), or hf://owner/name[::split]"
)
_HUB_PREFIX = "hf://"


def read_records(path: str | os.PathLike) -> list[Record]:
    """Read one data file (or saved dataset folder, or hf:// dataset) into records.

    Raises DataError for a missing, empty, undecodable or malformed file.
    """
    source = os.fspath(path)
    if source.startswith(_HUB_PREFIX):
        return _read_hub(source)
    file_part, split = _split_suffix(source)
    if split is not None or Path(file_part).is_dir():
        return _read_saved_dataset(source, file_part, split)
    file_path = Path(source)
    if not file_path.exists():
        raise DataError("file not found", where=source, fix=_missing_file_fix(file_path))
    name = file_path.name.lower()
    if name.endswith(".jsonl"):
        records = _read_jsonl(_decode(file_path.read_bytes(), source), source)
    elif name.endswith(".jsonl.gz"):
        records = _read_jsonl(_decode(_gunzip(file_path, source), source), source)
    elif name.endswith(".json"):
        records = _read_json(_decode(file_path.read_bytes(), source), source)
    elif name.endswith((".csv", ".tsv")):
        delimiter = "\t" if name.endswith(".tsv") else ","
        records = _read_csv(_decode(file_path.read_bytes(), source), source, delimiter)
    elif name.endswith(".parquet"):
        records = _read_parquet(file_path, source)
    else:
        raise DataError(
            f"unknown file type '{file_path.suffix or file_path.name}'",
            where=source,
            fix=f"use one of the supported kinds: {SUPPORTED}",
        )
    if not records:
        raise DataError(
            "the file has no records (it is empty or holds only blank lines)",
            where=source,
            fix="point the config at the file that holds your examples, or add examples to it",
        )
    return records


def _split_suffix(source: str) -> tuple[str, str | None]:
    """'folder::split' → ('folder', 'split'); anything else → (source, None)."""
    if "::" in source:
        folder, split = source.rsplit("::", 1)
        return folder, split or None
    return source, None


def _missing_file_fix(file_path: Path) -> str:
    folder = file_path.parent
    if not folder.is_dir():
        return (
            f"the folder '{folder}' does not exist either; check the path (relative paths are "
            "resolved from the current directory)"
        )
    names = sorted(entry.name for entry in folder.iterdir())
    similar = difflib.get_close_matches(file_path.name, names, n=3, cutoff=0.8)
    if similar:
        return "did you mean " + " or ".join(f"'{folder / name}'" for name in similar) + "?"
    return f"check the path; '{folder}' holds no file with a similar name"


def _gunzip(file_path: Path, source: str) -> bytes:
    try:
        with gzip.open(file_path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"not a readable gzip file ({error})",
            where=source,
            fix="re-compress it with gzip, or decompress it and point the config at the .jsonl",
        ) from None


def _decode(data: bytes, source: str) -> str:
    """UTF-8 bytes → text (a leading BOM is dropped); bad bytes → DataError with line and offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        line_start = data.rfind(b"\n", 0, error.start) + 1
        bad_byte = data[error.start]
        raise DataError(
            f"byte 0x{bad_byte:02x} at byte offset {error.start - line_start} of line {line} "
            f"(offset {error.start} in the file) is not valid UTF-8",
            where=f"{source}:{line}",
            fix="re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl` "
            "(use the encoding it was written in instead of latin1)",
        ) from None


def _read_jsonl(text: str, source: str) -> list[Record]:
    """One JSON object per line; blank lines are skipped."""
    loads = json.loads
    records = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line or line.isspace():
            continue
        try:
            value = loads(line)
        except json.JSONDecodeError as error:
            raise _json_error(error, source, line_number) from None
        if not isinstance(value, dict):
            raise _not_object(value, source, line_number)
        records.append(Record(value, source, line_number))
    return records


def _read_json(text: str, source: str) -> list[Record]:
    """A JSON array of objects, a single object, or JSON Lines content saved as .json."""
    stripped = text.lstrip()
    if not stripped:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if _first_line_is_json(stripped):  # JSON Lines saved as .json
            return _read_jsonl(text, source)
        # meant as one JSON document: report the error where the parser found it
        raise _json_error(error, source, error.lineno, error.colno) from None
    if isinstance(value, dict):
        return [Record(value, source, text.count("\n", 0, len(text) - len(stripped)) + 1)]
    if not isinstance(value, list):
        raise DataError(
            f"the file holds a single JSON {_json_type(value)}, not a list of objects",
            where=f"{source}:1",
            fix="write a JSON array of objects ([{...}, {...}]) or one object per line (.jsonl)",
        )
    return _array_records(text, source)


def _first_line_is_json(text: str) -> bool:
    try:
        json.loads(text.split("\n", 1)[0])
    except json.JSONDecodeError:
        return False
    return True


def _array_records(text: str, source: str) -> list[Record]:
    """Walk a valid top-level JSON array element by element to learn each element's line."""
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line_number = text.count("\n", 0, position) + 1
    records = []
    while True:
        start = _skip_separators(text, position)
        if text[start] == "]":
            return records
        line_number += text.count("\n", position, start)
        value, position = decoder.raw_decode(text, start)
        if not isinstance(value, dict):
            raise _not_object(value, source, line_number, f"element {len(records) + 1}")
        records.append(Record(value, source, line_number))
        line_number += text.count("\n", start, position)


def _skip_separators(text: str, position: int) -> int:
    while text[position] in " \t\r\n,":
        position += 1
    return position


def _json_error(
    error: json.JSONDecodeError, source: str, line_number: int, column: int | None = None
) -> DataError:
    column = error.colno if column is None else column
    return DataError(
        f"not valid JSON: {error.msg} (column {column})",
        where=f"{source}:{line_number}",
        fix="correct the JSON on that line (each line must be one complete JSON object; check "
        "quotes, commas and escaped newlines)",
    )


def _not_object(value: Any, source: str, line_number: int, what: str = "the line") -> DataError:
    return DataError(
        f"{what} is a JSON {_json_type(value)}, not an object",
        where=f"{source}:{line_number}",
        fix='each record must be a JSON object such as {"prompt": "...", "completion": "..."}',
    )


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _read_csv(text: str, source: str, delimiter: str) -> list[Record]:
    """Rows under a header row; each record's line is the physical line where its row starts."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return []
        _check_header(header, source)
        records = []
        row_start = reader.line_num + 1
        for row in reader:
            if row:  # the csv module returns [] for a blank line
                if len(row) != len(header):
                    raise _ragged_row(row, header, source, row_start)
                records.append(Record(dict(zip(header, row, strict=True)), source, row_start))
            row_start = reader.line_num + 1
    except csv.Error as error:
        raise DataError(
            f"not valid CSV: {error}",
            where=f"{source}:{reader.line_num}",
            fix="check the quoting on that line (a field with a quote, comma or newline must be "
            'wrapped in double quotes, with inner quotes doubled "")',
        ) from None
    return records


def _check_header(header: list[str], source: str) -> None:
    seen = set()
    for column in header:
        if column in seen:
            raise DataError(
                f"column '{column}' appears twice in the header row",
                where=f"{source}:1",
                fix="give every column a distinct name",
            )
        seen.add(column)


def _ragged_row(row: list[str], header: list[str], source: str, line_number: int) -> DataError:
    too = "many" if len(row) > len(header) else "few"
    return DataError(
        f"the row has {len(row)} columns but the header has {len(header)} (too {too})",
        where=f"{source}:{line_number}",
        fix="quote fields that contain the delimiter, or add the missing fields "
        "(an empty field is written as nothing between two delimiters)",
    )


def _read_parquet(file_path: Path, source: str) -> list[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(file_path).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(
            f"not a readable Parquet file ({error})",
            where=source,
            fix="re-write it with pandas.DataFrame.to_parquet or pyarrow.parquet.write_table",
        ) from None
    return [Record(row, source, row_number) for row_number, row in enumerate(rows, start=1)]


def _read_saved_dataset(source: str, folder: str, split: str | None) -> list[Record]:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    if Path(folder).is_file():
        raise DataError(
            f"'::{split}' names a split, which only a dataset folder has",
            where=source,
            fix=f"drop the '::{split}' suffix, or point at a folder written by save_to_disk",
        )
    if not Path(folder).is_dir():
        raise DataError(
            "folder not found",
            where=folder,
            fix=_missing_file_fix(Path(folder)) + " (the '::split' suffix needs a dataset folder)",
        )
    import datasets

    try:
        dataset = datasets.load_from_disk(folder)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise DataError(
            f"the folder is not a dataset written by save_to_disk ({error})",
            where=folder,
            fix="point the config at a data file, or at a folder written by "
            "datasets' Dataset.save_to_disk",
        ) from None
    dataset = _pick_split(dataset, split, folder)
    return _dataset_records(dataset, source)


def _read_hub(source: str) -> list[Record]:
    name, split = _split_suffix(source[len(_HUB_PREFIX) :])
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    # load_dataset fails in many ways offline (ConnectionError, hub errors, OSError, ValueError);
    # each is the same answer for the user: the hub dataset cannot be read from here.
    except Exception as error:
        raise DataError(
            f"cannot load the hub dataset '{name}' split '{split or 'train'}': the hub is "
            f"unreachable or the name/split is wrong ({str(error).splitlines()[0]})",
            where=source,
            fix=f"on a machine with hub access run datasets.load_dataset('{name}')"
            ".save_to_disk('data/<folder>'), copy the folder here and point the config at it",
        ) from None
    return _dataset_records(dataset, source)


def _pick_split(dataset: Any, split: str | None, where: str) -> Any:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        split = split or "train"
        if split not in dataset:
            raise DataError(
                f"the dataset has no split '{split}' (it has: {', '.join(dataset)})",
                where=where,
                fix=f"name an existing split, e.g. '{where}::{next(iter(dataset), 'train')}'",
            )
        return dataset[split]
    if split is not None:
        raise DataError(
            f"the dataset has no splits, so '::{split}' cannot be applied",
            where=where,
            fix="drop the '::split' suffix",
        )
    return dataset


def _dataset_records(dataset: Any, source: str) -> list[Record]:
    rows = dataset.to_list()
    if not rows:
        raise DataError(
            "the dataset has no rows",
            where=source,
            fix="point the config at the split that holds your examples",
        )
    return [Record(row, source, row_number) for row_number, row in enumerate(rows, start=1)]


# --- rows handed in from Python --------------------------------------------------------------


@dataclass(frozen=True)
class RowRecord(Record):
    """A row handed in from Python: it has no file, so its place is the split and the row."""

    @property
    def where(self) -> str:
        return f"{self.source} row {self.line}"


def read_rows(rows: Any, name: str) -> list[Record]:
    """In-memory rows (a list of dicts, a ``datasets.Dataset``, a pandas DataFrame, duck-typed
    so pandas need not be installed) → records named "``name`` row N" (1-based).

    Values become what a JSON file would hold, so the rows validate exactly as the JSONL a run
    writes of them reads back: numpy scalars and arrays plain numbers and lists, tuples lists,
    a float NaN (pandas' missing value) None.
    """
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a pandas DataFrame
        rows = rows.to_dict("records")
    elif hasattr(rows, "to_list") and hasattr(rows, "column_names"):  # datasets.Dataset
        rows = rows.to_list()
    if isinstance(rows, (Mapping, str, bytes)) or not isinstance(rows, Iterable):
        raise DataError(
            f"in-memory data is {type(rows).__name__}, not a list of rows",
            where=name,
            fix="pass a list of dicts, a datasets.Dataset or a pandas DataFrame (a dict of "
            "splits or a DatasetDict goes to data=)",
        )
    records = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise DataError(
                f"the row is {type(row).__name__}, not a dict",
                where=f"{name} row {number}",
                fix='each row must be a dict such as {"prompt": "...", "completion": "..."}',
            )
        records.append(RowRecord({str(key): _plain(value) for key, value in row.items()},
                                 name, number))
    if not records:
        raise DataError("the in-memory data has no rows", where=name,
                        fix="pass the rows that hold your examples")
    return records


def _plain(value: Any) -> Any:
    """``value`` as JSON would hold it (see ``read_rows``)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy
        return _plain(value.tolist())
    return value
