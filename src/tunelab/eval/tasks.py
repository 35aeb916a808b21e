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
- generation: free text (chat assistants, anything without a task-specific metric): exact match,
  token F1, ROUGE-L (primary), chrF and semantic similarity (``eval/similarity.py``, when its
  encoder is installed), each with an interval and the paired comparison; output lengths.
- tool_call: the model's tool calls against the reference turn's: exact match of function names
  and JSON-equal arguments (primary), and of the names alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from tunelab.eval import metrics as M
from tunelab.eval.grounding import hallucination_report
from tunelab.eval.stats import Statistic, bootstrap_ci, metric_with_ci, ratio_statistic


@dataclass
class Scored:
    """A task's verdict on one model's outputs for one prompt variant."""

    metrics: dict[str, dict]  # name → {"value", "ci": [lo, hi], "n"}
    per_example: list[float]  # a 0..1 score per example, to rank the worst cases
    paired: Sequence[float] | Statistic  # the primary metric, as the paired comparison takes it
    extra: dict = field(default_factory=dict)  # confusion, per_class, per_type, hallucination
    # other metrics that get a paired comparison too, in the form ``paired`` has
    paired_others: dict[str, Sequence[float] | Statistic] = field(default_factory=dict)


class EvalSettings(Protocol):
    """The eval section's fields a task is built from: ``config.EvalConfig``, which takes its
    ``task`` choices from ``TASKS`` and so cannot be imported here."""

    task: str
    labels: list[str]
    entity_types: list[str]
    bootstrap: int
    seed: int


class Task:
    """One task kind. Subclasses set ``primary`` and implement ``score`` (and ``parse``).

    ``TASKS`` below is the one registry: the config's choices for ``eval.task`` come from it,
    and the pipeline asks the class (never the kind's name) what the kind needs and allows.
    ``Task.from_config`` is the one place a task is built from an eval section.
    """

    kind: ClassVar[str]
    primary: ClassVar[str]
    #: eval config fields this kind cannot do without, e.g. ("labels",)
    requires: ClassVar[tuple[str, ...]] = ()
    #: answers are a closed set of labels that can be scored by log-likelihood (predict: score)
    scores_labels: ClassVar[bool] = False
    #: the primary metric is a per-example right/wrong, so McNemar's exact test compares models
    exact_test: ClassVar[bool] = False

    def __init__(self, *, labels: list[str] | None = None, entity_types: list[str] | None = None,
                 n_resamples: int = 1000, seed: int = 0):
        self.labels = labels or []
        self.entity_types = entity_types or []
        self.n_resamples = n_resamples
        self.seed = seed

    @staticmethod
    def from_config(eval_cfg: EvalSettings) -> Task:
        """The registered kind ``eval_cfg.task`` with the section's labels, entity types and
        bootstrap settings (resamples, seed)."""
        return TASKS[eval_cfg.task](labels=eval_cfg.labels, entity_types=eval_cfg.entity_types,
                                    n_resamples=eval_cfg.bootstrap, seed=eval_cfg.seed)

    def parse(self, output: str) -> tuple[Any, bool]:
        """(prediction, failed) for one raw model output; an empty output is a failure."""
        text = output.strip()
        return text, not text

    def gold(self, text: str) -> Any:
        """The gold answer from the rendered gold completion."""
        return text.strip()

    def score(self, golds: list, predictions: list, contexts: list[str | None]) -> Scored:
        raise NotImplementedError

    def _metric(self, values: Sequence[float] | Statistic, n: int) -> dict:
        if callable(values):
            return metric_with_ci(statistic=values, n=n, n_resamples=self.n_resamples,
                                  seed=self.seed)
        return metric_with_ci(values, n_resamples=self.n_resamples, seed=self.seed)


class Classification(Task):
    kind, primary = "classification", "accuracy"
    requires, scores_labels, exact_test = ("labels",), True, True

    def parse(self, output: str) -> tuple[Any, bool]:
        label = M.parse_label(output, self.labels)
        return label, label is None

    def score(self, golds, predictions, contexts) -> Scored:
        report = M.classification_metrics(golds, predictions, self.labels)
        correct = [float(ok) for ok in report["per_example_correct"]]
        metrics = {"accuracy": self._metric(correct, len(golds)),
                   "macro_f1": self._metric(M.macro_f1_statistic(golds, predictions, self.labels),
                                            len(golds))}
        return Scored(metrics, correct, correct,
                      {"confusion": report["confusion"], "per_class": report["per_class"]})


class NER(Task):
    kind, primary = "ner", "f1"

    def parse(self, output: str) -> tuple[Any, bool]:
        return M.parse_entities(output, self.entity_types or None)

    def gold(self, text: str) -> Any:
        return M.parse_entities(text, self.entity_types or None)[0]

    def score(self, golds, predictions, contexts) -> Scored:
        sets = [p or set() for p in predictions]
        report = M.entity_f1(golds, sets)
        micro_f1 = M.entity_f1_statistic(golds, sets)
        hits = [len(g & p) for g, p in zip(golds, sets, strict=True)]
        metrics = {
            "f1": self._metric(micro_f1, len(golds)),
            "precision": self._metric(ratio_statistic(hits, [len(p) for p in sets]), len(golds)),
            "recall": self._metric(ratio_statistic(hits, [len(g) for g in golds]), len(golds)),
        }
        extra = {"per_type": report["per_type"],
                 "hallucination": _hallucination([[span for _, span in sorted(s)] for s in sets],
                                                 contexts, self)}
        return Scored(metrics, report["per_example_f1"], micro_f1, extra)


