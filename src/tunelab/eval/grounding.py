"""Grounding checks: predicted spans that do not occur in the input are hallucinations.

For tasks whose answer must be copied from the input (NER entity spans, extractive QA answers).
A span is supported when, after normalisation, it occurs in the source as whole words.
Normalisation of both sides: Unicode NFKC, case folding, curly quotes and dashes mapped to ASCII,
whitespace collapsed; the span also loses surrounding punctuation. "Whole words" means the match
is not glued to a letter or digit on either side ("Paris" is not supported by "Parisian"),
except next to characters of scripts written without spaces between words (Chinese, Japanese,
Korean, Thai, Lao, Khmer, Myanmar), where any substring match counts.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

MAX_SOURCE_CHARS = 300

_ASCII_PUNCTUATION = str.maketrans({
    "‘": "'", "’": "'", "‛": "'", "′": "'", "“": '"', "”": '"', "„": '"', "″": '"',
    "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "−": "-",
})
_UNSPACED_SCRIPTS = (  # code point ranges of scripts that do not separate words with spaces
    (0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1100, 0x11FF), (0x1780, 0x17FF), (0x3040, 0x30FF),
    (0x3130, 0x318F), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF),
    (0x20000, 0x2FFFF),
)


def unsupported_spans(spans: Iterable[str], source: str) -> list[str]:
    """The spans (as given, in order) that do not occur in ``source``; empty spans are skipped."""
    normalized_source = normalize_text(source)
    unsupported = []
    for span in spans:
        key = _span_key(span)
        if key and not _occurs(key, normalized_source):
            unsupported.append(span)
    return unsupported


def hallucination_report(items: list[dict], *, max_examples: int = 5) -> dict:
    """Share of predicted spans not supported by their source, with the worst examples.

    Each item is {"index", "source", "spans": [...]}. ``rate`` is span-weighted (0 when there
    are no spans). ``per_example`` is each example's unsupported share, for bootstrapping the
    example-weighted rate; examples without (non-empty) spans are left out, and
    ``per_example_index``/``per_example_n_spans`` say which examples and how many spans, so the
    span-weighted rate can be bootstrapped with ``stats.ratio_statistic``. ``examples`` lists
    up to ``max_examples`` examples with the most unsupported spans first.
    """
    n_spans = n_unsupported = 0
    per_example, per_example_index, per_example_n_spans, flagged = [], [], [], []
    for item in items:
        spans = [span for span in item["spans"] if _span_key(span)]
        if not spans:
            continue
        unsupported = unsupported_spans(spans, item["source"])
        n_spans += len(spans)
        n_unsupported += len(unsupported)
        per_example.append(len(unsupported) / len(spans))
        per_example_index.append(item["index"])
        per_example_n_spans.append(len(spans))
        if unsupported:
            flagged.append((item, spans, unsupported))
    flagged.sort(key=lambda entry: (-len(entry[2]), -len(entry[2]) / len(entry[1])))
    examples = [{"index": item["index"], "source": _truncate(item["source"]),
                 "n_spans": len(spans), "unsupported": unsupported}
                for item, spans, unsupported in flagged[:max_examples]]
    return {"rate": n_unsupported / n_spans if n_spans else 0.0, "n_spans": n_spans,
            "n_unsupported": n_unsupported, "per_example": per_example,
            "per_example_index": per_example_index, "per_example_n_spans": per_example_n_spans,
            "examples": examples}


def normalize_text(text: str) -> str:
    """NFKC, case-folded, ASCII quotes and dashes, whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_ASCII_PUNCTUATION)
    text = unicodedata.normalize("NFKC", text.casefold())
    return " ".join(text.split())


def _span_key(span: str) -> str:
    """The normalised span without surrounding punctuation or whitespace."""
    text = normalize_text(span)
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge(character: str) -> bool:
    return character.isspace() or unicodedata.category(character).startswith("P")


def _occurs(key: str, source: str) -> bool:
    """Whether ``key`` occurs in ``source`` not glued to a neighbouring letter or digit."""
    start = source.find(key)
    while start >= 0:
        end = start + len(key)
        glued_left = start > 0 and _glued(source[start - 1], key[0])
        glued_right = end < len(source) and _glued(key[-1], source[end])
        if not (glued_left or glued_right):
            return True
        start = source.find(key, start + 1)
    return False


def _glued(left: str, right: str) -> bool:
    return (left.isalnum() and right.isalnum()
            and not _unspaced(left) and not _unspaced(right))


def _unspaced(character: str) -> bool:
    code = ord(character)
    return any(low <= code <= high for low, high in _UNSPACED_SCRIPTS)


def _truncate(text: str) -> str:
    return text if len(text) <= MAX_SOURCE_CHARS else text[:MAX_SOURCE_CHARS - 1] + "…"
