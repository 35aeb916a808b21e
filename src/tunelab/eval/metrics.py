"""Task metrics and tolerant parsing of model outputs, with per-example scores for bootstrapping.

Scales: accuracy, F1, exact match and ROUGE-L are in [0, 1]; BLEU and chrF are sacrebleu's
0–100. Corpus metrics that are not means of per-example scores (macro-F1, micro entity F1,
BLEU, chrF) come with a ``*_statistic`` factory: a function of resampled example indices that
``tunelab.eval.stats`` bootstraps (see its module docstring).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from tunelab.eval.stats import Statistic, ratio_statistic

if TYPE_CHECKING:
    from sacrebleu.metrics import BLEU, CHRF

UNPARSED = "(unparsed)"

# --------------------------------------------------------------------------- classification


def classification_metrics(gold: list[str], predicted: list[str | None],
                           labels: list[str]) -> dict:
    """Accuracy, macro-F1 over ``labels``, per-class P/R/F1/support and the confusion matrix.

    A None prediction (unparseable output) is wrong and gets its own confusion column
    ``"(unparsed)"``; the matrix is square over ``confusion["labels"]`` (rows gold, columns
    predicted), so that row is all zeros. A label with no gold and no predicted examples has
    F1 0 and still counts in the macro average, as in scikit-learn with explicit labels.
    """
    gold_codes, predicted_codes = _encode_labels(gold, predicted, labels)
    n_labels = len(labels)
    confusion = np.zeros((n_labels + 1, n_labels + 1), dtype=int)
    np.add.at(confusion, (gold_codes, predicted_codes), 1)
    true_positive = np.diag(confusion)[:n_labels]
    support = confusion[:n_labels].sum(axis=1)
    predicted_count = confusion[:, :n_labels].sum(axis=0)
    per_class = {
        label: {
            "precision": _safe_ratio(true_positive[k], predicted_count[k]),
            "recall": _safe_ratio(true_positive[k], support[k]),
            "f1": _safe_ratio(2 * true_positive[k], predicted_count[k] + support[k]),
            "support": int(support[k]),
        }
        for k, label in enumerate(labels)
    }
    n_unparsed = int(confusion[:, n_labels].sum())
    shown = n_labels + 1 if n_unparsed else n_labels
    correct = (gold_codes == predicted_codes).astype(float)
    return {
        "accuracy": float(correct.mean()) if len(correct) else 0.0,
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "confusion": {"labels": list(labels) + ([UNPARSED] if n_unparsed else []),
                      "matrix": confusion[:shown, :shown].tolist()},
        "n": len(gold),
        "n_unparsed": n_unparsed,
        "per_example_correct": correct.tolist(),
    }


def macro_f1(gold: list[str], predicted: list[str | None], labels: list[str]) -> float:
    """Macro-averaged F1 over ``labels``; a None prediction counts as wrong."""
    return macro_f1_statistic(gold, predicted, labels)(np.arange(len(gold)))


def macro_f1_statistic(gold: list[str], predicted: list[str | None],
                       labels: list[str]) -> Statistic:
    """Macro-F1 as a function of resampled example indices (labels encoded once, numpy counts)."""
    gold_codes, predicted_codes = _encode_labels(gold, predicted, labels)
    n_labels = len(labels)

    def statistic(indices: np.ndarray) -> float:
        gold_sample, predicted_sample = gold_codes[indices], predicted_codes[indices]
        hits = gold_sample[gold_sample == predicted_sample]
        true_positive = np.bincount(hits, minlength=n_labels + 1)[:n_labels]
        support = np.bincount(gold_sample, minlength=n_labels + 1)[:n_labels]
        predicted_count = np.bincount(predicted_sample, minlength=n_labels + 1)[:n_labels]
        denominator = support + predicted_count
        f1 = np.divide(2 * true_positive, denominator, out=np.zeros(n_labels),
                       where=denominator > 0)
        return float(f1.mean())

    return statistic


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a free-text answer names, or None when it names none or several.

    Matching is case-insensitive on whole words, with ``_``/``-`` read as spaces. A label at the
    start (after quotes, punctuation, markdown) followed by the end or a clause or line break
    wins: " Positive." → positive, "Positive, though slow" → positive. Otherwise exactly one
    label must occur anywhere: "The sentiment is negative" → negative; "positive or negative"
    → None. A label inside a longer matching label ("entailment" in
    "not_entailment") does not count separately.
    """
    keys = {}
    for label in labels:
        key = _label_key(label)
        if key in keys:
            raise ValueError(f"labels {keys[key]!r} and {label!r} are indistinguishable")
        keys[key] = label
    # Newlines survive in the body: a line break after a label ends the answer.
    body = re.sub(r"[^\S\n]+", " ", text.casefold().replace("_", " ").replace("-", " ")).strip()
    matches = [(found.start(), found.end(), label) for key, label in keys.items() if key
               for found in re.finditer(rf"(?<!\w){re.escape(key)}(?!\w)", body)]
    matches = [m for m in matches
               if not any(o[0] <= m[0] and m[1] <= o[1] and o[:2] != m[:2] for o in matches)]
    start = len(body) - len(body.lstrip(_EDGE_CHARACTERS))
    at_start = [(end, label) for position, end, label in matches if position == start]
    if at_start and re.match(_ANSWER_BREAK, body[at_start[0][0]:]):
        return at_start[0][1]
    named = {label for _, _, label in matches}
    return named.pop() if len(named) == 1 else None


