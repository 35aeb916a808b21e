"""ShareGPT and TRL's conversational prompt/completion: detected, read as chat, trained on the
assistant's turns only; every malformed record names file:line and the field."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import run_cli

from tunelab.data.formats import Record, detect_format, to_example, to_examples
from tunelab.data.readers import read_records
from tunelab.data.tokenize import tokenize_examples
from tunelab.errors import DataError
from tunelab.run import RunDir

HUMAN = {"from": "human", "value": "Is the sky blue?"}
GPT = {"from": "gpt", "value": "Yes."}
SHAREGPT = {"conversations": [HUMAN, GPT], "system": "Answer briefly."}
CONVERSATIONAL = {"prompt": [{"role": "user", "content": "Is the sky blue?"}],
                  "completion": [{"role": "assistant", "content": "Yes."}]}


def record(fields, line=4):
    return Record(fields, "talk.jsonl", line)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def data_error(fields, fmt=None) -> DataError:
    with pytest.raises(DataError) as error:
        to_example(record(fields), fmt or detect_format(record(fields)))
    assert error.value.where == "talk.jsonl:4"
    return error.value


@pytest.mark.parametrize(("fields", "fmt"), [
    (SHAREGPT, "sharegpt"),
    ({"messages": [HUMAN, GPT]}, "sharegpt"),  # ShareGPT turns under a messages key
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
    (CONVERSATIONAL, "completion"),
])
def test_detection(fields, fmt):
    assert detect_format(record(fields)) == fmt


def test_sharegpt_reads_as_chat_with_the_system_column_first():
    example = to_example(record(SHAREGPT), "sharegpt")
    assert example.format == "chat"
    assert [(m.role, m.content) for m in example.messages] == [
        ("system", "Answer briefly."), ("user", "Is the sky blue?"), ("assistant", "Yes.")]


@pytest.mark.parametrize("speaker", ["user", "human"])
@pytest.mark.parametrize("reply", ["gpt", "assistant", "model", "chatgpt"])
def test_sharegpt_speakers(speaker, reply):
    turns = [{"from": speaker, "value": "q"}, {"from": reply, "value": "a"}]
    example = to_example(record({"conversations": turns}), "sharegpt")
    assert [m.role for m in example.messages] == ["user", "assistant"]


def test_llamafactory_tool_calling_turns_and_tools_column():
    tools = [{"name": "weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    fields = {"conversations": [
        HUMAN,
        {"from": "function_call", "value": json.dumps({"name": "weather",
                                                       "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"sky": "blue"}'},
        GPT], "tools": json.dumps(tools)}
    example = to_example(record(fields), "sharegpt")
    call = example.messages[1]
    assert call.role == "assistant" and call.content == ""
    assert call.tool_calls == [{"type": "function", "function": {
        "name": "weather", "arguments": {"city": "Paris"}}}]
    assert example.messages[2].role == "tool"
    assert example.tools == [{"type": "function", "function": tools[0]}]


@pytest.mark.parametrize(("turns", "says"), [
    ([HUMAN, GPT, {"from": "bot", "value": "x"}],
     "conversations[2].from 'bot' is not one of human, user, gpt"),
    ([HUMAN, {"value": "x"}], "conversations[1].from is missing"),
    ([HUMAN, {"from": "gpt"}], "conversations[1].value is missing"),
    ([HUMAN, {"from": "gpt", "value": None}], "conversations[1].value is null"),
    ([HUMAN, {"from": "gpt", "value": "x", "weight": 2}], "conversations[1].weight is 2"),
    ([HUMAN, {"from": "function_call", "value": "{name: x}"}],
     "conversations[1].value is not valid JSON"),
    ([HUMAN, {"from": "function_call", "value": '{"arguments": {}}'}],
     "conversations[1].value has no function name"),
    ([HUMAN], "no gpt (assistant) turn is trained"),
    ("hello", "conversations is a string"),
    ([], "conversations is an empty list"),
])
def test_malformed_sharegpt_names_the_field(turns, says):
    assert says in data_error({"conversations": turns}).message


def test_errors_name_the_line_of_the_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [SHAREGPT, SHAREGPT, {"conversations": [
        HUMAN, {"from": "bot", "value": "hi"}]}])
    with pytest.raises(DataError) as error:
        to_examples(read_records(path))
    assert error.value.where == f"{path}:3"
    assert "conversations[1].from 'bot' is not one of" in error.value.message


def test_a_system_column_and_a_system_turn_are_ambiguous():
    fields = {"conversations": [{"from": "system", "value": "s"}, HUMAN, GPT], "system": "t"}
    assert "ambiguous" in data_error(fields).message


def test_conversational_prompt_completion_trains_the_completion_only():
    fields = {"prompt": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "Sky?"}],
              "completion": [{"role": "assistant", "content": "Blue."}]}
    example = to_example(record(fields), "completion")
    assert example.format == "chat"
    assert [(m.role, m.weight) for m in example.messages] == [
        ("system", None), ("user", None), ("assistant", 0), ("user", None), ("assistant", None)]


@pytest.mark.parametrize(("fields", "says"), [
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "bot", "content": "x"}],
      "completion": [{"role": "assistant", "content": "a"}]}, "prompt[1].role 'bot'"),
    ({"prompt": [{"role": "user", "content": "q"}],
      "completion": [{"role": "user", "content": "a"}]},
     "no assistant message of completion is trained"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": []},
     "field 'completion' is an empty list"),
])
def test_malformed_conversational_records_name_the_field(fields, says):
    assert says in data_error(fields).message


@pytest.mark.parametrize(("fields", "fmt"), [
    ({"prompt": {"role": "user", "content": "q"}, "completion": "a"}, "completion"),
    ({"instruction": "Say hi", "output": ["hi", "there"]}, "instruction"),
    ({"text": {"body": "t"}}, "text"),
])
def test_no_hint_says_to_write_a_list_or_object_as_a_string(fields, fmt):
    """Writing a message list as a JSON string would train on its text, brackets and all."""
    error = data_error(fields, fmt)
    assert "JSON string" not in error.fix and "[{'" not in error.fix
    assert ("lists of messages" in error.fix) == (fmt == "completion")


def test_a_number_is_to_be_quoted_as_its_text():
    assert '"completion": "4"' in data_error({"prompt": "2+2=", "completion": 4}).fix


def test_sharegpt_preference_and_kto_records_are_not_read_as_conversations():
    pair = {"conversations": [HUMAN], "chosen": GPT, "rejected": {"from": "gpt", "value": "No"}}
    kto = {**SHAREGPT, "kto_tag": False}
    for fields, says, fix in ((pair, "ShareGPT preference data", '"chosen"'),
                              (kto, "KTO data", "method.objective: kto")):
        for read in (lambda: detect_format(record(fields)),  # noqa: B023
                     lambda: to_example(record(fields), "sharegpt")):  # noqa: B023
            with pytest.raises(DataError) as error:
                read()
            assert says in error.value.message and fix in error.value.fix


def test_forcing_the_other_chat_format_points_at_sharegpt():
    assert "data.format: sharegpt" in data_error(SHAREGPT, "chat").fix
    assert "data.format: sharegpt" in data_error({"messages": [HUMAN, GPT]}, "chat").fix
    assert "missing field 'conversations'" in data_error(
        {"messages": [{"role": "user", "content": "q"}]}, "sharegpt").message


def test_the_loss_mask_covers_the_replies_and_nothing_else(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    fields = {"conversations": [HUMAN, GPT, {"from": "human", "value": "And grass?"},
                                {"from": "gpt", "value": "Green."}], "system": "Be brief."}
    (tokenized,) = tokenize_examples([to_example(record(fields), "sharegpt")], tokenizer,
                                     max_seq_len=256)
    trained = [token for token, label in zip(tokenized.input_ids, tokenized.labels,
                                             strict=True) if label != -100]
    assert tokenizer.decode(trained) == "Yes.<|im_end|>\nGreen.<|im_end|>\n"


def test_training_on_a_sharegpt_file_from_the_cli(tmp_path, tiny_model_dir, monkeypatch,
                                                   capsys):
    from transformers import AutoTokenizer

    rows = [{"conversations": [{"from": "human", "value": f"Review: the movie was {word}"},
                               {"from": "gpt", "value": label}],
             "system": "Label the review."}
            for word, label in [("good", "positive"), ("bad", "negative")] * 12]
    write_jsonl(tmp_path / "train.jsonl", rows)
    config = {"name": "sharegpt", "output_dir": str(tmp_path / "runs"),
              "model": {"path": tiny_model_dir},
              "method": {"kind": "lora", "r": 4, "alpha": 8},
              "data": {"train": "train.jsonl", "format": "sharegpt"},
              "train": {"max_steps": 3, "batch_tokens": 256, "max_seq_len": 64, "samples": 0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "config.yaml"))
    assert code == 0, err
    report = RunDir(tmp_path / "runs" / "sharegpt").read_manifest().data_report
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # exactly the replies and their end-of-turn tokens carry loss, nothing of system or user
    replies = sum(len(tokenizer(f"{row['conversations'][1]['value']}<|im_end|>\n")["input_ids"])
                  for row in rows)
    assert report["format"] == "chat" and report["train_target_tokens"] == replies
