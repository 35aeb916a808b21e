"""quality_report: duplicates, near-duplicates, leakage, balance, lengths, empty targets."""

import dataclasses
import json
import random
import string

from rich.console import Console

from tunelab.data.formats import Example, Message, Segment
from tunelab.data.quality import leaked_examples, quality_report, render_quality_report

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n"
)


def random_words(rng, n):
    return " ".join(
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        for _ in range(n)
    )


def text_example(text, line, source="train.jsonl"):
    return Example("text", source, line, segments=[Segment(text, True)])


def labelled(prompt, label, line, source="train.jsonl"):
    return Example(
        "template",
        source,
        line,
        segments=[Segment(prompt, False), Segment(f" {label}", True)],
        label=label,
    )


def one_word_changed(text, position=20):
    words = text.split()
    words[position] = "changed"
    return " ".join(words)


def test_exact_duplicates_are_grouped_with_their_places():
    train = [text_example(t, i + 1) for i, t in enumerate(["a b", "c d", "a b", "e f", "a b"])]
    duplicates = quality_report(train)["splits"]["train"]["exact_duplicates"]
    assert duplicates["n_groups"] == 1 and duplicates["redundant"] == 2
    assert duplicates["groups"][0]["places"] == ["train.jsonl:1", "train.jsonl:3", "train.jsonl:5"]


def test_place_lists_are_cut_to_ten_but_counts_are_complete():
    train = [text_example(f"text {i // 2}", i + 1) for i in range(30)]  # 15 pairs
    report = quality_report(train)
    duplicates = report["splits"]["train"]["exact_duplicates"]
    assert duplicates["n_groups"] == 15 and duplicates["redundant"] == 15
    assert len(duplicates["groups"]) == 10
    assert "15 exact duplicates in train" in report["warnings"][0]
    json.dumps(report)  # plain data, ready for --json


def test_near_duplicate_differing_in_one_word_among_40_is_found_and_unrelated_are_not():
    rng = random.Random(0)
    texts = [random_words(rng, 40) for _ in range(30)]
    texts.append(one_word_changed(texts[4]))
    report = quality_report([text_example(t, i + 1) for i, t in enumerate(texts)])
    near = report["splits"]["train"]["near_duplicates"]
    assert near["count"] == 1
    pair = near["pairs"][0]
    assert (pair["a"], pair["b"]) == ("train.jsonl:5", "train.jsonl:31")
    assert 0.8 <= pair["similarity"] < 1
    assert any(w.startswith("1 near-duplicate pair in train") for w in report["warnings"])


def test_a_long_shared_system_prompt_neither_hides_nor_fakes_near_duplicates():
    # 1,800 characters of system prompt in every example would make all pairs look alike
    rng = random.Random(1)
    system = random_words(rng, 300)
    questions = [random_words(rng, 25) for _ in range(100)]
    questions.append(one_word_changed(questions[10], position=12))
    train = [
        Example(
            "chat",
            "train.jsonl",
            i + 1,
            messages=[
                Message("system", system),
                Message("user", question),
                Message("assistant", "Sure."),
            ],
        )
        for i, question in enumerate(questions)
    ]
    near = quality_report(train)["splits"]["train"]["near_duplicates"]
    assert near["count"] == 1
    assert (near["pairs"][0]["a"], near["pairs"][0]["b"]) == ("train.jsonl:11", "train.jsonl:101")


def test_near_duplicates_among_20k_examples_compare_few_pairs(monkeypatch):
    """Work, not time: MinHash LSH proposes a handful of candidate pairs among 20,001 texts
    (about 20 here), not the 2·10⁸ of comparing every pair, and only those are checked exactly."""
    from tunelab.data import quality

    examined = {"candidates": 0, "exact": 0}
    real_candidates, real_exact = quality._lsh_candidates, quality._exact_jaccard

    def counted_candidates(*args, **kwargs):
        left, right = real_candidates(*args, **kwargs)
        examined["candidates"] += len(left)
        return left, right

    def counted_exact(text_ids, hashes, left, right, n_texts):
        examined["exact"] += len(left)
        return real_exact(text_ids, hashes, left, right, n_texts)

    monkeypatch.setattr(quality, "_lsh_candidates", counted_candidates)
    monkeypatch.setattr(quality, "_exact_jaccard", counted_exact)
    rng = random.Random(5)
    vocabulary = [random_words(rng, 1) for _ in range(5000)]
    texts = [" ".join(rng.choices(vocabulary, k=40)) for _ in range(20_000)]
    texts.append(one_word_changed(texts[123]))
    train = [text_example(t, i + 1) for i, t in enumerate(texts)]
    near = quality_report(train)["splits"]["train"]["near_duplicates"]
    assert near["count"] == 1 and near["pairs"][0]["b"] == "train.jsonl:20001"
    assert 1 <= examined["exact"] <= examined["candidates"] < 1_000  # all pairs: 200,010,000


