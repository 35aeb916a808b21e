"""A reward in TRL's signature for the arithmetic example: partial credit for the answer's form.

    rl:
      rewards: [task, {function: "python:rewards.py:number_only", weight: 0.2}]

``number_only`` gives 1 to an answer that is a whole number and nothing else, 0 otherwise; the
``task`` reward (exact match) still decides whether the number is right.
"""

from __future__ import annotations

import re

NUMBER = re.compile(r"\s*-?\d+\s*")


def number_only(prompts: list[str], completions: list[str], **columns) -> list[float]:
    return [1.0 if NUMBER.fullmatch(completion) else 0.0 for completion in completions]
