"""Rebuild general.jsonl and probe.jsonl from the two PyPI wheels named in README.md.

    pip download --no-deps --only-binary :all: -d /tmp/wheels gensim==4.4.0 django==5.2.20
    python src/tunelab/assets/forgetting/build_samples.py /tmp/wheels/gensim-*.whl \
        /tmp/wheels/django-*.whl

Standard library only; the selection is seeded, so the same wheels give the same files.
"""

from __future__ import annotations

import bz2
import html
import json
import random
import re
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
NS = "{http://www.mediawiki.org/xml/export-0.10/}"
SEED = 0
N_PASSAGES = 32
PASSAGE_WORDS = (18, 30)  # about 25-40 SmolLM2 tokens: what the probe's time budget allows
PROBE_LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish", "it": "Italian"}
PROBE_PER_LANGUAGE = 16
PROBE_WORDS = (4, 9)

END_SECTIONS = re.compile(r"^==+\s*(See also|References|External links|Notes|Further reading|"
                          r"Bibliography|Sources|Footnotes|Citations)\s*==+", re.M | re.I)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")
# a full stop that ends an initial or an abbreviation, not a sentence
NOT_AN_END = re.compile(r"(\b[A-Z]|\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|vs|c|ca|No|Vol|Gen|Brig|Col|Maj|"
                        r"Capt|Lt|Sgt|Adm|Gov|Sen|Rep|Rev|Prof|Mt|Ft|Co|Inc|Ltd|U\.S))\.$")
# leftovers of markup, citations and removed templates: such a sentence is not clean prose
NOT_PROSE = re.compile(r"[\[\]{}|=<>_\\#*]|https?:|&[a-z]+;|\b(ibid|pp?)\.|\(\s*[,;]?\s*\)|^\W"
                       r"|\(\s*[,;]|\s[,;.]")


def strip_nested(text: str, opening: str, closing: str) -> str:
    """``text`` without any ``opening … closing`` span, nested ones included."""
    inner = re.compile(re.escape(opening) + r"(?:(?!" + re.escape(opening) + "|"
                       + re.escape(closing) + r").)*?" + re.escape(closing), re.S)
    while True:
        stripped = inner.sub("", text)
        if stripped == text:
            return text
        text = stripped


def prose_paragraphs(wikitext: str) -> list[str]:
    """The article's body paragraphs as plain text (markup, templates, tables, notes gone)."""
    text = END_SECTIONS.split(wikitext)[0]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    text = re.sub(r"<(math|gallery|timeline|syntaxhighlight|source|pre|code|score|imagemap|chem"
                  r"|ce)[^>]*>.*?</\1>", "", text, flags=re.S | re.I)
    text = strip_nested(strip_nested(text, "{{", "}}"), "{|", "|}")
    while True:  # files, categories, interlanguage links (their captions hold links)
        stripped = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):"
                          r"(?:[^\[\]]|\[\[[^\[\]]*\]\])*\]\]", "", text)
        if stripped == text:
            break
        text = stripped
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]+)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("&nbsp;", " ").replace("&ndash;", "–").replace("&mdash;", "—")
    return [re.sub(r"\s{2,}", " ", line.strip()) for line in text.split("\n")
            if len(line.strip()) >= 200 and line.strip()[0] not in "=*#:;|!{}<["]


def sentences(paragraph: str) -> list[str | None]:
    """The paragraph's sentences in order, None for one that is not clean prose."""
    pieces: list[str] = []
    for piece in SENTENCE_END.split(paragraph):
        if pieces and NOT_AN_END.search(pieces[-1]):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    return [s if s.endswith((".", "!", "?")) and not NOT_PROSE.search(s) and len(s.split()) >= 6
            and s.count('"') % 2 == 0 and s.count("(") == s.count(")") else None
            for s in (piece.strip() for piece in pieces)]


def articles(dump: bytes) -> list[dict]:
    """The dump's articles (no redirects, disambiguation pages or lists) with their prose."""
    found = []
    for page in ET.fromstring(bz2.decompress(dump)).iter(NS + "page"):
        title = page.find(NS + "title").text
        revision = page.find(NS + "revision")
        text = revision.find(NS + "text").text or ""
        if (page.find(NS + "redirect") is not None or page.find(NS + "ns").text != "0"
                or "(disambiguation)" in title or title.startswith("List of")
                or "may refer to" in text[:3000]):
            continue
        found.append({"title": title, "revision": int(revision.find(NS + "id").text),
                      "paragraphs": prose_paragraphs(text)})
    return found


