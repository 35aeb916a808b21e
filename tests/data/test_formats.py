"""Format detection and normalisation to Example; every malformed record names file:line."""

import json

import pytest

from tunelab.data.formats import (
    Record,
    Segment,
    detect_format,
    example_prompt,
    example_target,
    example_text,
    to_example,
    to_examples,
)
from tunelab.data.readers import read_records
from tunelab.errors import ConfigError, DataError

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\n"
)
ALPACA_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
)


def record(fields, line=7):
    return Record(fields, "train.jsonl", line)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def raises_data_error(fields, fmt, **kwargs):
    with pytest.raises(DataError) as error:
        to_example(record(fields), fmt, **kwargs)
    assert "train.jsonl:7" in str(error.value)
    return str(error.value)


@pytest.mark.parametrize(
    ("fields", "fmt"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"instruction": "do", "input": "", "output": "done"}, "instruction"),
        ({"prompt": "p", "completion": "c"}, "completion"),
        ({"text": "t", "id": 3}, "text"),
    ],
)
def test_detect_format(fields, fmt):
    assert detect_format(record(fields)) == fmt


def test_unknown_shape_lists_keys_and_suggests_template_mode():
    with pytest.raises(DataError) as error:
        detect_format(record({"review": "good", "label": "pos"}))
    assert "train.jsonl:7" in str(error.value)
    assert "'review', 'label'" in str(error.value)
    assert "data.prompt" in error.value.fix and "data.completion" in error.value.fix


def test_text_with_a_prompt_key_is_not_plain_text():
    with pytest.raises(DataError):
        detect_format(record({"text": "t", "prompt": "p"}))


def test_chat_multi_turn_with_weights():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "weight": 0},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye", "weight": 1},
    ]
    example = to_example(record({"messages": messages}), "chat")
    assert example.format == "chat" and example.where == "train.jsonl:7"
    assert [(m.role, m.content, m.weight) for m in example.messages] == [
        ("system", "Be brief.", None),
        ("user", "Hi", None),
        ("assistant", "Hello", 0),
        ("user", "Bye", None),
        ("assistant", "Goodbye", 1),
    ]
    assert example_target(example) == "Goodbye"
    assert example_prompt(example) == "system: Be brief.\nuser: Hi\nassistant: Hello\nuser: Bye"
    assert example_text(example).endswith("user: Bye\nassistant: Goodbye")


def test_chat_target_is_the_last_trained_reply():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "ignored", "weight": 0},
    ]
    example = to_example(record({"messages": messages}), "chat")
    assert example_target(example) == "Hello"
    assert example_prompt(example) == "user: Hi"


def test_instruction_with_input_uses_the_alpaca_template():
    fields = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    example = to_example(record(fields), "instruction")
    assert example.segments == [Segment(ALPACA_WITH_INPUT, False), Segment("Hello", True)]
    assert example.label == "Hello"


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}])
def test_instruction_without_input_uses_the_no_input_template(extra):
    example = to_example(record({"instruction": "Say hi.", "output": "hi", **extra}), "instruction")
    assert example.segments == [Segment(ALPACA_WITHOUT_INPUT, False), Segment("hi", True)]


def test_completion():
    example = to_example(record({"prompt": "2+2=", "completion": " 4"}), "completion")
    assert example.segments == [Segment("2+2=", False), Segment(" 4", True)]
    assert example.label == " 4"
    assert (example_prompt(example), example_target(example)) == ("2+2=", " 4")


def test_text_is_trained_whole():
    example = to_example(record({"text": "Once upon a time."}), "text")
    assert example.segments == [Segment("Once upon a time.", True)]
    assert example_prompt(example) == "" and example_target(example) == "Once upon a time."


def test_template_renders_columns_and_converts_numbers():
    fields = {"text": "Great film", "label": 1, "score": 4.5}
    example = to_example(
        record(fields),
        "template",
        prompt="Review: {text} ({score})\nSentiment:",
        completion=" {label}",
    )
    assert example.segments == [
        Segment("Review: Great film (4.5)\nSentiment:", False),
        Segment(" 1", True),
    ]
    assert example.label == "1"


def test_template_missing_column_suggests_the_closest():
    message = raises_data_error(
        {"text": "good", "label": "pos"}, "template", prompt="{txt}", completion=" {label}"
    )
    assert "'txt'" in message and "'text', 'label'" in message and "did you mean 'text'" in message


