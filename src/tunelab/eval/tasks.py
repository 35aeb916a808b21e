"""Task kinds: how a model's answer is obtained and parsed, and which metrics score it.

Each kind turns (gold texts, model outputs) into metrics with bootstrap intervals, per-example
scores for paired comparisons, and a count of outputs that could not be parsed — never dropped.

- classification: each label scored by log-likelihood (``predict: score``, the default), or
  generated and parsed (``generate``); accuracy, macro-F1, per-class P/R/F1, confusion matrix.
- ner: the model writes one ``TYPE: span`` line per entity (JSON is accepted too);
  entity-level micro P/R/F1 on exact (type, span) matches, per type; hallucinated spans.
- translation: BLEU and chrF (sacrebleu), per-example chrF for the paired comparison.
- qa: SQuAD exact match and token F1; answers not found in the context count as hallucinated.
- summarisation: ROUGE-L F.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from tunelab.eval import metrics as M
from tunelab.eval.grounding import hallucination_report
from tunelab.eval.stats import bootstrap_ci


@dataclass
class Scored:
    """A task's verdict on one model's outputs for one prompt variant."""

    metrics: dict[str, dict]  # name → {"value", "ci", "n"}
    per_example: list[float]  # the primary per-example score (0..1) for paired comparisons
    extra: dict = field(default_factory=dict)  # confusion, per_class, hallucination


class Task:
    """One task kind. Subclasses set ``primary`` and implement ``parse`` and ``score``."""

    kind: ClassVar[str]
    primary: ClassVar[str]
    generates: ClassVar[bool] = True

    def __init__(self, *, labels: list[str] | None = None, entity_types: list[str] | None = None,
                 n_resamples: int = 1000, seed: int = 0):
        self.labels = labels or []
        self.entity_types = entity_types or []
        self.n_resamples = n_resamples
        self.seed = seed

    def parse(self, output: str) -> tuple[Any, bool]:
        """(prediction, failed) for one raw model output."""
        text = output.strip()
        return text, not text

    def gold(self, text: str) -> Any:
        """The gold answer from the rendered gold completion."""
        return text.strip()

    def score(self, golds: list, predictions: list, contexts: list[str | None]) -> Scored:
        raise NotImplementedError

    def _ci(self, per_example: list[float] | None = None, statistic=None, n: int = 0) -> dict:
        values = per_example if per_example is not None else None
        n = len(values) if values is not None else n
        if values is not None:
            value = float(np.mean(values)) if n else 0.0
            low, high = bootstrap_ci(values, n_resamples=self.n_resamples, seed=self.seed) \
                if n else (0.0, 0.0)
        else:
            value = float(statistic(np.arange(n)))
            low, high = bootstrap_ci(statistic=statistic, n=n, n_resamples=self.n_resamples,
                                     seed=self.seed)
        return {"value": value, "ci": [float(low), float(high)], "n": n}


class Classification(Task):
    kind, primary = "classification", "accuracy"

    def parse(self, output: str) -> tuple[Any, bool]:
        label = M.parse_label(output, self.labels)
        return label, label is None

    def score(self, golds, predictions, contexts) -> Scored:
        correct = [float(p == g) for g, p in zip(golds, predictions, strict=True)]
        report = M.classification_metrics(golds, predictions, self.labels)
        gold_array = np.array(golds, dtype=object)
        pred_array = np.array(predictions, dtype=object)
        macro = lambda idx: M.macro_f1(list(gold_array[idx]), list(pred_array[idx]),  # noqa: E731
                                       self.labels)
        metrics = {"accuracy": self._ci(correct),
                   "macro_f1": self._ci(statistic=macro, n=len(golds))}
        return Scored(metrics, correct,
                      {"confusion": report["confusion"], "per_class": report["per_class"]})


class NER(Task):
    kind, primary = "ner", "f1"

    def parse(self, output: str) -> tuple[Any, bool]:
        entities, failed = M.parse_entities(output, self.entity_types or None)
        return entities, failed

    def gold(self, text: str) -> Any:
        return M.parse_entities(text, self.entity_types or None)[0]

    def score(self, golds, predictions, contexts) -> Scored:
        sets = [p or set() for p in predictions]
        report = M.entity_f1(golds, sets)
        gold_array, pred_array = np.array(golds, dtype=object), np.array(sets, dtype=object)
        part = lambda key: lambda idx: M.entity_f1(list(gold_array[idx]),  # noqa: E731
                                                   list(pred_array[idx]))[key]
        metrics = {key: self._ci(statistic=part(key), n=len(golds))
                   for key in ("f1", "precision", "recall")}
        extra = {"per_type": report.get("per_type", {})}
        extra["hallucination"] = _hallucination(
            [[span for _, span in sorted(s)] for s in sets], contexts, self)
        return Scored(metrics, list(report["per_example_f1"]), extra)


class Translation(Task):
    kind, primary = "translation", "chrf"

    def score(self, golds, predictions, contexts) -> Scored:
        hyps = [p or "" for p in predictions]
        hyp_array, ref_array = np.array(hyps, dtype=object), np.array(golds, dtype=object)
        corpus = lambda fn: lambda idx: fn(list(hyp_array[idx]), list(ref_array[idx]))  # noqa
        metrics = {"chrf": self._ci(statistic=corpus(M.chrf), n=len(golds)),
                   "bleu": self._ci(statistic=corpus(M.bleu), n=len(golds))}
        per_example = [M.sentence_chrf(h, r) / 100 for h, r in zip(hyps, golds, strict=True)]
        return Scored(metrics, per_example)


class QA(Task):
    kind, primary = "qa", "exact_match"

    def score(self, golds, predictions, contexts) -> Scored:
        answers = [p or "" for p in predictions]
        gold_lists = [g if isinstance(g, list) else [g] for g in golds]
        em = [M.exact_match(a, g) for a, g in zip(answers, gold_lists, strict=True)]
        f1 = [M.token_f1(a, g) for a, g in zip(answers, gold_lists, strict=True)]
        extra = {"hallucination": _hallucination([[a] if a else [] for a in answers], contexts,
                                                 self)}
        return Scored({"exact_match": self._ci(em), "token_f1": self._ci(f1)}, em, extra)


class Summarisation(Task):
    kind, primary = "summarisation", "rouge_l"

    def score(self, golds, predictions, contexts) -> Scored:
        outputs = [p or "" for p in predictions]
        rouge = [M.rouge_l(o, g) for o, g in zip(outputs, golds, strict=True)]
        return Scored({"rouge_l": self._ci(rouge)}, rouge)


def _hallucination(spans: list[list[str]], contexts: list[str | None], task: Task) -> dict | None:
    if not any(c for c in contexts):
        return None
    items = [{"index": i, "source": c or "", "spans": s}
             for i, (s, c) in enumerate(zip(spans, contexts, strict=True)) if c]
    report = hallucination_report(items)
    per_example = report.get("per_example") or []
    report["ci"] = list(bootstrap_ci(per_example, n_resamples=task.n_resamples, seed=task.seed)) \
        if per_example else [0.0, 0.0]
    report.pop("per_example", None)
    return report


TASKS: dict[str, type[Task]] = {cls.kind: cls for cls in
                                (Classification, NER, Translation, QA, Summarisation)}