# What may follow a label for it to be the whole answer: the end, or a clause or line break
# ("Positive." or "Positive, though ..."); "positive or negative" falls back to the count.
_ANSWER_BREAK = re.compile(r" ?(?:$|\n|[.!,;:)\]}*\"'”’»])")
_EDGE_CHARACTERS = string.punctuation + string.whitespace + "“”‘’«»„‹›…–—"


def _label_key(text: str) -> str:
    return " ".join(text.casefold().replace("_", " ").replace("-", " ").split())


def _encode_labels(gold: list[str], predicted: list[str | None],
                   labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes: a label's position in ``labels``; None predictions get ``len(labels)``."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not labels:
        raise ValueError("no labels given: pass the task's label set")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels contain duplicates: {labels}")
    code = {label: k for k, label in enumerate(labels)}
    unknown = sorted({value for value in [*gold, *predicted] if value is not None} - set(code))
    if unknown:
        raise ValueError(f"values {unknown[:5]} are not among labels {labels}; map them to a "
                         "label or to None (unparsed) first")
    return (np.array([code[value] for value in gold], dtype=int),
            np.array([len(labels) if value is None else code[value] for value in predicted],
                     dtype=int))


def _safe_ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


# --------------------------------------------------------------------------- named entities

_NONE_ANSWERS = {"none", "no entities", "no entity", "no entities found", "no named entities",
                 "n/a", "na", "nil", "null", "nothing", "empty", "-", "[]", "{}"}
_TYPE_KEYS = ("type", "label", "entity_type", "category")
_TEXT_KEYS = ("text", "span", "entity", "value", "name")
_LIST_MARKER = re.compile(r"^\s*(?:[-*•+]|\d+[.)]|\(\d+\))\s+")
_ENTITY_LINE = re.compile(r"^(?P<type>[^\W\d][\w\-]*)\s*:\s*(?P<span>.*)$")
_SPAN_QUOTES = "\"'“”‘’`"


def parse_entities(text: str,
                   types: list[str] | None = None) -> tuple[set[tuple[str, str]], bool]:
    """Entities in a model's answer, and whether the answer could not be parsed at all.

    The documented format is one ``TYPE: span`` per line (``PERSON: Ada Lovelace``); JSON is
    also read: a list of {"type", "text"} objects or a dict type → list of spans. Bullets,
    numbering, code fences, bold markers, quotes, trailing ``.,;:`` and the case of the type are
    tolerated; types are upper-cased, spans whitespace-normalised. With ``types``, other types
    are ignored. ``failed`` is True when non-empty output yields no entity and is not an
    explicit empty answer ("none", "[]", "PERSON: none", ...).
    """
    allowed = {t.strip().upper() for t in types} if types is not None else None
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("```"))
    body = body.strip()
    if not body or _is_none_answer(body):
        return set(), False
    found = _entities_from_json(body)
    if found is None:
        found = _entities_from_lines(body)
    pairs, explicit_empty = found
    entities = {entity for entity in (_canonical_entity(t, s) for t, s in pairs)
                if entity is not None and (allowed is None or entity[0] in allowed)}
    return entities, not entities and not explicit_empty


def format_entities(entities: Iterable[tuple[str, str]]) -> str:
    """The training-target text for entities: ``TYPE: span`` lines, or "none" when empty.

    A set is written sorted (type, then span) so targets are deterministic; a list keeps its
    order (e.g. order of appearance in the input).
    """
    canonical = [e for e in (_canonical_entity(t, s) for t, s in entities) if e is not None]
    if isinstance(entities, (set, frozenset)):
        canonical = sorted(set(canonical))
    return "\n".join(f"{kind}: {span}" for kind, span in canonical) or "none"


