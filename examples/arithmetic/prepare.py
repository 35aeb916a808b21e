"""Generate the arithmetic example's data: two-number sums and differences, answers checkable.

Every question has one right answer, so the reward is verifiable: the QA task's exact match
against the reference number (``rl.rewards: [task]``). Train, validation and test questions are
disjoint. Seeded: the files are reproducible.

    python examples/arithmetic/prepare.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def question(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", a - b


def main() -> None:
    rng = random.Random(0)
    seen, rows = set(), []
    while len(rows) < 700:
        text, answer = question(rng)
        if text in seen:
            continue
        seen.add(text)
        rows.append({"messages": [
            {"role": "user", "content": f"{text} Reply with the number only."},
            {"role": "assistant", "content": str(answer)}]})
    for name, part in (("train", rows[:500]), ("valid", rows[500:550]), ("test", rows[550:])):
        with open(HERE / f"{name}.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(row) + "\n" for row in part)


if __name__ == "__main__":
    main()