def test_exact_duplicates_are_not_reported_as_near_duplicates():
    rng = random.Random(2)
    text = random_words(rng, 40)
    report = quality_report([text_example(text, 1), text_example(text, 2)])
    assert report["splits"]["train"]["near_duplicates"]["count"] == 0


def test_leakage_exact_near_and_by_prompt():
    rng = random.Random(3)
    reviews = [random_words(rng, 30) for _ in range(40)]
    train = [labelled(f"Review: {r}\nSentiment:", "pos", i + 1) for i, r in enumerate(reviews)]
    validation = [
        labelled(f"Review: {reviews[0]}\nSentiment:", "pos", 1, "valid.jsonl"),  # exact copy
        labelled(f"Review: {reviews[1]}\nSentiment:", "neg", 2, "valid.jsonl"),  # same input
        text_example(
            one_word_changed(f"Review: {reviews[2]}\nSentiment: pos", 10), 3, "valid.jsonl"
        ),  # near copy
        labelled(f"Review: {random_words(rng, 30)}\nSentiment:", "pos", 4, "valid.jsonl"),
    ]
    report = quality_report(train, validation)
    assert list(report["leakage"]) == ["train/validation"]
    leakage = report["leakage"]["train/validation"]
    assert leakage["exact"]["count"] == 1
    assert leakage["exact"]["places"] == [{"validation": "valid.jsonl:1", "train": "train.jsonl:1"}]
    assert leakage["near"]["count"] == 2  # the changed word, and the same review relabelled
    assert {pair["b"] for pair in leakage["near"]["pairs"]} == {"valid.jsonl:2", "valid.jsonl:3"}
    assert leakage["prompt_overlap"]["count"] == 1
    assert leakage["prompt_overlap"]["places"][0]["validation"] == "valid.jsonl:2"


def test_every_pair_of_splits_is_checked_for_leakage_into_the_test_split():
    """A test review that is also in train, another that is in validation, and a test prompt
    shared with train: each is reported against the split it leaks from, with a warning."""
    rng = random.Random(4)
    reviews = [random_words(rng, 30) for _ in range(30)]
    train = [labelled(f"Review: {r}\nSentiment:", "pos", i + 1) for i, r in enumerate(reviews)]
    validation = [labelled(f"Review: {random_words(rng, 30)}\nSentiment:", "neg", i + 1,
                           "valid.jsonl") for i in range(5)]
    test = [
        labelled(f"Review: {random_words(rng, 30)}\nSentiment:", "pos", 1, "test.jsonl"),
        labelled(f"Review: {reviews[7]}\nSentiment:", "pos", 2, "test.jsonl"),  # train copy
        dataclasses.replace(validation[3], source="test.jsonl", line=3),  # validation copy
        labelled(f"Review: {reviews[9]}\nSentiment:", "neg", 4, "test.jsonl"),  # train input
    ]
    report = quality_report(train, validation, test)
    leakage = report["leakage"]
    assert list(leakage) == ["train/validation", "train/test", "validation/test"]
    assert leakage["train/validation"]["exact"]["count"] == 0
    assert leakage["train/test"]["exact"]["places"] == [
        {"test": "test.jsonl:2", "train": "train.jsonl:8"}]
    assert leakage["train/test"]["prompt_overlap"]["places"][0]["test"] == "test.jsonl:4"
    assert leakage["validation/test"]["exact"]["places"] == [
        {"test": "test.jsonl:3", "validation": "valid.jsonl:4"}]
    warnings = " ".join(report["warnings"])
    assert "test example also appears in train" in warnings
    assert "test example also appears in validation" in warnings
    console = Console(record=True, width=140)
    render_quality_report(report, console)
    assert "validation → test" in console.export_text()