def test_empty_target_is_kept_for_the_quality_report():
    example = to_example(record({"prompt": "p", "completion": "  "}), "completion")
    assert example_target(example) == "  "


def test_bad_role_names_the_field_path():
    messages = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    message = raises_data_error({"messages": messages}, "chat")
    assert "messages[1].role 'bot' is not one of system, user, assistant, tool" in message


@pytest.mark.parametrize("weight", [0.5, 2, "1", True])
def test_bad_weight_names_the_field_path(weight):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "x", "weight": weight},
    ]
    assert "messages[1].weight" in raises_data_error({"messages": messages}, "chat")


def test_weight_on_a_user_message_is_rejected():
    messages = [
        {"role": "user", "content": "hi", "weight": 1},
        {"role": "assistant", "content": "x"},
    ]
    assert "messages[0].weight" in raises_data_error({"messages": messages}, "chat")


def test_chat_without_a_trained_assistant_reply_is_rejected():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "x", "weight": 0},
    ]
    assert "no assistant message is trained" in raises_data_error({"messages": messages}, "chat")


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], "messages is an empty list"),
        ("hi", "messages is a string"),
        (["hi"], "messages[0] is a string"),
        ([{"role": "user"}], "messages[0].content is missing"),
        ([{"role": "user", "content": None}], "messages[0].content is null"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
         "messages[0].tool_calls[0].function.name is missing"),
        ([{"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": "{city: Paris}"}}]}],
         "messages[0].tool_calls[0].function.arguments is not valid JSON"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                       {"type": "image_url", "image_url": {"url": "x"}}]}],
         "messages[0].content[1] is a content part of type 'image_url'"),
    ],
)
def test_malformed_messages(messages, expected):
    assert expected in raises_data_error({"messages": messages}, "chat")


def test_wrong_type_names_the_field_and_its_type():
    message = raises_data_error({"prompt": "p", "completion": 4}, "completion")
    assert "field 'completion' is a number (4), expected a string" in message


def test_missing_field_for_a_forced_format():
    message = raises_data_error({"prompt": "p"}, "completion")
    assert "missing field 'completion'" in message


def test_auto_mode_detects_each_file(tmp_path):
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        ],
    )
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "one"}, {"text": "two"}])
    examples = to_examples(read_records(chat) + read_records(plain))
    assert [(e.format, e.where) for e in examples] == [
        ("chat", f"{chat}:1"),
        ("text", f"{plain}:1"),
        ("text", f"{plain}:2"),
    ]


def test_a_file_mixing_formats_names_the_first_different_record(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "p", "completion": "c"},
            {"prompt": "p", "completion": "c"},
            {"text": "t"},
        ],
    )
    with pytest.raises(DataError) as error:
        to_examples(read_records(path))
    assert f"{path}:3" in str(error.value) and "line 1" in str(error.value)


def test_forced_format_rejects_a_record_of_another_shape(tmp_path):
    rows = [{"text": "a"}, {"prompt": "p", "completion": "c"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as error:
        to_examples(read_records(path), fmt="text")
    assert f"{path}:2" in str(error.value) and "missing field 'text'" in str(error.value)


def test_template_mode_over_a_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nGreat film,positive\nDull,negative\n", encoding="utf-8")
    examples = to_examples(
        read_records(path), prompt="Review: {text}\nSentiment:", completion=" {label}"
    )
    assert [(e.format, e.label, e.line) for e in examples] == [
        ("template", "positive", 2),
        ("template", "negative", 3),
    ]
    assert example_text(examples[0]) == "Review: Great film\nSentiment: positive"


def test_template_mode_needs_both_format_strings(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    with pytest.raises(ConfigError, match="data.completion"):
        to_examples(read_records(path), prompt="{text}")
    with pytest.raises(ConfigError, match="data.format"):
        to_examples(read_records(path), fmt="chat", prompt="{text}", completion="{text}")


def test_content_parts_are_joined():
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
    example = to_example(record({"messages": messages}), "chat")
    assert [m.content for m in example.messages] == ["Hi\nthere", "Hello"]


def test_tool_calls_tool_results_and_tools_are_read():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "21 degrees."},
    ]
    example = to_example(record({"messages": messages, "tools": tools}), "chat")
    call = example.messages[1]
    assert call.content == "" and call.tool_calls == [
        {"type": "function", "id": "c1",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert example.messages[2].tool_call_id == "c1" and example.tools == tools
    assert example_prompt(example).splitlines()[1] == "assistant: <tool_call>"
