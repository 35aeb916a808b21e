"""Build the grounded-QA preference pairs from ../train.jsonl, ../valid.jsonl and ../test.jsonl.

Each pair's prompt is the QA example's prompt; the chosen answer is the name the review gives,
the rejected answer a name taken from another review that does not occur in this one: an answer
not supported by the context, which is what the QA task counts as hallucinated. The test split
stays ordinary prompt/completion data for ``tunelab eval`` (the task metric and the
hallucination rate), with the context kept as a column. Seeded: the files are reproducible.

    python examples/qa/preference/prepare.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Context: {context}\nQuestion: {question}\nAnswer:"


def read(name: str) -> list[dict]:
    with open(HERE.parent / name, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def pairs(rows: list[dict], names: list[str], rng: random.Random) -> list[dict]:
    out = []
    for row in rows:
        unsupported = [name for name in names if name.lower() not in row["context"].lower()]
        out.append({"prompt": PROMPT.format(**row), "chosen": f" {row['answer']}",
                    "rejected": f" {rng.choice(unsupported)}"})
    return out


def main() -> None:
    rng = random.Random(0)
    train, valid, test = read("train.jsonl"), read("valid.jsonl"), read("test.jsonl")
    names = sorted({row["answer"] for row in train})  # never a test answer
    write("train.jsonl", pairs(train, names, rng))
    write("valid.jsonl", pairs(valid, names, rng))
    write("test.jsonl", [{"prompt": PROMPT.format(**row), "completion": f" {row['answer']}",
                          "context": row["context"]} for row in test])


if __name__ == "__main__":
    main()