def test_leaked_examples_name_each_leaking_test_example_and_its_source():
    rng = random.Random(5)
    reviews = [random_words(rng, 30) for _ in range(20)]
    train = [labelled(f"Review: {r}\nSentiment:", "pos", i + 1) for i, r in enumerate(reviews)]
    test = [
        labelled(f"Review: {reviews[3]}\nSentiment:", "pos", 1, "test.jsonl"),
        labelled(f"Review: {random_words(rng, 30)}\nSentiment:", "pos", 2, "test.jsonl"),
        text_example(one_word_changed(f"Review: {reviews[5]}\nSentiment: pos", 10), 3,
                     "test.jsonl"),
        labelled(f"Review: {reviews[11]}\nSentiment:", "neg", 4, "test.jsonl"),
    ]
    leaked = leaked_examples(train, test)
    assert sorted(leaked) == [0, 2, 3]
    assert leaked[0] == {"kind": "same text", "source": "train.jsonl:4"}
    assert leaked[2]["kind"] == "near-duplicate" and leaked[2]["source"] == "train.jsonl:6"
    assert leaked[3]["kind"] in ("near-duplicate", "same prompt")
    assert leaked[3]["source"] == "train.jsonl:12"
    assert leaked_examples(train, test[1:2]) == {}


def test_label_balance_and_a_warning_for_a_rare_label():
    labels = ["positive"] * 60 + ["negative"] * 37 + ["neutral"] * 3
    train = [labelled(f"Review {i}:", label, i + 1) for i, label in enumerate(labels)]
    report = quality_report(train)
    balance = report["splits"]["train"]["label_balance"]
    assert balance["counts"] == {"positive": 60, "negative": 37, "neutral": 3}
    assert balance["shares"]["neutral"] == 0.03
    assert balance["imbalance_ratio"] == 20
    rare = [w for w in report["warnings"] if w.startswith("label ")]
    assert len(rare) == 1 and "label 'neutral' is 3.0% of train" in rare[0]


def test_label_balance_is_skipped_past_50_labels():
    train = [labelled(f"Question {i}?", f"answer {i}", i + 1) for i in range(60)]
    balance = quality_report(train)["splits"]["train"]["label_balance"]
    assert balance["n_labels"] == 60 and balance["counts"] is None


def test_label_seen_only_in_validation_is_flagged():
    train = [labelled(f"Review {i}:", "pos" if i % 2 else "neg", i + 1) for i in range(10)]
    validation = [labelled("Another review:", "neutral", 1, "valid.jsonl")]
    warnings = quality_report(train, validation)["warnings"]
    assert any("label 'neutral' appears in validation" in w for w in warnings)


def test_token_length_percentiles_and_truncation_share():
    train = [text_example(f"text number {i}", i + 1) for i in range(8)]
    lengths = [100, 200, 300, 400, 500, 600, 700, 800]
    report = quality_report(train, token_lengths={"train": lengths}, max_seq_len=512)
    stats = report["splits"]["train"]
    assert stats["token_length"]["min"] == 100 and stats["token_length"]["max"] == 800
    assert stats["token_length"]["p50"] == 450 and stats["token_length"]["mean"] == 450
    assert stats["truncated"] == {"max_seq_len": 512, "count": 3, "share": 0.375}
    assert any(
        w.startswith("37.5% of train examples (3) are longer than max_seq_len=512")
        for w in report["warnings"]
    )


def test_empty_targets_are_listed():
    train = [
        labelled("Review: fine", "pos", 1),
        Example("completion", "train.jsonl", 2, segments=[Segment("Q", False), Segment(" ", True)]),
        Example(
            "chat", "train.jsonl", 3, messages=[Message("user", "hi"), Message("assistant", "")]
        ),
    ]
    report = quality_report(train)
    assert report["splits"]["train"]["empty_targets"] == {
        "count": 2,
        "places": ["train.jsonl:2", "train.jsonl:3"],
    }
    assert any("2 train examples have an empty target" in w for w in report["warnings"])


def test_same_prompt_with_different_targets_inside_a_split():
    train = [
        labelled("Review: ok\nSentiment:", "pos", 1),
        labelled("Review: ok\nSentiment:", "neg", 2),
        labelled("Review: bad\nSentiment:", "neg", 3),
    ]
    conflicts = quality_report(train)["splits"]["train"]["conflicting_targets"]
    assert conflicts["count"] == 1
    assert conflicts["groups"][0]["places"] == ["train.jsonl:1", "train.jsonl:2"]


def test_clean_data_has_no_warnings_and_renders():
    rng = random.Random(4)
    train = [labelled(random_words(rng, 20), "pos" if i % 2 else "neg", i + 1) for i in range(20)]
    report = quality_report(train)
    assert report["warnings"] == []
    console = Console(record=True, width=100)
    render_quality_report(report, console)
    assert "No problems found" in console.export_text()


def test_render_shows_counts_and_warnings():
    train = [text_example("same text", 1), text_example("same text", 2)]
    report = quality_report(train, [text_example("same text", 1, "valid.jsonl")])
    console = Console(record=True, width=120)
    render_quality_report(report, console)
    output = console.export_text()
    assert "validation" in output and "Warnings" in output
    assert "valid.jsonl:1" in output