def entity_f1(gold: list[set], predicted: list[set]) -> dict:
    """Micro precision/recall/F1 with exact (type, span) matching, per type, and per example.

    Returns {"precision", "recall", "f1", "n_gold", "n_predicted", "n_correct", "per_type":
    {TYPE: {precision, recall, f1, support}}, "per_example_f1"}. The mean of
    ``per_example_f1`` is not micro F1: bootstrap micro F1 with ``entity_f1_statistic``.

    Both sides are canonicalised like ``parse_entities`` output (type upper-cased, whitespace
    collapsed, surrounding quotes and trailing ``.,;:`` dropped). Entities are sets, so an
    entity repeated in one example counts once (seqeval would count each position). An
    example with no gold and no predicted entities has per-example F1 1.0.
    """
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold entity sets but {len(predicted)} predicted sets")
    gold_sets = [_canonical_set(entities) for entities in gold]
    predicted_sets = [_canonical_set(entities) for entities in predicted]
    counts: dict[str, Counter] = {"tp": Counter(), "gold": Counter(), "predicted": Counter()}
    per_example = []
    for gold_set, predicted_set in zip(gold_sets, predicted_sets, strict=True):
        hits = gold_set & predicted_set
        counts["tp"].update(kind for kind, _ in hits)
        counts["gold"].update(kind for kind, _ in gold_set)
        counts["predicted"].update(kind for kind, _ in predicted_set)
        size = len(gold_set) + len(predicted_set)
        per_example.append(2 * len(hits) / size if size else 1.0)
    per_type = {kind: _prf(counts["tp"][kind], counts["predicted"][kind], counts["gold"][kind])
                for kind in sorted(set(counts["gold"]) | set(counts["predicted"]))}
    totals = {name: sum(counter.values()) for name, counter in counts.items()}
    micro = _prf(totals["tp"], totals["predicted"], totals["gold"])
    return {"precision": micro["precision"], "recall": micro["recall"], "f1": micro["f1"],
            "n_gold": totals["gold"], "n_predicted": totals["predicted"],
            "n_correct": totals["tp"], "per_type": per_type, "per_example_f1": per_example}


def entity_f1_statistic(gold: list[set], predicted: list[set]) -> Statistic:
    """Micro entity F1 as a function of resampled example indices."""
    gold_sets = [_canonical_set(entities) for entities in gold]
    predicted_sets = [_canonical_set(entities) for entities in predicted]
    if len(gold_sets) != len(predicted_sets):
        raise ValueError(f"{len(gold)} gold entity sets but {len(predicted)} predicted sets")
    hits = [2 * len(g & p) for g, p in zip(gold_sets, predicted_sets, strict=True)]
    sizes = [len(g) + len(p) for g, p in zip(gold_sets, predicted_sets, strict=True)]
    return ratio_statistic(hits, sizes)


def _prf(true_positive: int, n_predicted: int, n_gold: int) -> dict:
    return {"precision": _safe_ratio(true_positive, n_predicted),
            "recall": _safe_ratio(true_positive, n_gold),
            "f1": _safe_ratio(2 * true_positive, n_predicted + n_gold), "support": n_gold}


def _canonical_set(entities: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    return {e for e in (_canonical_entity(t, s) for t, s in entities) if e is not None}


def _canonical_entity(kind: str, span: str) -> tuple[str, str] | None:
    """(TYPE, span) with the tolerated noise removed; None when the span is empty."""
    kind = kind.strip().strip("*`").strip().upper()
    span = " ".join(str(span).split())
    previous = None
    while span != previous:
        previous = span
        span = span.strip().strip("*").rstrip(".,;:").strip()
        if len(span) >= 2 and span[0] in _SPAN_QUOTES and span[-1] in _SPAN_QUOTES:
            span = span[1:-1]
    return (kind, span) if kind and span else None


def _is_none_answer(text: str) -> bool:
    key = " ".join(text.casefold().split()).rstrip(".!")
    return key.strip("*`'\" ") in _NONE_ANSWERS


def _entities_from_json(body: str) -> tuple[list[tuple[str, str]], bool] | None:
    """(pairs, explicit_empty) from JSON output, or None when the output is not JSON."""
    data = _json_container(body)
    if data is not None:
        return _pairs_from_data(data)
    # JSON after a preamble ("Entities: [...]") only counts when it holds entities, so that
    # brackets inside a ``TYPE: span`` line are not mistaken for JSON.
    starts = [i for i in (body.find("["), body.find("{")) if i >= 0]
    end = max(body.rfind("]"), body.rfind("}"))
    if starts and end > min(starts):
        data = _json_container(body[min(starts):end + 1])
        if data is not None and _pairs_from_data(data)[0]:
            return _pairs_from_data(data)
    return None


def _json_container(text: str) -> list | dict | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, (list, dict)) else None


