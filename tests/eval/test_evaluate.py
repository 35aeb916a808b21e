"""Evaluation end to end on the tiny model: label scoring, base vs tuned, variants, few-shot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import write_reviews  # noqa: E402
from rich.console import Console
from sacrebleu.metrics import BLEU, CHRF

from tunelab.config import config_from_dict
from tunelab.data.formats import Record, to_example
from tunelab.eval import evaluate as evaluate_module
from tunelab.eval.evaluate import choose_demos, evaluate
from tunelab.eval.generate import generate_texts, score_continuations
from tunelab.eval.metrics import parse_label
from tunelab.eval.result import EvalResult, read_eval
from tunelab.model.load import load_model, load_tokenizer
from tunelab.train.loop import train


def reference_score(model, tokenizer, prompt: str, option: str) -> float:
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    option_ids = tokenizer(option, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
    return float(sum(logp[p, ids[0, p + 1]] for p in positions))


def test_label_scores_equal_one_forward_per_pair(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    prompts = ["Review: the movie was good\nSentiment:", "Review: bad\nSentiment:", "fine"]
    options = [" positive", " negative", " not sure at all"]
    scores = score_continuations(model, tokenizer, prompts, options, batch_tokens=40)
    for i, prompt in enumerate(prompts):
        for j, option in enumerate(options):
            assert scores[i, j].item() == pytest.approx(
                reference_score(model, tokenizer, prompt, option), abs=1e-4)


def config(tmp_path: Path, model_dir: str, **eval_overrides) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    eval_cfg = {"task": "classification", "labels": ["negative", "positive"],
                "prompt_variants": ["Review: {text}\nSentiment:", "{text}\nSentiment:"],
                "bootstrap": 200}
    eval_cfg.update(eval_overrides)
    return config_from_dict({
        "name": "reviews", "output_dir": str(tmp_path / "runs"), "model": {"path": model_dir},
        "method": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": write_reviews(tmp_path / "train.jsonl", 160, 0),
                 "validation": write_reviews(tmp_path / "valid.jsonl", 20, 1),
                 "test": write_reviews(tmp_path / "test.jsonl", 60, 2),
                 "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
        "train": {"epochs": 3, "lr": 1e-2, "batch_tokens": 256, "max_seq_len": 64,
                  "samples": 0},
        "eval": eval_cfg,
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("eval")
    cfg = config(tmp, tiny_model_dir)
    result = train(cfg, console=Console(quiet=True))
    return cfg, result.run_dir


def test_base_vs_tuned_classification_writes_the_eval_file(trained):
    cfg, run_dir = trained
    result = evaluate(cfg, run_dir=run_dir, console=Console(quiet=True))
    saved = json.loads((run_dir / "eval" / "test.json").read_text())
    assert saved["n"] == 60 and saved["task"] == "classification"
    base, tuned = saved["models"]["base"], saved["models"]["tuned"]
    assert tuned["metrics"]["accuracy"]["value"] >= 0.9
    assert tuned["metrics"]["accuracy"]["value"] > base["metrics"]["accuracy"]["value"]
    low, high = tuned["metrics"]["accuracy"]["ci"]
    assert low <= tuned["metrics"]["accuracy"]["value"] <= high
    assert len(tuned["variants"]) == 2 and tuned["sensitivity"]["accuracy"]["n_variants"] == 2
    assert sum(map(sum, tuned["confusion"]["matrix"])) == 60
    comparison = result.comparison["accuracy"]
    assert comparison.test == "mcnemar" and comparison.delta > 0
    assert len(tuned["predictions"]) == 60 and "input" in tuned["predictions"][0]
    assert result == read_eval(run_dir / "eval" / "test.json")  # returned as written


def test_generation_mode_parses_and_counts_failures(trained):
    cfg, run_dir = trained
    cfg.eval.predict = "generate"
    cfg.eval.max_new_tokens = 3
    cfg.eval.stop = ["\n"]
    result = evaluate(cfg, run_dir=run_dir, base=False, console=Console(quiet=True))
    tuned = result.models["tuned"]
    assert "base" not in result.models
    # the count is of the outputs shown that name no label (exact values: see the tests below)
    failures = sum(parse_label(p.prediction, cfg.eval.labels) is None for p in tuned.predictions)
    assert tuned.parse_failures.model_dump() == {"count": failures, "rate": failures / 60}
    assert tuned.metrics["accuracy"].value >= 0.8


def test_few_shot_demonstrations_exclude_the_example_itself():
    pool = [to_example(Record({"text": f"text {i}", "label": "a"}, "train.jsonl", i + 1),
                       "template", prompt="Q: {text}\nA:", completion=" {label}")
            for i in range(6)]
    demos = choose_demos(pool[:3], pool, shots=2, seed=0)
    assert demos == choose_demos(pool[:3], pool, shots=2, seed=0)
    for example, shown in zip(pool[:3], demos, strict=True):
        assert len(shown) == 2 and example not in shown


# Each task kind on four records, with the model's raw output for each fixed: right, partly
# right, wrong, unparseable. Generation is the one stage replaced (``generate_texts``, looked
# up by name in the evaluation module); prompts, parsing, pairing, metrics, intervals, variants
# and the saved file are the real pipeline, and every expected value is worked out by hand in
# the comments (translation: sacrebleu's own corpus scores of the same pairs).
FRENCH_GOLD = ["le film était bon", "l'intrigue était lente", "les acteurs étaient excellents",
               "la musique était forte"]
FRENCH_OUT = ["le film était bon", "l'intrigue était lente", "les acteurs étaient bons", ""]
KNOWN_OUTPUTS = {
    "classification": {
        "prompt": "Review: {text}\nSentiment:", "completion": " {label}", "key": "text",
        "options": {"labels": ["negative", "positive"], "predict": "generate"},
        "records": [
            ({"text": "the movie was good", "label": "positive"}, " Positive."),
            ({"text": "the plot was dull", "label": "negative"}, " The sentiment is negative"),
            ({"text": "the cast was great", "label": "positive"}, " negative"),
            ({"text": "the music was loud", "label": "negative"}, " positive or negative"),
        ],
        # positive: 1 hit, 1 predicted, 2 gold -> F1 2/3; negative: 1 hit, 2 predicted, 2 gold
        # -> F1 1/2; the unparseable answer is wrong and predicts neither
        "metrics": {"accuracy": 2 / 4, "macro_f1": (2 / 3 + 1 / 2) / 2},
        "per_example": [1.0, 1.0, 0.0, 0.0],
        "failures": 1, "hallucination": None,
    },
    "ner": {
        "prompt": "Text: {text}\nEntities:\n", "completion": "{target}", "key": "text",
        "options": {"entity_types": ["PERSON", "GPE"], "context": "{text}"},
        "records": [
            ({"text": "Ada met Bob in Paris", "target": "PERSON: Ada\nPERSON: Bob\nGPE: Paris"},
             "PERSON: Ada\nGPE: Paris"),  # 2 of 3 found
            ({"text": "Cy flew to Rome", "target": "PERSON: Cy\nGPE: Rome"},
             "- PERSON: Cy\n- GPE: Rome\n- PERSON: Zed"),  # both, plus Zed (not in the text)
            ({"text": "Dee stayed home", "target": "PERSON: Dee"}, "GPE: Dee"),  # wrong type
            ({"text": "Eve saw Oslo", "target": "PERSON: Eve\nGPE: Oslo"}, "I cannot tell"),
        ],
        # 4 hits of 6 predicted and 8 gold entities: P 4/6, R 4/8, micro F1 2·4/(6+8)
        "metrics": {"f1": 8 / 14, "precision": 4 / 6, "recall": 4 / 8},
        "per_example": [2 * 2 / 5, 2 * 2 / 5, 0.0, 0.0],
        "failures": 1, "hallucination": 1 / 6,  # Zed, of Ada, Paris, Cy, Rome, Zed, Dee
    },
    "qa": {
        "prompt": "Context: {context}\nQuestion: {question}\nAnswer:", "completion": " {answer}",
        "key": "question", "options": {"context": "{context}"},
        "records": [
            ({"context": "the movie was good", "question": "How was the movie?",
              "answer": "good"}, " Good."),  # equal after SQuAD normalisation
            ({"context": "the plot was slow and long", "question": "How was the plot?",
              "answer": "slow and long"}, " slow"),  # token F1: P 1, R 1/3 -> 1/2
            ({"context": "the cast was great", "question": "Who was great?",
              "answer": "the cast"}, " Cast"),  # articles dropped: an exact match
            ({"context": "the music was loud", "question": "How was the music?",
              "answer": "loud"}, " quiet"),  # wrong, and not in the context
        ],
        "metrics": {"exact_match": 2 / 4, "token_f1": (1 + 1 / 2 + 1 + 0) / 4},
        "per_example": [1.0, 0.0, 1.0, 0.0],
        "failures": 0, "hallucination": 1 / 4,
    },
    "translation": {
        "prompt": "English: {en}\nFrench:", "completion": " {fr}", "key": "en", "options": {},
        "records": [
            ({"en": "the movie was good", "fr": "le film était bon"}, " le film était bon"),
            ({"en": "the plot was slow", "fr": "l'intrigue était lente"},
             " l'intrigue était lente"),
            ({"en": "the cast was great", "fr": "les acteurs étaient excellents"},
             " les acteurs étaient bons"),
            ({"en": "the music was loud", "fr": "la musique était forte"}, "  "),  # empty
        ],
        # sacrebleu on the same pairs: BLEU 52.21, chrF 66.73; 100 for the two exact ones
        "metrics": {"chrf": CHRF().corpus_score(FRENCH_OUT, [FRENCH_GOLD]).score,
                    "bleu": BLEU().corpus_score(FRENCH_OUT, [FRENCH_GOLD]).score},
        "per_example": [1.0, 1.0, CHRF().sentence_score(FRENCH_OUT[2], [FRENCH_GOLD[2]]).score
                        / 100, 0.0],
        "failures": 1, "hallucination": None,
    },
    "summarisation": {
        "prompt": "{document}\nSummary:", "completion": " {summary}", "key": "document",
        "options": {},
        "records": [
            ({"document": "the movie was good and fun", "summary": "good"}, " good"),
            ({"document": "the plot was slow, as plots go", "summary": "the plot was slow"},
             " slow plot"),  # LCS 1 of 2 and 4 words: P 1/2, R 1/4 -> F 1/3
            ({"document": "a fun film, long but fun", "summary": "a fun long film"},
             " a long film"),  # LCS 3: P 1, R 3/4 -> F 6/7
            ({"document": "the music was loud", "summary": "loud music"}, ""),  # empty
        ],
        "metrics": {"rouge_l": (1 + 1 / 3 + 6 / 7 + 0) / 4},
        "per_example": [1.0, 1 / 3, 6 / 7, 0.0],
        "failures": 1, "hallucination": None,
    },
}


def known_output_config(task: str, tmp_path: Path, model_dir: str) -> object:
    spec = KNOWN_OUTPUTS[task]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(record) + "\n" for record, _ in spec["records"]))
    train = tmp_path / "train.jsonl"  # unrelated to the test records: nothing leaks
    train.write_text(json.dumps({name: f"a training {name}" for name in spec["records"][0][0]}))
    return config_from_dict({
        "name": task, "output_dir": str(tmp_path / "runs"), "model": {"path": model_dir},
        "data": {"train": str(train), "test": str(test), "prompt": spec["prompt"],
                 "completion": spec["completion"]},
        "eval": {"task": task, "max_new_tokens": 8, "bootstrap": 100,
                 "prompt_variants": [spec["prompt"], "Again: " + spec["prompt"]],
                 **spec["options"]},
    })


def known_outputs(monkeypatch, task: str, *, rotate: int = 0) -> None:
    """Make the model "write" each record's fixed output, found by the record's key field in the
    query; ``rotate`` hands each prompt the output of the record ``rotate`` places later, as a
    reordering bug in batching would."""
    spec = KNOWN_OUTPUTS[task]
    keys = [record[spec["key"]] for record, _ in spec["records"]]
    outputs = [output for _, output in spec["records"]]

    def generate(model, tokenizer, prompts, **settings):
        answers = []
        for prompt in prompts:
            text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)  # ids
            query = text.split("\n\n")[-1]
            owners = [i for i, key in enumerate(keys) if key in query]
            assert len(owners) == 1, query
            answers.append(outputs[(owners[0] + rotate) % len(outputs)])
        return answers

    monkeypatch.setattr(evaluate_module, "generate_texts", generate)


def run_base(task: str, tmp_path: Path, model_dir: str) -> tuple[EvalResult, Path]:
    run_dir = tmp_path / "runs" / task
    run_dir.mkdir(parents=True)
    config = known_output_config(task, tmp_path, model_dir)
    result = evaluate(config, run_dir=run_dir, base=True, tuned=False, console=Console(quiet=True))
    return result, run_dir


@pytest.mark.parametrize("task", sorted(KNOWN_OUTPUTS))
def test_task_metrics_equal_the_hand_computed_values(task, tmp_path, monkeypatch,
                                                      tiny_model_dir):
    spec = KNOWN_OUTPUTS[task]
    known_outputs(monkeypatch, task)
    result, run_dir = run_base(task, tmp_path, tiny_model_dir)
    outcome = result.models["base"]
    assert result.n == 4 and result.primary_metric in spec["metrics"]
    assert set(outcome.metrics) == set(spec["metrics"])
    for name, expected in spec["metrics"].items():
        metric = outcome.metrics[name]
        assert metric.value == pytest.approx(expected, abs=1e-9), name
        assert metric.n == 4 and metric.ci[0] <= metric.value <= metric.ci[1]
    assert outcome.parse_failures.model_dump() == {"count": spec["failures"],
                                                   "rate": spec["failures"] / 4}
    for index, (entry, (record, output)) in enumerate(zip(outcome.predictions,
                                                          spec["records"], strict=True)):
        assert entry.index == index and record[spec["key"]] in entry.input
        assert entry.prediction == output
        assert entry.score == pytest.approx(spec["per_example"][index], abs=1e-9)
    if spec["hallucination"] is None:
        assert outcome.detail("hallucination") is None
    else:
        assert outcome.detail("hallucination")["rate"] == pytest.approx(spec["hallucination"])
    primary = result.primary_metric
    variation = outcome.sensitivity[primary]  # the same outputs under both prompt variants
    assert variation.n_variants == 2 and variation.std == pytest.approx(0.0)
    assert variation.mean == pytest.approx(spec["metrics"][primary])
    saved = json.loads((run_dir / "eval" / "test.json").read_text())
    assert saved["task"] == task
    assert saved["models"]["base"]["metrics"][primary]["value"] == pytest.approx(
        spec["metrics"][primary])


def test_ner_per_type_scores_count_each_type_apart(tmp_path, monkeypatch, tiny_model_dir):
    known_outputs(monkeypatch, "ner")
    result, _ = run_base("ner", tmp_path, tiny_model_dir)
    per_type = result.models["base"].detail("per_type")
    # PERSON: Ada, Cy right of 3 predicted (Zed) and 5 gold; GPE: Paris, Rome of 3 (Dee) and 3
    assert per_type["PERSON"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 5, "f1": 4 / 8, "support": 5})
    assert per_type["GPE"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 4 / 6, "support": 3})


@pytest.mark.parametrize("task", sorted(KNOWN_OUTPUTS))
def test_mispaired_outputs_change_the_metric(task, tmp_path, monkeypatch, tiny_model_dir):
    """Guards the tests above: outputs handed to the wrong examples (rotated by one, as a
    reordering bug would) do not reproduce the hand-computed value."""
    known_outputs(monkeypatch, task, rotate=1)
    result, _ = run_base(task, tmp_path, tiny_model_dir)
    primary = result.primary_metric
    mispaired = result.models["base"].metrics[primary].value
    assert mispaired < KNOWN_OUTPUTS[task]["metrics"][primary] - 0.1


def test_batched_generation_returns_each_prompt_its_own_completion(tiny_model_dir):
    """The real generator, left-padded in batches, pairs outputs with prompts as one at a time."""
    model, tokenizer = load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    prompts = ["Review: the movie was good\nSentiment:", "The plot",
               "What is the capital of France? The capital", "1 2 3 4 5 6 7 8 9 10 11 12"]
    batched = generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_texts(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == alone
    assert len(set(alone)) == len(prompts)  # distinct, so a reordering could not pass


@pytest.mark.parametrize("output, answer, kind", [
    ("<think>\nweighing it\n</think>\n\n Positive.", "Positive.", "closed"),
    ("<think>\n\n</think>\n\nnegative", "negative", "closed"),  # Qwen3's empty block
    ("opened by the template</think> positive", "positive", "closed"),
    ("<think>\nstill weighing, cut by max_new_tokens", "", "unterminated"),
    ("<think>a</think>\n\npositive <think>and then", "positive ", "unterminated"),
    (" positive", " positive", None),
])
def test_strip_thinking_leaves_the_answer(output, answer, kind):
    assert evaluate_module.strip_thinking(output) == (answer, kind)


# The classification records of KNOWN_OUTPUTS, each output with reasoning before it: the
# reasoning names both labels, so only the answer after it parses.
THINKING_OUTPUTS = ["<think>\npositive or negative? good.\n</think>\n\n Positive.",
                    "<think>\nnegative or positive? the plot was dull, so",  # cut: empty
                    " negative",
                    "<think>positive or negative</think>\n\n positive or negative"]


@pytest.mark.parametrize("strip", [True, False])
def test_thinking_is_stripped_before_scoring_and_counted(strip, tmp_path, monkeypatch,
                                                         tiny_model_dir):
    spec = KNOWN_OUTPUTS["classification"]
    records = [(record, output) for (record, _), output in zip(spec["records"],
                                                               THINKING_OUTPUTS, strict=True)]
    monkeypatch.setitem(KNOWN_OUTPUTS, "classification", {**spec, "records": records})
    known_outputs(monkeypatch, "classification")
    config = known_output_config("classification", tmp_path, tiny_model_dir)
    config.eval.strip_thinking = strip
    run_dir = tmp_path / "runs" / "classification"
    run_dir.mkdir(parents=True)
    result = evaluate(config, run_dir=run_dir, base=True, tuned=False,
                      console=Console(quiet=True))
    outcome = result.models["base"]
    assert outcome.thinking.model_dump() == {"closed": 2, "unterminated": 1, "stripped": strip}
    # stripped: 1 right (Positive), 1 empty, 1 wrong, 1 unparseable; as written, the reasoning
    # names both labels, so the first, second and last are unparseable
    assert outcome.metrics["accuracy"].value == pytest.approx(1 / 4 if strip else 0.0)
    assert outcome.parse_failures.count == (2 if strip else 3)
    if strip:
        assert [p.prediction for p in outcome.predictions][:2] == ["Positive.", ""]
    notes = outcome.detail("notes", [])
    assert any("ended inside a <think> block" in note for note in notes) == strip
    saved = read_eval(run_dir / "eval" / "test.json")
    assert saved.models["base"].thinking == outcome.thinking and saved == result
    # a file from before the counts (the same schema version) reads as it is
    older = saved.to_dict()
    del older["models"]["base"]["thinking"]
    assert EvalResult.from_dict(older).models["base"].thinking is None

