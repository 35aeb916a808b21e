"""Task metrics and output parsing: hand-computed expectations, sacrebleu and SQuAD behaviour."""

import numpy as np
import pytest
import sacrebleu

from tunelab.eval.metrics import (
    bleu,
    bleu_statistic,
    chrf,
    chrf_statistic,
    classification_metrics,
    entity_f1,
    entity_f1_statistic,
    exact_match,
    format_entities,
    macro_f1,
    macro_f1_statistic,
    normalize_answer,
    parse_entities,
    parse_label,
    rouge_l,
    sentence_chrf,
    token_f1,
)

LABELS = ["positive", "negative", "neutral"]

# ----------------------------------------------------------------------------- classification

GOLD = ["positive", "positive", "positive", "negative", "negative", "neutral"]
PREDICTED = ["positive", "positive", "negative", "negative", None, "positive"]


def test_classification_metrics_match_hand_computation():
    result = classification_metrics(GOLD, PREDICTED, LABELS)
    # positive: tp 2 of 3 predicted, 3 gold; negative: tp 1 of 2 predicted, 2 gold; neutral: 0.
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["per_class"]["positive"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert result["per_class"]["negative"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2})
    assert result["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                              "support": 1}
    assert result["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert result["n_unparsed"] == 1
    assert result["per_example_correct"] == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_confusion_matrix_has_an_unparsed_column_only_when_needed():
    confusion = classification_metrics(GOLD, PREDICTED, LABELS)["confusion"]
    assert confusion["labels"] == LABELS + ["(unparsed)"]
    assert confusion["matrix"] == [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    clean = classification_metrics(GOLD, GOLD, LABELS)["confusion"]
    assert clean == {"labels": LABELS, "matrix": [[3, 0, 0], [0, 2, 0], [0, 0, 1]]}


def test_macro_f1_statistic_equals_macro_f1_on_the_resampled_lists():
    assert macro_f1(GOLD, PREDICTED, LABELS) == pytest.approx(7 / 18)
    statistic = macro_f1_statistic(GOLD, PREDICTED, LABELS)
    indices = np.array([0, 0, 3, 5, 4, 4])
    expected = macro_f1([GOLD[i] for i in indices], [PREDICTED[i] for i in indices], LABELS)
    assert statistic(indices) == pytest.approx(expected)


def test_classification_rejects_values_outside_the_labels():
    with pytest.raises(ValueError, match="not among labels"):
        classification_metrics(["positive"], ["great"], LABELS)


@pytest.mark.parametrize("text, expected", [
    (" Positive.", "positive"),
    ("NEGATIVE", "negative"),
    ("'neutral'", "neutral"),
    ("**Positive**", "positive"),
    ("Positive, though the ending drags", "positive"),
    ("Negative\nThe acting is not positive at all", "negative"),
    ("The sentiment is negative", "negative"),
    ("positive or negative", None),
    ("I cannot tell", None),
    ("", None),
    ("positively", None),
])
def test_parse_label(text, expected):
    assert parse_label(text, LABELS) == expected


def test_parse_label_prefers_the_longer_label_that_contains_another():
    labels = ["entailment", "not_entailment"]
    assert parse_label("not entailment", labels) == "not_entailment"
    assert parse_label("Answer: entailment", labels) == "entailment"
    assert parse_label("Very positive!", ["positive", "very positive"]) == "very positive"


# ----------------------------------------------------------------------------- named entities


@pytest.mark.parametrize("text", [
    "PERSON: Ada Lovelace\nLOC: London",
    "person: Ada Lovelace\nLoc: London.",
    "- PERSON: Ada   Lovelace\n- LOC: London",
    "1. **PERSON**: \"Ada Lovelace\"\n2) LOC: London;",
    "Entities:\n```\nPERSON: Ada Lovelace\nLOC: London\n```",
    '[{"type": "PERSON", "text": "Ada Lovelace"}, {"type": "loc", "text": "London"}]',
    '```json\n{"PERSON": ["Ada Lovelace"], "LOC": ["London"], "ORG": []}\n```',
    'Here they are: {"entities": [{"type": "PERSON", "text": "Ada Lovelace"}, '
    '{"type": "LOC", "text": "London"}]}',
])
def test_parse_entities_accepts_documented_and_tolerated_formats(text):
    assert parse_entities(text) == ({("PERSON", "Ada Lovelace"), ("LOC", "London")}, False)


@pytest.mark.parametrize("text", ["", "  ", "none", "None.", "No entities", "[]", "{}",
                                  "PERSON: none", '{"PERSON": []}'])
def test_explicit_empty_answers_are_not_failures(text):
    assert parse_entities(text) == (set(), False)


@pytest.mark.parametrize("text", ["I could not find anything useful.", "[1, 2]",
                                  '[{"name": "Ada"}]'])
def test_unparseable_output_is_a_failure(text):
    assert parse_entities(text) == (set(), True)


def test_parse_entities_keeps_only_known_types_when_given():
    text = "PERSON: Ada\nFOOD: Cake"
    assert parse_entities(text, types=["person", "LOC"]) == ({("PERSON", "Ada")}, False)
    assert parse_entities("FOOD: Cake", types=["PERSON"]) == (set(), True)


def test_format_entities_round_trips_through_parse_entities():
    entities = {("PERSON", "Ada Lovelace"), ("LOC", "London"), ("ORG", "Royal Society")}
    text = format_entities(entities)
    assert text == "LOC: London\nORG: Royal Society\nPERSON: Ada Lovelace"
    assert parse_entities(text) == (entities, False)
    assert format_entities([("per", " Bob "), ("LOC", "Paris")]) == "PER: Bob\nLOC: Paris"
    assert format_entities(set()) == "none"
    assert parse_entities(format_entities(set())) == (set(), False)


def test_entity_f1_matches_seqeval_readme_example():
    # seqeval README: y_true ex0 = O O O B-MISC I-MISC I-MISC O, y_pred ex0 = O O B-MISC I-MISC
    # I-MISC I-MISC O; ex1 both B-PER I-PER O. Written out on tokens "The show at Sundance Film
    # Festival ended" / "Ada Lovelace wrote": seqeval reports MISC 0/0/0 (support 1),
    # PER 1/1/1 (support 1), micro 0.5/0.5/0.5.
    gold = [{("MISC", "Sundance Film Festival")}, {("PER", "Ada Lovelace")}]
    predicted = [{("MISC", "at Sundance Film Festival")}, {("PER", "Ada Lovelace")}]
    result = entity_f1(gold, predicted)
    assert (result["precision"], result["recall"], result["f1"]) == (0.5, 0.5, 0.5)
    assert result["per_type"]["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                          "support": 1}
    assert result["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                         "support": 1}
    assert result["per_example_f1"] == [0.0, 1.0]


ENTITY_GOLD = [
    {("PER", "Ada Lovelace"), ("LOC", "London")},
    {("ORG", "Royal Society")},
    set(),
    {("PER", "Charles Babbage")},
]
ENTITY_PREDICTED = [
    {("PER", "Ada Lovelace"), ("ORG", "London")},  # right span, wrong type: no match
    {("ORG", "Royal Society"), ("PER", "Babbage")},
    set(),
    {("per", "Babbage.")},  # partial span: no match (type case and "." are normalised)
]


def test_entity_f1_hand_computed():
    result = entity_f1(ENTITY_GOLD, ENTITY_PREDICTED)
    # 4 gold, 5 predicted, 2 correct.
    assert (result["n_gold"], result["n_predicted"], result["n_correct"]) == (4, 5, 2)
    assert result["precision"] == pytest.approx(2 / 5)
    assert result["recall"] == pytest.approx(2 / 4)
    assert result["f1"] == pytest.approx(4 / 9)
    assert result["per_type"]["PER"] == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "support": 2})
    assert result["per_type"]["ORG"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert result["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                         "support": 1}
    assert result["per_example_f1"] == pytest.approx([1 / 2, 2 / 3, 1.0, 0.0])


def test_entity_f1_statistic_is_micro_f1_over_resampled_examples():
    statistic = entity_f1_statistic(ENTITY_GOLD, ENTITY_PREDICTED)
    assert statistic(np.arange(4)) == pytest.approx(4 / 9)
    # examples 0, 0, 3: gold 2+2+1, predicted 2+2+1, correct 1+1+0 → 2·2/10
    assert statistic(np.array([0, 0, 3])) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- translation

HYPOTHESES = ["The cat sat on the mat.", "A quick brown dog jumps.", "It is raining today."]
REFERENCES = ["The cat is sitting on the mat.", "The quick brown fox jumps.",
              "Today it is raining."]


def test_bleu_and_chrf_equal_sacrebleu():
    assert bleu(HYPOTHESES, REFERENCES) == pytest.approx(
        sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    assert chrf(HYPOTHESES, REFERENCES) == pytest.approx(
        sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score)
    assert sentence_chrf(HYPOTHESES[1], REFERENCES[1]) == pytest.approx(
        sacrebleu.sentence_chrf(HYPOTHESES[1], [REFERENCES[1]]).score)


def test_identical_translations_score_100_and_disjoint_ones_0():
    assert bleu(REFERENCES, REFERENCES) == pytest.approx(100)
    assert chrf(REFERENCES, REFERENCES) == pytest.approx(100)
    assert sentence_chrf("Guten Morgen", "Guten Morgen") == pytest.approx(100)
    assert bleu(["xyz uvw"], ["abc def"]) == 0.0


def test_corpus_statistics_equal_the_metric_on_resampled_lists():
    indices = np.array([2, 0, 0, 1, 2])
    resampled = ([HYPOTHESES[i] for i in indices], [REFERENCES[i] for i in indices])
    assert bleu_statistic(HYPOTHESES, REFERENCES)(np.arange(3)) == pytest.approx(
        bleu(HYPOTHESES, REFERENCES))
    assert bleu_statistic(HYPOTHESES, REFERENCES)(indices) == pytest.approx(bleu(*resampled))
    assert chrf_statistic(HYPOTHESES, REFERENCES)(indices) == pytest.approx(chrf(*resampled))


def test_translation_metrics_reject_misaligned_lists():
    with pytest.raises(ValueError, match="3 hypotheses but 2 references"):
        bleu(HYPOTHESES, REFERENCES[:2])


# ----------------------------------------------------------------------------- question answering


def test_normalize_answer_follows_squad():
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("U.S. Army") == "us army"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_token_f1_take_the_best_gold():
    golds = ["Denver Broncos", "The Broncos"]
    assert exact_match("the Denver Broncos.", golds) == 1.0
    assert exact_match("Broncos", golds) == 1.0  # "The Broncos" → "broncos"
    assert exact_match("Denver", golds) == 0.0
    # "denver broncos won" vs "denver broncos": precision 2/3, recall 1 → F1 0.8
    assert token_f1("Denver Broncos won", golds) == pytest.approx(0.8)
    assert token_f1("Carolina Panthers", golds) == 0.0


def test_empty_answers_follow_squad_2():
    assert exact_match("", []) == 1.0  # unanswerable, model abstains
    assert token_f1("", [""]) == 1.0
    assert token_f1("Paris", [""]) == 0.0
    assert token_f1("the", ["Paris"]) == 0.0


# ----------------------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize("prediction, reference, expected", [
    # Lin (2004): LCS of "police killed the gunman" with "police kill the gunman" is 3 of 4.
    ("police kill the gunman", "police killed the gunman", 3 / 4),
    ("the gunman kill police", "police killed the gunman", 2 / 4),
    # LCS "the cat on the mat" = 5 of 6 on both sides.
    ("the cat sat on the mat", "The cat is on the mat.", 5 / 6),
    # LCS 2, precision 2/2, recall 2/4 → F1 2/3.
    ("cat mat", "the cat on mat", 2 / 3),
    ("The CAT!", "the cat", 1.0),
    ("", "the cat", 0.0),
    ("dog", "cat", 0.0),
])
def test_rouge_l_hand_computed(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected)