def _pairs_from_data(data) -> tuple[list[tuple[str, str]], bool]:
    """Walk decoded JSON; explicit_empty when it lists no entity at all (``[]``, {"PER": []})."""
    if data is None:
        return [], True
    if isinstance(data, dict):
        lowered = {str(key).lower(): value for key, value in data.items()}
        if set(lowered) == {"entities"}:
            return _pairs_from_data(lowered["entities"])
        pairs = [(str(kind), span) for kind, spans in data.items()
                 for span in (spans if isinstance(spans, list) else [spans])
                 if isinstance(span, str) and not _is_none_answer(span)]
        return pairs, not pairs and all(_is_empty_value(spans) for spans in data.values())
    pairs = []
    for item in data:
        if isinstance(item, dict):
            lowered = {str(key).lower(): value for key, value in item.items()}
            kind = next((lowered[k] for k in _TYPE_KEYS if isinstance(lowered.get(k), str)), None)
            span = next((lowered[k] for k in _TEXT_KEYS if isinstance(lowered.get(k), str)), None)
            if kind is not None and span is not None:
                pairs.append((kind, span))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            pairs.append((item[0], item[1]))
    return pairs, not data


def _is_empty_value(value) -> bool:
    return value is None or value == [] or (isinstance(value, str) and _is_none_answer(value))


def _entities_from_lines(body: str) -> tuple[list[tuple[str, str]], bool]:
    """(pairs, explicit_empty) from ``TYPE: span`` lines; "PERSON: none" is an explicit empty."""
    pairs, explicit_empty = [], False
    for raw_line in body.splitlines():
        line = _LIST_MARKER.sub("", raw_line).replace("**", "").replace("`", "").strip()
        found = _ENTITY_LINE.match(line)
        if not found or not found.group("span").strip():
            continue
        if _is_none_answer(found.group("span")):
            explicit_empty = True
            continue
        pairs.append((found.group("type"), found.group("span")))
    return pairs, explicit_empty


# --------------------------------------------------------------------------- translation


def bleu(hypotheses: list[str], references: list[str], *, tokenize: str = "13a") -> float:
    """Corpus BLEU (sacrebleu, 0–100) against one reference per hypothesis."""
    _check_pairs(hypotheses, references)
    return float(_sacrebleu("BLEU", tokenize=tokenize).corpus_score(hypotheses, [references]).score)


def chrf(hypotheses: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, β=2; 0–100)."""
    _check_pairs(hypotheses, references)
    return float(_sacrebleu("CHRF").corpus_score(hypotheses, [references]).score)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """chrF of one hypothesis against its reference (0–100), a per-example score."""
    return float(_sacrebleu("CHRF").sentence_score(hypothesis, [reference]).score)


def bleu_statistic(hypotheses: list[str], references: list[str], *,
                   tokenize: str = "13a") -> Statistic:
    """Corpus BLEU as a function of resampled example indices.

    Sentence statistics (n-gram matches, lengths) are extracted once and summed per resample,
    as sacrebleu's own paired bootstrap does; equal to ``bleu`` on the resampled lists.
    """
    _check_pairs(hypotheses, references)
    return _sacrebleu_statistic(_sacrebleu("BLEU", tokenize=tokenize), hypotheses, references)


def chrf_statistic(hypotheses: list[str], references: list[str]) -> Statistic:
    """Corpus chrF as a function of resampled example indices (statistics extracted once)."""
    _check_pairs(hypotheses, references)
    return _sacrebleu_statistic(_sacrebleu("CHRF"), hypotheses, references)


def _sacrebleu(name: str, **options) -> BLEU | CHRF:
    """A sacrebleu metric, imported when first used: reading a config (whose ``eval.task``
    choices come from ``eval/tasks.py``, which imports this module) does not load sacrebleu."""
    from sacrebleu import metrics

    return getattr(metrics, name)(**options)


def _sacrebleu_statistic(metric: BLEU | CHRF, hypotheses: list[str],
                         references: list[str]) -> Statistic:
    # sacrebleu 2.x internals, the route its significance module takes; tests pin the
    # equality with corpus_score so an API change fails loudly.
    sentence_stats = np.array(metric._extract_corpus_statistics(hypotheses, [references]),
                              dtype=np.int64)

    def statistic(indices: np.ndarray) -> float:
        summed = sentence_stats[indices].sum(axis=0)
        return float(metric._compute_score_from_stats(summed.tolist()).score)

    return statistic


def _check_pairs(hypotheses: list[str], references: list[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")


# --------------------------------------------------------------------------- question answering


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, articles (a/an/the), extra spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = set(string.punctuation)


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0.

    As in the SQuAD 2.0 script, an empty gold list means "no answer" (gold ``""``).
    """
    return max(float(normalize_answer(prediction) == normalize_answer(gold))
               for gold in golds or [""])


