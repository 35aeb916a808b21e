"""One renderer: evaluation prompts are, token for token, what training put before the target."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.data.formats import Record, Segment, to_example
from tunelab.data.render import (
    TOOLS_SYSTEM_PROMPT,
    chat_prompt,
    render_segments,
    user_prompt,
)
from tunelab.data.tokenize import IGNORE_INDEX, eval_prompts, tokenize_examples
from tunelab.errors import DataError

RECORDS = {
    "chat": {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Is the movie good?"},
                          {"role": "assistant", "content": "It is bad.", "weight": 0},
                          {"role": "user", "content": "And the book?"},
                          {"role": "assistant", "content": "It is good."}]},
    "instruction": {"instruction": "Classify the review.", "input": "A dull film.",
                    "output": "negative"},
    "completion": {"prompt": "Review: a dull film\nSentiment:", "completion": " negative"},
    "template": {"text": "a dull film", "label": "negative"},
}
TEMPLATE = {"prompt": "Review: {text}\nSentiment:", "completion": " {label}"}


def example(fmt: str, fields: dict | None = None):
    options = TEMPLATE if fmt == "template" else {}
    return to_example(Record(fields or RECORDS[fmt], "data.jsonl", 1), fmt, **options)


def first_trained(tokenized) -> int:
    return next(i for i, label in enumerate(tokenized.labels) if label != IGNORE_INDEX)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("fmt", sorted(RECORDS))
@pytest.mark.parametrize("cut", [False, True])
def test_eval_prompt_ids_are_the_training_ids_before_the_first_trained_token(
        tokenizer, fmt, cut):
    item = example(fmt)
    [whole] = tokenize_examples([item], tokenizer, max_seq_len=1024)
    max_seq_len = len(whole.input_ids) - 3 if cut else 1024  # cut: the prompt loses 3 tokens
    [trained] = tokenize_examples([item], tokenizer, max_seq_len=max_seq_len)
    [prompt] = eval_prompts([item], tokenizer, max_seq_len=max_seq_len)
    assert trained.truncated == cut and trained.n_target_tokens == whole.n_target_tokens
    assert prompt.ids == trained.input_ids[:first_trained(trained)]
    assert prompt.ids and len(trained.input_ids) <= max_seq_len
    expected = {"chat": "It is good.", "instruction": "negative", "completion": " negative",
                "template": " negative"}
    assert prompt.target == expected[fmt]


def test_the_same_holds_for_smollm2s_template(embedded_model):
    from tunelab.model.load import load_tokenizer

    tokenizer = load_tokenizer(embedded_model)
    items = [example(fmt) for fmt in sorted(RECORDS)]
    for trained, prompt in zip(tokenize_examples(items, tokenizer, max_seq_len=512),
                               eval_prompts(items, tokenizer), strict=True):
        assert prompt.ids == trained.input_ids[:first_trained(trained)]
    chat = eval_prompts([example("chat")], tokenizer)[0]
    assert chat.text.endswith("<|im_start|>user\nAnd the book?<|im_end|>\n"
                              "<|im_start|>assistant\n")


def test_prompt_truncation_keeps_the_start_the_end_and_the_whole_target(tokenizer):
    long = {"text": "the movie was good " * 40, "label": "positive"}
    [cut] = tokenize_examples([example("template", long)], tokenizer, max_seq_len=32)
    [ended] = tokenize_examples([example("template", long)], tokenizer, max_seq_len=32,
                                truncation="end")
    [dropped] = tokenize_examples([example("template", long)], tokenizer, max_seq_len=32,
                                  truncation="drop")
    target = tokenizer(" positive", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert len(cut.input_ids) == 32 and cut.input_ids[-len(target):] == target
    assert [label for label in cut.labels if label != IGNORE_INDEX] == target
    text = tokenizer.decode(cut.input_ids)
    assert text.startswith("Review: the movie")
    assert text.endswith("good \nSentiment: positive<|im_end|>")
    assert ended.n_target_tokens == 0 and ended.truncated  # the label is what "end" loses
    assert dropped.input_ids == [] and dropped.n_target_tokens == 0


def test_few_shot_chat_demonstrations_are_earlier_turns(tokenizer):
    query, demo = example("chat"), example("chat", {"messages": [
        {"role": "system", "content": "Demo system, not shown."},
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]})
    [prompt] = eval_prompts([query], tokenizer, demos=[[demo]])
    assert "Demo system" not in prompt.text
    assert prompt.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1")
    assert prompt.text.endswith("And the book?<|im_end|>\n<|im_start|>assistant\n")
    [plain] = eval_prompts([example("completion")], tokenizer, demos=[[example("template")]])
    assert plain.text == "Review: a dull film\nSentiment: negative\n\nReview: a dull film\n" \
        "Sentiment:"


TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "parameters": {"type": "object"}}}]
TOOL_CHAT = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"temp_c\": 21}"},
    {"role": "assistant", "content": "It is 21 degrees."}]}


def test_tools_fallback_for_a_template_without_tool_support(tokenizer):
    item = example("chat", TOOL_CHAT)
    text = "".join(s.text for s in render_segments(item, tokenizer))
    listing = TOOLS_SYSTEM_PROMPT.format(tools=json.dumps(TOOLS[0]))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert text == (f"<|im_start|>system\n{listing}<|im_end|>\n"
                    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                    f"<|im_start|>assistant\n{call}<|im_end|>\n"
                    "<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response>"
                    "<|im_end|>\n<|im_start|>assistant\nIt is 21 degrees.<|im_end|>\n")
    trained = [s.text for s in render_segments(item, tokenizer) if s.train]
    assert trained == [f"{call}<|im_end|>\n", "It is 21 degrees.<|im_end|>\n"]
    # the reference of a tool-calling turn is its calls, written the same way
    calls_only = example("chat", {**TOOL_CHAT, "messages": TOOL_CHAT["messages"][:2]})
    assert eval_prompts([calls_only], tokenizer)[0].target == call


# A template that renders tools itself (the shape of Qwen2.5's, much shortened).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_knows_tools_renders_them_itself(tokenizer):
    item = example("chat", TOOL_CHAT)
    text = "".join(s.text for s in render_segments(item, tokenizer, TOOL_TEMPLATE))
    assert text.startswith('<|im_start|>system\nTOOLS [{"type": "function"')
    assert 'CALL get_weather {"city": "Paris"}' in text and "<tool_call>" not in text
    assert "<|im_start|>tool\n{\"temp_c\": 21}" in text


def test_chat_prompt_for_serving_equals_the_training_prompt(tokenizer):
    served = chat_prompt(TOOL_CHAT["messages"][:3], tokenizer, tools=TOOLS)
    item = example("chat", TOOL_CHAT)
    [trained] = tokenize_examples([item], tokenizer, max_seq_len=1024)
    assert served.ids == trained.input_ids[:len(served.ids)]
    assert served.text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert user_prompt("Hi", tokenizer, chat=True) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert chat_prompt([{"role": "user", "content": parts}], tokenizer).text == \
        user_prompt("Hi\nthere", tokenizer, chat=True)
    with pytest.raises(DataError, match="image_url"):
        chat_prompt([{"role": "user", "content": [{"type": "image_url"}]}], tokenizer)


# Qwen3's real template (tests/data/templates/README.md): not prefix-stable, so the mask comes
# from one whole rendering.
QWEN3 = (Path(__file__).parent / "templates" / "qwen3.jinja").read_text()
TWO_TURNS = {"messages": [{"role": "user", "content": "Is the movie good?"},
                          {"role": "assistant", "content": "It is bad."},
                          {"role": "user", "content": "And the book?"},
                          {"role": "assistant", "content": "It is good."}]}
NO_THINKING = {"enable_thinking": False}


def test_qwen3_two_turns_train_exactly_the_answers_and_their_end_of_turn(tokenizer):
    item = example("chat", TWO_TURNS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with thinking off, serving's prompt is training's
        segments = render_segments(item, tokenizer, QWEN3, NO_THINKING)
    assert segments == [
        Segment("<|im_start|>user\nIs the movie good?<|im_end|>\n<|im_start|>assistant\n", False),
        Segment("It is bad.<|im_end|>", True),
        Segment("\n<|im_start|>user\nAnd the book?<|im_end|>\n<|im_start|>assistant\n"
                "<think>\n\n</think>\n\n", False),  # Qwen3 writes the empty block last only
        Segment("It is good.<|im_end|>", True),
        Segment("\n", False)]
    [tokenized] = tokenize_examples([item], tokenizer, max_seq_len=1024, chat_template=QWEN3,
                                    chat_template_kwargs=NO_THINKING)
    runs, run = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels, strict=True):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    assert [tokenizer.decode(ids) for ids in runs] == ["It is bad.<|im_end|>",
                                                       "It is good.<|im_end|>"]
    # a turn with weight 0 is located but untrained
    unweighted = json.loads(json.dumps(TWO_TURNS))
    unweighted["messages"][1]["weight"] = 0
    trained = [s.text for s in render_segments(example("chat", unweighted), tokenizer, QWEN3,
                                               NO_THINKING) if s.train]
    assert trained == ["It is good.<|im_end|>"]


def test_enable_thinking_false_reaches_the_template_and_serving_matches_training(tokenizer):
    item = example("chat", TWO_TURNS)
    served = chat_prompt(TWO_TURNS["messages"][:3], tokenizer, chat_template=QWEN3,
                         chat_template_kwargs=NO_THINKING)
    assert served.text.endswith("And the book?<|im_end|>\n<|im_start|>assistant\n"
                                "<think>\n\n</think>\n\n")
    [evaluated] = eval_prompts([item], tokenizer, chat_template=QWEN3,
                               chat_template_kwargs=NO_THINKING)
    assert evaluated.text == served.text and evaluated.ids == served.ids
    assert evaluated.target == "It is good."
    assert user_prompt("Hi", tokenizer, chat=True, chat_template=QWEN3,
                       chat_template_kwargs=NO_THINKING).endswith("<think>\n\n</think>\n\n")
    # thinking on (the template's default): serving's prompt lacks the block training has
    thinking = chat_prompt(TWO_TURNS["messages"][:3], tokenizer, chat_template=QWEN3).text
    assert thinking.endswith("<|im_start|>assistant\n")
    with pytest.warns(UserWarning, match="enable_thinking: false"):
        render_segments(item, tokenizer, QWEN3)


def test_a_content_the_rendering_does_not_hold_is_refused_clearly(tokenizer):
    # Qwen3 drops the reasoning of an earlier answer, so that answer is not there verbatim
    record = json.loads(json.dumps(TWO_TURNS))
    record["messages"][1]["content"] = "<think>\nDull.\n</think>\n\nIt is bad."
    with pytest.raises(DataError, match="message 2, an assistant turn, is not in the whole"):
        render_segments(example("chat", record), tokenizer, QWEN3, NO_THINKING)
    with pytest.raises(DataError, match="tool calls only"):
        render_segments(example("chat", TOOL_CHAT), tokenizer, QWEN3, NO_THINKING)


def test_generation_tags_give_the_mask_where_the_template_has_them(tokenizer):
    tagged = QWEN3.replace(
        "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
        "        {% generation %}{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
        "    {%- elif message.role == \"tool\" %}").replace(
        "{{- '<|im_start|>' + message.role + '\\n' + content }}",
        "{{- '<|im_start|>' + message.role + '\\n' }}{% generation %}{{- content }}"
        "{% endgeneration %}").replace(
        "+ '\\n</think>\\n\\n' + content.lstrip('\\n') }}",
        "+ '\\n</think>\\n\\n' }}{% generation %}{{- content.lstrip('\\n') }}"
        "{% endgeneration %}")
    assert tagged.count("{% generation %}") == 4
    unweighted = json.loads(json.dumps(TWO_TURNS))
    unweighted["messages"][1]["weight"] = 0
    for record, trained in ((TWO_TURNS, ["It is bad.<|im_end|>", "It is good.<|im_end|>"]),
                            (unweighted, ["It is good.<|im_end|>"])):
        segments = render_segments(example("chat", record), tokenizer, tagged, NO_THINKING)
        assert [s.text for s in segments if s.train] == trained
        assert "".join(s.text for s in segments) == tokenizer.apply_chat_template(
            record["messages"], chat_template=tagged, tokenize=False, enable_thinking=False)


def test_the_runs_data_section_passes_its_template_kwargs_to_training(tokenizer, tmp_path):
    """tokenize_as_trained (what train, plan and data check call) renders with
    data.chat_template_kwargs: with thinking off, a one-turn Qwen3 answer trains its content
    and end of turn, not the empty think block the template writes before it."""
    from tunelab.config import DataConfig
    from tunelab.data.prepare import tokenize_as_trained

    one_turn = {"messages": TWO_TURNS["messages"][:2]}
    item = example("chat", one_turn)
    trained = {}
    for kwargs in ({}, NO_THINKING):
        data = DataConfig(train=[str(tmp_path / "unused.jsonl")], chat_template=QWEN3,
                          chat_template_kwargs=kwargs)
        [tokens] = tokenize_as_trained([item], tokenizer, data, max_seq_len=1024)
        trained[bool(kwargs)] = tokenizer.decode(
            [t for t, label in zip(tokens.input_ids, tokens.labels, strict=True)
             if label != IGNORE_INDEX])
    answer = one_turn["messages"][1]["content"]
    assert trained[True] == f"{answer}<|im_end|>\n"
    assert "<think>" in trained[False]  # without the kwargs the think block is trained