class Translation(Task):
    kind, primary = "translation", "chrf"

    def score(self, golds, predictions, contexts) -> Scored:
        hypotheses = [p or "" for p in predictions]
        chrf = M.chrf_statistic(hypotheses, golds)
        metrics = {"chrf": self._metric(chrf, len(golds)),
                   "bleu": self._metric(M.bleu_statistic(hypotheses, golds), len(golds))}
        per_example = [M.sentence_chrf(h, r) / 100
                       for h, r in zip(hypotheses, golds, strict=True)]
        return Scored(metrics, per_example, chrf)


class QA(Task):
    kind, primary = "qa", "exact_match"

    def score(self, golds, predictions, contexts) -> Scored:
        answers = [p or "" for p in predictions]
        gold_lists = [g if isinstance(g, list) else [g] for g in golds]
        em = [M.exact_match(a, g) for a, g in zip(answers, gold_lists, strict=True)]
        f1 = [M.token_f1(a, g) for a, g in zip(answers, gold_lists, strict=True)]
        extra = {"hallucination": _hallucination([[a] if a else [] for a in answers], contexts,
                                                 self)}
        metrics = {"exact_match": self._metric(em, len(em)), "token_f1": self._metric(f1, len(f1))}
        return Scored(metrics, em, em, extra)


class Summarisation(Task):
    kind, primary = "summarisation", "rouge_l"

    def score(self, golds, predictions, contexts) -> Scored:
        rouge = [M.rouge_l(p or "", g) for p, g in zip(predictions, golds, strict=True)]
        return Scored({"rouge_l": self._metric(rouge, len(rouge))}, rouge, rouge)


class Generation(Task):
    kind, primary = "generation", "rouge_l"

    def score(self, golds, predictions, contexts) -> Scored:
        from tunelab.eval.similarity import INSTALL, encoder_available, semantic_similarity

        outputs = [p or "" for p in predictions]
        pairs = list(zip(outputs, golds, strict=True))
        per_metric: dict[str, Sequence[float] | Statistic] = {
            "rouge_l": [M.rouge_l(o, g) for o, g in pairs],
            "exact_match": [M.exact_match(o, [g]) for o, g in pairs],
            "token_f1": [M.token_f1(o, [g]) for o, g in pairs],
            "chrf": M.chrf_statistic(outputs, golds),
        }
        extra = {"output_length": M.length_stats(outputs, golds)}
        if encoder_available():
            per_metric["semantic_similarity"] = semantic_similarity(outputs, golds)
        else:
            extra["notes"] = [f"semantic_similarity not computed: {INSTALL}"]
        metrics = {name: self._metric(values, len(golds)) for name, values in per_metric.items()}
        rouge = per_metric.pop("rouge_l")
        return Scored(metrics, rouge, rouge, extra, paired_others=per_metric)


class ToolCall(Task):
    kind, primary = "tool_call", "exact_match"
    exact_test = True

    def parse(self, output: str) -> tuple[Any, bool]:
        return M.parse_tool_calls(output)

    def gold(self, text: str) -> Any:
        return M.parse_tool_calls(text)[0]

    def score(self, golds, predictions, contexts) -> Scored:
        calls = [p or [] for p in predictions]
        pairs = list(zip(golds, calls, strict=True))
        exact = [float(M.tool_calls_match(g, p)) for g, p in pairs]
        names = [float(M.tool_calls_match(g, p, names_only=True)) for g, p in pairs]
        metrics = {"exact_match": self._metric(exact, len(exact)),
                   "name_match": self._metric(names, len(names))}
        extra = {"no_call": sum(not p for p in calls)}
        return Scored(metrics, exact, exact, extra, paired_others={"name_match": names})


def _hallucination(spans: list[list[str]], contexts: list[str | None], task: Task) -> dict | None:
    """Share of predicted spans absent from the input, with a span-weighted interval."""
    if not any(contexts):
        return None
    items = [{"index": i, "source": c, "spans": s}
             for i, (s, c) in enumerate(zip(spans, contexts, strict=True)) if c]
    report = hallucination_report(items)
    n_spans = report.pop("per_example_n_spans")
    unsupported = [share * count for share, count in zip(report.pop("per_example"), n_spans,
                                                         strict=True)]
    report.pop("per_example_index")
    report["ci"] = (bootstrap_ci(statistic=ratio_statistic(unsupported, n_spans), n=len(n_spans),
                                 n_resamples=task.n_resamples, seed=task.seed)
                    if n_spans else [0.0, 0.0])
    return report


TASKS: dict[str, type[Task]] = {cls.kind: cls for cls in
                                (Classification, NER, Translation, QA, Summarisation,
                                 Generation, ToolCall)}