def token_f1(prediction: str, golds: list[str]) -> float:
    """SQuAD token-overlap F1, the maximum over gold answers.

    If either side normalises to no tokens, F1 is 1.0 when both do and 0.0 otherwise (SQuAD 2.0).
    """
    return max(_token_f1(prediction, gold) for gold in golds or [""])


def _token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not predicted_tokens or not gold_tokens:
        return float(predicted_tokens == gold_tokens)
    overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- free text


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (β=1): longest common subsequence of lower-cased word tokens (``\\w+``).

    0.0 when either side has no tokens, as in the rouge-score package.
    """
    predicted_tokens = re.findall(r"\w+", prediction.lower())
    reference_tokens = re.findall(r"\w+", reference.lower())
    if not predicted_tokens or not reference_tokens:
        return 0.0
    common = _lcs_length(predicted_tokens, reference_tokens)
    if common == 0:
        return 0.0
    precision = common / len(predicted_tokens)
    recall = common / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(first: list[str], second: list[str]) -> int:
    """Longest common subsequence length; O(len·len) time, one row of memory."""
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if token == other
                           else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def length_stats(outputs: list[str], references: list[str]) -> dict:
    """Output length in words (mean, median, 90th percentile, max) beside the references'.

    A tuned model that learned the references' style writes answers of their length; a base
    chat model often writes several times more.
    """
    lengths = np.array([len(text.split()) for text in outputs] or [0])
    reference_lengths = np.array([len(text.split()) for text in references] or [0])
    return {"mean_words": round(float(lengths.mean()), 2),
            "median_words": float(np.median(lengths)),
            "p90_words": float(np.percentile(lengths, 90)),
            "max_words": int(lengths.max()),
            "reference_mean_words": round(float(reference_lengths.mean()), 2),
            "empty": int(sum(not text.strip() for text in outputs))}


# --------------------------------------------------------------------------- tool calls

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(text: str) -> tuple[list[dict], bool]:
    """Tool calls in a model output → ([{"name", "arguments"}], failed).

    Accepted: ``<tool_call>`` JSON blocks (tunelab's fallback rendering, Hermes, Qwen2.5), or a
    bare JSON object or list of them with ``name`` and ``arguments`` (``parameters``, as
    Llama 3.1 writes) or OpenAI's ``{"function": {...}}`` shape; arguments given as a JSON string
    are parsed. Plain text is no call (``[]``, not a failure); a call that cannot be read is.
    """
    blocks = _TOOL_CALL_BLOCK.findall(text)
    stripped = text.strip()
    if not blocks and not stripped.startswith(("{", "[")):
        return [], False
    calls = []
    for body in blocks or [stripped]:
        try:  # the first JSON value; a model may write more after it
            data, _ = json.JSONDecoder().raw_decode(body.strip())
        except json.JSONDecodeError:
            return calls, True
        items = data if isinstance(data, list) else [data]
        for item in items:
            call = _tool_call(item)
            if call is None:
                return calls, True
            calls.append(call)
    return calls, False


def _tool_call(item) -> dict | None:
    if not isinstance(item, dict):
        return None
    function = item.get("function") if isinstance(item.get("function"), dict) else item
    name = function.get("name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    return {"name": name, "arguments": arguments}


def tool_calls_match(gold: list[dict], predicted: list[dict], *, names_only: bool = False
                     ) -> bool:
    """Whether two sets of calls are the same: equal names and JSON-equal arguments, any order."""
    if len(gold) != len(predicted):
        return False
    remaining = list(predicted)
    for call in gold:
        match = next((other for other in remaining if other["name"] == call["name"] and
                      (names_only or other["arguments"] == call["arguments"])), None)
        if match is None:
            return False
        remaining.remove(match)
    return True