def passage(paragraph: str, rng: random.Random) -> str | None:
    """One to three consecutive clean sentences of the paragraph within PASSAGE_WORDS."""
    parts = sentences(paragraph)
    low, high = PASSAGE_WORDS
    windows = []
    for start in range(len(parts)):
        for end in range(start + 1, min(start + 3, len(parts)) + 1):
            chosen = parts[start:end]
            if None in chosen:
                break
            text = " ".join(chosen)
            if low <= len(text.split()) <= high:
                windows.append(text)
    return rng.choice(windows) if windows else None


def general_passages(dump: bytes) -> list[dict]:
    """N_PASSAGES passages, one per article, from articles drawn in a seeded order."""
    rng = random.Random(SEED)
    pool = articles(dump)
    rng.shuffle(pool)
    chosen = []
    for article in pool:
        paragraphs = list(article["paragraphs"])
        rng.shuffle(paragraphs)
        text = next((p for p in (passage(par, rng) for par in paragraphs) if p), None)
        if text:
            url = "https://en.wikipedia.org/w/index.php?oldid=" + str(article["revision"])
            chosen.append({"text": text, "title": article["title"],
                           "revision": article["revision"], "url": url})
        if len(chosen) == N_PASSAGES:
            return chosen
    raise SystemExit(f"only {len(chosen)} passages found, {N_PASSAGES} wanted")


def po_pairs(text: str) -> list[tuple[str, str]]:
    """(English msgid, translation) of a .po file: no plurals, fuzzy entries or placeholders."""
    pairs = []
    for block in text.split("\n\n"):
        match = re.search(r'^msgid ((?:".*"\n?)+)msgstr ((?:".*"\n?)+)', block, re.M)
        if not match or "msgid_plural" in block or "#, fuzzy" in block:
            continue
        source, target = (" ".join(html.unescape("".join(re.findall(r'"(.*)"', group)))
                                   .replace('\\"', '"').replace("\\n", " ").split())
                          for group in match.groups())
        if source and target and not re.search(r"[%{}<>\\]", source + target):
            pairs.append((source, target))
    return pairs


def probe_examples(django_wheel: zipfile.ZipFile) -> list[dict]:
    """PROBE_PER_LANGUAGE translated strings per language; no two share an English original
    or its first three words (Django has families such as "Enter a valid …")."""
    translations: dict[str, dict[str, tuple[str, str]]] = {code: {} for code in PROBE_LANGUAGES}
    for name in sorted(django_wheel.namelist()):
        match = re.search(r"/locale/([a-z]+)/LC_MESSAGES/django\.po$", name)
        if match and match.group(1) in PROBE_LANGUAGES:
            for source, target in po_pairs(django_wheel.read(name).decode("utf-8")):
                low, high = PROBE_WORDS
                if low <= len(target.split()) <= high:
                    translations[match.group(1)].setdefault(source, (target, name))
    rng = random.Random(SEED)
    used: set[str] = set()
    examples = []
    for code, language in PROBE_LANGUAGES.items():
        sources = sorted(translations[code])
        rng.shuffle(sources)
        fresh = [s for s in sources if family(s) not in used]
        for source in [s for i, s in enumerate(fresh) if family(s) not in map(family, fresh[:i])
                       ][:PROBE_PER_LANGUAGE]:
            used.add(family(source))
            target, file = translations[code][source]
            examples.append({"text": target, "label": language, "english": source,
                             "source": file})
    rng.shuffle(examples)
    return examples


def family(source: str) -> str:
    """The first three words of an English original, lower-cased."""
    return " ".join(source.lower().split()[:3])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(gensim_wheel: str, django_wheel: str) -> None:
    with zipfile.ZipFile(gensim_wheel) as wheel:
        write_jsonl(HERE / "general.jsonl", general_passages(wheel.read(WIKI_MEMBER)))
    with zipfile.ZipFile(django_wheel) as wheel:
        write_jsonl(HERE / "probe.jsonl", probe_examples(wheel))


if __name__ == "__main__":
    main(*sys.argv[1:3])
