"""Write this folder's data: the sentiment example's chat records in the shapes other tools use.

    python examples/imports/prepare.py

From ``examples/sentiment/chat/`` (the first 240 training and 60 validation records):

- ``sharegpt.jsonl`` / ``sharegpt-valid.jsonl``: ShareGPT, as Axolotl and LLaMA-Factory read it,
  ``{"conversations": [{"from": "human", ...}, {"from": "gpt", ...}], "system": ...}``;
- ``prompt_completion.jsonl`` / ``prompt_completion-valid.jsonl``: TRL's conversational
  prompt-completion, ``{"prompt": [{"role": "user", ...}], "completion": [{"role":
  "assistant", ...}]}``.

The files it writes are committed; run it again after the sentiment example's data changes.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "sentiment" / "chat"
SYSTEM = "You label movie reviews as positive or negative."
SIZES = {"train": 240, "valid": 60}


def sharegpt(record: dict) -> dict:
    user, reply = record["messages"]
    return {"conversations": [{"from": "human", "value": user["content"]},
                              {"from": "gpt", "value": reply["content"]}], "system": SYSTEM}


def prompt_completion(record: dict) -> dict:
    user, reply = record["messages"]
    return {"prompt": [{"role": "system", "content": SYSTEM}, user], "completion": [reply]}


def main() -> None:
    for split, size in SIZES.items():
        lines = (SOURCE / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:size]
        records = [json.loads(line) for line in lines]
        suffix = "" if split == "train" else "-valid"
        for name, convert in (("sharegpt", sharegpt), ("prompt_completion", prompt_completion)):
            path = HERE / f"{name}{suffix}.jsonl"
            path.write_text("".join(json.dumps(convert(record), ensure_ascii=False) + "\n"
                                    for record in records), encoding="utf-8")
            print(f"wrote {path.relative_to(HERE.parent.parent)} ({len(records)} records)")


if __name__ == "__main__":
    main()
