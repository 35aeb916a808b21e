"""Detect and normalise chat / instruction / prompt-completion / text / template records → Example."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class Message:
    """One chat turn. ``weight`` follows OpenAI's fine-tuning format: 0 or 1 on assistant turns."""

    role: str  # system | user | assistant | tool
    content: str
    weight: int | None = None  # None: trained if assistant


@dataclass
class Segment:
    """A piece of rendered text and whether its tokens carry loss."""

    text: str
    train: bool


@dataclass
class Example:
    """A normalised training example: chat messages, or text segments with loss flags."""

    format: str  # chat | instruction | completion | text | template
    source: str
    line: int
    messages: list[Message] | None = None  # chat: rendered later with the tokenizer's template
    segments: list[Segment] = field(default_factory=list)  # every other format
    label: str | None = None  # template / completion data: the target text, for label balance

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"
