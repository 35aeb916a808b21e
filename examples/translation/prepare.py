"""Build the translation example: English → French user-interface strings from Django's catalogues.

Django (BSD-3-Clause) ships human translations of its interface strings in
`django/**/locale/fr/LC_MESSAGES/django.po`. Strings with placeholders (`%`, `{`) or markup are
dropped, as are one-word strings. Run once; the JSONL files it writes are committed:

    pip install django && python examples/translation/prepare.py
"""

from __future__ import annotations

import ast
import importlib.util
import json
import random
import re
from pathlib import Path

SIZES = {"train": 230, "valid": 25, "test": 75}


def pairs(language: str = "fr") -> list[dict]:
    root = Path(importlib.util.find_spec("django").submodule_search_locations[0])
    found, seen = [], set()
    for po in sorted(root.glob(f"**/locale/{language}/LC_MESSAGES/django.po")):
        for english, french in parse_po(po.read_text(encoding="utf-8")):
            if (len(english.split()) < 2 or not french or re.search(r"[%{<\\]", english + french)
                    or english in seen):
                continue
            seen.add(english)
            found.append({"en": english, "fr": french})
    return found


def parse_po(text: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a .po file; plural and fuzzy entries are skipped."""
    out = []
    for block in text.split("\n\n"):
        if "#, fuzzy" in block or "msgid_plural" in block or "msgctxt" in block:
            continue
        fields, current = {}, None
        for line in block.splitlines():
            if line.startswith(("msgid ", "msgstr ")):
                current, _, literal = line.partition(" ")
                fields[current] = ast.literal_eval(literal)
            elif line.startswith('"') and current:
                fields[current] += ast.literal_eval(line)
        if fields.get("msgid") and fields.get("msgstr"):
            out.append((fields["msgid"], fields["msgstr"]))
    return out


def main() -> None:
    rows = pairs()
    random.Random(0).shuffle(rows)
    start = 0
    for split, size in SIZES.items():
        with open(Path(__file__).parent / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n"
                              for r in rows[start:start + size])
        print(f"{split}: {len(rows[start:start + size])} records")
        start += size


if __name__ == "__main__":
    main()
