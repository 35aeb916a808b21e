"""Grounding: copied spans are supported despite surface noise; paraphrases are not."""

import pytest

from tunelab.eval.grounding import hallucination_report, unsupported_spans

SOURCE = "Ada Lovelace met Charles Babbage in London. O'Brien read the ﬁnal report on ＩＢＭ."


@pytest.mark.parametrize("span", [
    "Ada Lovelace", "ada lovelace", "ADA  LOVELACE", "Ada\nLovelace",  # case and whitespace
    "London.", "\"Charles Babbage\"", "(London)", "London,",  # surrounding punctuation
    "O’Brien",  # curly apostrophe in the span, straight in the source
    "final", "IBM",  # NFKC: the ﬁ ligature and full-width letters
    "Babbage in London",
])
def test_surface_variants_of_a_copied_span_are_supported(span):
    assert unsupported_spans([span], SOURCE) == []


@pytest.mark.parametrize("span", [
    "Countess of Lovelace", "the English capital", "Babbage, Charles", "Lovelace Ada",
    "Lond",  # part of a word
    "Charles Babbage met Ada Lovelace",
])
def test_paraphrases_and_partial_words_are_unsupported(span):
    assert unsupported_spans([span], SOURCE) == [span]


def test_whole_word_rule_and_scripts_without_spaces():
    assert unsupported_spans(["Paris"], "A Parisian café.") == ["Paris"]
    assert unsupported_spans(["Paris"], "Paris-based, Paris's") == []
    assert unsupported_spans(["北京"], "我在北京工作。") == []
    assert unsupported_spans(["上海"], "我在北京工作。") == ["上海"]


def test_empty_spans_are_ignored_and_order_is_kept():
    spans = ["", "  ", "...", "Paris", "Ada", "Rome"]
    assert unsupported_spans(spans, "Ada went home.") == ["Paris", "Rome"]


def test_hallucination_report_counts_spans_and_lists_worst_examples_first():
    items = [
        {"index": 0, "source": "Ada Lovelace met Babbage.", "spans": ["Ada Lovelace", "Babbage"]},
        {"index": 1, "source": "Paris is in France.", "spans": ["Paris", "Berlin", "Rome"]},
        {"index": 2, "source": "No entities here.", "spans": []},
        {"index": 3, "source": "Tokyo " * 100, "spans": ["Tokyo", "Kyoto"]},
        {"index": 4, "source": "Q: who?", "spans": [""]},  # empty answer: no span
    ]
    report = hallucination_report(items)
    assert (report["n_spans"], report["n_unsupported"]) == (7, 3)
    assert report["rate"] == pytest.approx(3 / 7)
    assert report["per_example"] == pytest.approx([0.0, 2 / 3, 1 / 2])
    assert report["per_example_index"] == [0, 1, 3]
    assert report["per_example_n_spans"] == [2, 3, 2]
    assert [e["index"] for e in report["examples"]] == [1, 3]
    assert report["examples"][0]["unsupported"] == ["Berlin", "Rome"]
    assert len(report["examples"][1]["source"]) == 300
    assert report["examples"][1]["source"].endswith("…")


def test_hallucination_report_limits_examples_and_handles_no_spans():
    items = [{"index": i, "source": "text", "spans": [f"made up {i}"]} for i in range(8)]
    assert len(hallucination_report(items, max_examples=3)["examples"]) == 3
    empty = hallucination_report([{"index": 0, "source": "text", "spans": []}])
    assert empty == {"rate": 0.0, "n_spans": 0, "n_unsupported": 0, "per_example": [],
                     "per_example_index": [], "per_example_n_spans": [], "examples": []}
