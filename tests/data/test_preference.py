"""Preference data (data/preference.py): every shape read into two ordinary examples that share
their prompt, tokenized by the one renderer with only the answers trained; errors at file:line;
what ``tunelab data check`` says about pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from tunelab.config import DataConfig, config_from_dict
from tunelab.data.check import check_data
from tunelab.data.formats import to_examples
from tunelab.data.preference import (
    is_preference_record,
    prepare_preference_data,
    to_preference_examples,
    tokenize_pairs,
)
from tunelab.data.readers import read_records
from tunelab.data.records import Record
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import ConfigError, DataError
from tunelab.model.load import load_tokenizer
from tunelab.objectives import OBJECTIVES

DPO, KTO = OBJECTIVES["dpo"], OBJECTIVES["kto"]

USER = {"role": "user", "content": "What colour is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green, of course."}

# One pair (the prompt USER, chosen BLUE, rejected GREEN) in each conversational shape.
CHAT_SHAPES = {
    "trl": {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]},
    "trl string prompt": {"prompt": USER["content"], "chosen": [BLUE], "rejected": [GREEN]},
    "trl string answers": {"prompt": [USER], "chosen": BLUE["content"],
                           "rejected": GREEN["content"]},
    "trl implicit prompt": {"chosen": [USER, BLUE], "rejected": [USER, GREEN]},
    "ultrafeedback": {"prompt": USER["content"], "chosen": [USER, BLUE],
                      "rejected": [USER, GREEN]},
    "openai": {"input": {"messages": [USER]}, "preferred_output": [BLUE],
               "non_preferred_output": [GREEN]},
    "rejected_response": {"messages": [USER, BLUE], "rejected_response": GREEN["content"]},
    "rejected_response message": {"messages": [USER, BLUE], "rejected_response": GREEN},
}


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    return load_tokenizer(embedded_model)


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def read(path: str, objective=DPO, **data):
    return to_preference_examples(read_records(path), DataConfig(train=[path], **data),
                                  objective)


def answer_ids(pair) -> list[int]:
    return [label for label in pair.labels if label != IGNORE_INDEX]


def assert_shared_prompt(pair) -> None:
    chosen, rejected = pair.chosen, pair.rejected
    n = chosen.n_prompt_tokens
    assert n == rejected.n_prompt_tokens > 0
    assert chosen.input_ids[:n] == rejected.input_ids[:n]
    for side in (chosen, rejected):  # trained: exactly the tokens after the prompt
        assert side.labels[:n] == [IGNORE_INDEX] * n and side.labels[n:] == side.input_ids[n:]


def test_string_pairs_share_the_prompt_and_train_the_answer_and_eos(tmp_path, tokenizer):
    path = write(tmp_path / "pairs.jsonl",
                 [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    (example,) = read(path)
    assert example.chosen.format == "completion" and example.chosen.label == " blue."
    assert example.where == f"{path}:1" and example.desirable is None
    (pair,) = tokenize_pairs([example], tokenizer, DataConfig(train=[path]), max_seq_len=64)
    assert_shared_prompt(pair)
    eos = tokenizer.eos_token_id
    for side, answer in ((pair.chosen, " blue."), (pair.rejected, " green.")):
        assert answer_ids(side) == tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos]
    assert pair.length == len(pair.chosen.input_ids) + len(pair.rejected.input_ids)
    assert pair.n_target_tokens == len(answer_ids(pair.chosen)) + len(answer_ids(pair.rejected))


def test_every_conversational_shape_gives_the_same_tokens(tmp_path, tokenizer):
    rows = list(CHAT_SHAPES.values())
    path = write(tmp_path / "pairs.jsonl", rows)
    examples = read(path)
    pairs = tokenize_pairs(examples, tokenizer, DataConfig(train=[path]), max_seq_len=256)
    end_of_turn = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for name, pair in zip(CHAT_SHAPES, pairs, strict=True):
        assert_shared_prompt(pair)
        assert (pair.chosen.input_ids, pair.rejected.input_ids) == (
            pairs[0].chosen.input_ids, pairs[0].rejected.input_ids), name
        for side, message in ((pair.chosen, BLUE), (pair.rejected, GREEN)):
            expected = tokenizer(message["content"], add_special_tokens=False)["input_ids"]
            assert answer_ids(side) == expected + end_of_turn, name
    assert [example.line for example in examples] == list(range(1, len(rows) + 1))


def test_earlier_assistant_turns_are_the_prompt_not_trained(tmp_path, tokenizer):
    earlier = [USER, {"role": "assistant", "content": "Blue."}, {"role": "user",
                                                                 "content": "Say it again."}]
    path = write(tmp_path / "pairs.jsonl", [
        {"messages": [*earlier, BLUE], "rejected_response": "No."},
        {"chosen": [*earlier, BLUE], "rejected": [*earlier, GREEN]},
        {"prompt": earlier, "chosen": [BLUE], "rejected": [GREEN]}])
    for example in read(path):
        for side in (example.chosen, example.rejected):
            assert [m.weight for m in side.messages if m.role == "assistant"][0] == 0
            assert side.messages[:3] == example.chosen.messages[:3]
        (pair,) = tokenize_pairs([example], tokenizer, DataConfig(train=[path]), max_seq_len=256)
        assert_shared_prompt(pair)


def test_kto_reads_labelled_answers_strings_messages_and_csv(tmp_path, tokenizer):
    jsonl = write(tmp_path / "kto.jsonl", [
        {"prompt": "2 + 2 =", "completion": " 4", "label": True},
        {"prompt": [USER], "completion": [GREEN], "label": False}])
    csv = tmp_path / "kto.csv"
    csv.write_text("prompt,completion,label\n2 + 2 =, 4,TRUE\n2 + 2 =, 5,false\n")
    examples = read(jsonl, KTO) + read(str(csv), KTO)
    assert [(ex.desirable, ex.rejected, ex.line) for ex in examples] == [
        (True, None, 1), (False, None, 2), (True, None, 2), (False, None, 3)]
    assert examples[1].chosen.format == "chat" and examples[0].chosen.format == "completion"
    pairs = tokenize_pairs(examples, tokenizer, DataConfig(train=[jsonl]), max_seq_len=64)
    assert all(pair.rejected is None and pair.n_target_tokens > 0 for pair in pairs)
    assert [pair.desirable for pair in pairs] == [True, False, True, False]


def test_kto_unpairs_pairs_chosen_desirable_rejected_not(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [CHAT_SHAPES["trl"], CHAT_SHAPES["openai"]])
    pairs, unpaired = read(path, DPO), read(path, KTO)
    assert [(ex.desirable, ex.line) for ex in unpaired] == [
        (True, 1), (False, 1), (True, 2), (False, 2)]
    assert [ex.chosen for ex in unpaired[:2]] == [pairs[0].chosen, pairs[0].rejected]


def test_kto_data_for_a_pairs_objective_says_to_use_kto(tmp_path):
    path = write(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}])
    with pytest.raises(DataError) as error:
        read(path, DPO)
    assert error.value.where == f"{path}:1"
    assert "unpaired data" in error.value.message and "method.objective: kto" in error.value.fix


@pytest.mark.parametrize(("row", "objective", "says"), [
    ({"prompt": "a", "chosen": "b"}, DPO, "missing field 'rejected'"),
    ({"prompt": "a", "completion": "b", "label": "maybe"}, KTO, "field 'label' is a string"),
    ({"prompt": "a", "completion": "b", "label": 1}, KTO, "field 'label' is a number"),
    ({"messages": [USER, BLUE], "rejected_response": {"role": "user", "content": "x"}}, DPO,
     "rejected_response.role is 'user'"),
    ({"messages": [USER], "rejected_response": "x"}, DPO, "messages ends with a 'user' turn"),
    ({"chosen": [{"role": "human", "content": "hi"}, BLUE], "rejected": [USER, GREEN]}, DPO,
     "chosen[0].role 'human'"),
    ({"prompt": [USER], "chosen": [BLUE], "rejected": [{"role": "assistant", "content": 3}]},
     DPO, "rejected[0].content is a number"),
    ({"input": {"messages": [USER, {"role": "robot", "content": "x"}]},
      "preferred_output": [BLUE], "non_preferred_output": [GREEN]}, DPO,
     "input.messages[1].role 'robot'"),
    ({"input": {"messages": [USER]}, "preferred_output": [BLUE]}, DPO,
     "missing field 'non_preferred_output'"),
    ({"chosen": [USER, BLUE], "rejected": [{"role": "user", "content": "Else?"}, GREEN]}, DPO,
     "share no leading messages"),
    ({"chosen": [USER, BLUE], "rejected": [USER, {"role": "user", "content": "x"}, GREEN]},
     DPO, "rejected[1], a user turn"),
    ({"chosen": "b", "rejected": "c"}, DPO, "there is no prompt"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, DPO, "field 'chosen' is a number"),
    ({"text": "hello"}, DPO, "not preference data"),
])
def test_malformed_records_name_file_line_and_field(tmp_path, row, objective, says):
    path = write(tmp_path / "pairs.jsonl", [CHAT_SHAPES["trl"], row])
    with pytest.raises(DataError) as error:
        read(path, objective)
    assert error.value.where == f"{path}:2"
    assert says in error.value.message


def test_preference_shapes_are_detected_and_kto_only_with_a_boolean_label():
    record = lambda fields: Record(fields, "f.jsonl", 1)  # noqa: E731
    assert [is_preference_record(record(row)) for row in CHAT_SHAPES.values()] == [
        "paired"] * 5 + ["openai", "rejected_response", "rejected_response"]
    assert is_preference_record(record({"prompt": "a", "completion": "b", "label": "True"})) \
        == "unpaired"
    assert is_preference_record(record({"prompt": "a", "completion": "b", "label": "pos"})) \
        is None
    assert is_preference_record(record({"messages": [USER, BLUE]})) is None


@pytest.mark.parametrize("row", [CHAT_SHAPES["trl"], CHAT_SHAPES["openai"],
                                 CHAT_SHAPES["rejected_response"],
                                 {"prompt": "a", "chosen": "b", "rejected": "c"}])
def test_supervised_reading_refuses_preference_records(row):
    with pytest.raises(DataError) as error:
        to_examples([Record(row, "prefs.jsonl", 3)])
    assert error.value.where == "prefs.jsonl:3"
    assert "preference data" in error.value.message
    assert "method.objective: dpo" in error.value.fix


def test_supervised_reading_keeps_a_kto_record_as_completion_data():
    (example,) = to_examples([Record({"prompt": "a", "completion": "b", "label": True},
                                     "k.jsonl", 1)])
    assert example.format == "completion"


def test_template_mode_is_refused_for_preference_data(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [CHAT_SHAPES["trl"]])
    with pytest.raises(ConfigError) as error:
        read(path, prompt="{prompt}", completion="{chosen}")
    assert error.value.where == "data.prompt" and "chosen / rejected columns" in error.value.fix


def test_prepare_splits_by_record_and_cuts_both_prompts_alike(tmp_path, tokenizer):
    long_prompt = "Tell me about the sky. " * 40
    rows = [{"prompt": f"{i}: {long_prompt}", "chosen": " Blue." * (1 + i % 3),
             "rejected": " No."} for i in range(10)]
    path = write(tmp_path / "pairs.jsonl", rows)
    data = DataConfig(train=[path], validation_split=0.2)
    prepared = prepare_preference_data(data, tokenizer, max_seq_len=64, seed=0, objective=DPO)
    assert len(prepared.train) == 8 and len(prepared.validation) == 2
    assert [ex.label for ex in prepared.validation_examples] == [
        rows[pair.line - 1]["chosen"] for pair in prepared.validation]
    report = prepared.report
    assert (report["train_examples"], report["truncated"], report["identical_pairs"]) == (8, 8, 0)
    assert report["format"] == "completion" and report["shape"] == "paired"
    for pair in prepared.train:
        assert_shared_prompt(pair)
        assert max(len(pair.chosen.input_ids), len(pair.rejected.input_ids)) == 64
        whole = " Blue." * (1 + (pair.line - 1) % 3)  # the whole answer is kept
        assert tokenizer.decode(answer_ids(pair.chosen)) == whole + tokenizer.eos_token
    unpaired = prepare_preference_data(data, tokenizer, max_seq_len=64, seed=0, objective=KTO)
    assert len(unpaired.train) == 16 and len(unpaired.validation) == 4  # halves kept together
    assert {pair.line for pair in unpaired.validation} == {p.line for p in prepared.validation}
    assert len(unpaired.validation_examples) == 2  # the desirable ones: the samples' references


def test_a_pair_whose_answer_is_cut_away_is_skipped(tmp_path, tokenizer):
    rows = [{"prompt": "Hi", "chosen": " Blue.", "rejected": " No."},
            {"prompt": "Hi " * 100, "chosen": " Blue.", "rejected": " No."}]
    data = DataConfig(train=[write(tmp_path / "pairs.jsonl", rows)], truncation="end")
    prepared = prepare_preference_data(data, tokenizer, max_seq_len=32, seed=0, objective=DPO)
    assert [pair.line for pair in prepared.train] == [1]
    assert [pair.line for pair in prepared.skipped] == [2]


def test_data_check_counts_identical_pairs_and_length_preference(tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": "A long and careful answer.", "rejected": "No."}
            for i in range(4)]
    rows.append({"prompt": "Q9?", "chosen": "Same.", "rejected": "Same."})
    path = write(tmp_path / "pairs.jsonl", rows)
    report = check_data(path, console=Console(quiet=True))
    checks = report["preference"]["splits"]["train"]
    assert report["preference"]["data"] == "pairs"
    assert checks["identical_pairs"] == {"count": 1, "places": [f"{path}:5"]}
    assert checks["chosen_longer_share"] == 1.0 and checks["length_unit"] == "characters"
    assert report["splits"]["train"]["n_records"] == 5
    warnings = " ".join(report["warnings"])
    assert "same chosen and rejected answer" in warnings and "length exploitation" in warnings


def test_data_check_of_a_kto_config_counts_desirable_answers_in_tokens(tmp_path, embedded_model):
    rows = [{"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No, not at all."}
            for i in range(3)]
    write(tmp_path / "pairs.jsonl", rows)
    write(tmp_path / "test.jsonl", [{"prompt": "Q1?", "completion": "Yes.", "label": True}] * 9
          + [{"prompt": "Q2?", "completion": "Maybe.", "label": False}])
    config = config_from_dict({
        "name": "kto", "model": {"path": embedded_model},
        "method": {"kind": "lora", "objective": "kto"},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "test": str(tmp_path / "test.jsonl")},
        "train": {"max_seq_len": 128}})
    report = check_data(config, console=Console(quiet=True))
    train, test = (report["preference"]["splits"][split] for split in ("train", "test"))
    assert (train["desirable"], train["undesirable"], train["n_pairs"]) == (3, 3, 0)
    assert test["desirable_share"] == 0.9 and train["desirable_share"] == 0.5
    assert report["splits"]["train"]["token_length"] is not None
    leakage = report["leakage"]["train/test"]  # the prompts leak, whatever the answer
    assert (leakage["exact"]["count"], leakage["prompt_overlap"]["count"]) == (9, 1)
    assert not any("different targets" in warning for warning in report["warnings"])


def test_data_check_reads_a_supervised_test_file_as_evaluation_data(tmp_path, embedded_model):
    write(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": " Yes.", "rejected": " No."}
                                     for i in range(4)])
    write(tmp_path / "test.jsonl", [{"prompt": "Q3?", "completion": " Yes."},
                                    {"prompt": "Q8?", "completion": " No."}])
    config = config_from_dict({
        "name": "dpo", "model": {"path": embedded_model},
        "method": {"kind": "lora", "objective": "dpo"},
        "data": {"train": str(tmp_path / "pairs.jsonl"), "test": str(tmp_path / "test.jsonl")}})
    report = check_data(config, console=Console(quiet=True))
    assert report["splits"]["test"]["n_records"] == 2
    assert report["splits"]["test"]["token_length"]["max"] > 0
    assert "test" not in report["preference"]["splits"]  # no pairs there
    assert report["leakage"]["train/test"]["exact"]["count"] == 1  # Q3? is trained on
