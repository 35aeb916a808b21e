"""Raw data rows that remember where they came from: the type readers produce and formats read.

It lives in its own module, below both ``readers`` and ``formats``, so that neither has to import
the other to name it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Record:
    """One raw row from a data file; remembers where it came from for error messages."""

    fields: dict[str, Any]
    source: str  # the path as the user gave it
    line: int  # 1-based: the line in JSONL/CSV, the row number in Parquet / HF datasets

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"
