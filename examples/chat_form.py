"""Write the chat form of a shipped example: the same records as OpenAI chat messages.

    python examples/chat_form.py examples/sentiment      # writes examples/sentiment/chat/

Each record of the example's train / validation / test files becomes
``{"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": TARGET}],
...its columns}``: PROMPT is the example's ``data.prompt`` rendered for the record (trailing
whitespace dropped), TARGET its ``data.completion`` rendered and stripped. The user turn asks
what the template form asks and the reply is its target, so the two forms compare on the same
examples; the original columns stay beside ``messages`` so ``eval.context`` (grounding) still
finds the input text. ``chat/config.yaml`` is the example's config with the chat files, no
templates and no prompt variants (they are format strings over columns, for template data).
Run it again after the example's own data changes; the files it writes are committed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tunelab.data.formats import to_example
from tunelab.data.readers import read_records


def chat_record(fields: dict, prompt: str, completion: str, where: tuple[str, int]) -> dict:
    """One record in chat form: the rendered prompt as the user turn, the target as the reply."""
    from tunelab.data.records import Record

    example = to_example(Record(fields, *where), "template", prompt=prompt, completion=completion)
    user, target = example.segments[0].text.rstrip(), example.segments[1].text.strip()
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": target}], **fields}


def convert(folder: Path) -> Path:
    """Write ``folder/chat/`` (data files and config.yaml) from ``folder/config.yaml``."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    data = config["data"]
    prompt, completion = data.pop("prompt"), data.pop("completion")
    out = folder / "chat"
    out.mkdir(exist_ok=True)
    for split in ("train", "validation", "test"):
        if split not in data:
            continue
        name = Path(data[split]).name
        rows = [chat_record(record.fields, prompt, completion, (record.source, record.line))
                for record in read_records(str(folder / data[split]))]
        (out / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n"
                                        for row in rows))
        data[split] = name
        print(f"{out / name}: {len(rows)} records")
    config["name"] = f"{config['name']}-chat"
    data["format"] = "chat"
    config.get("eval", {}).pop("prompt_variants", None)
    header = (f"# The chat form of ../config.yaml, written by examples/chat_form.py: each record's "
              f"prompt is the user turn,\n# its target the assistant's reply. tunelab train "
              f"{out / 'config.yaml'}\n")
    (out / "config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False,
                                                             allow_unicode=True, width=100))
    return out


if __name__ == "__main__":
    for argument in sys.argv[1:] or ["examples/sentiment"]:
        convert(Path(argument))
