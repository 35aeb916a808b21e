"""Detect and normalise chat / sharegpt / instruction / completion / text / template records.

Accepted record shapes (one per file in auto mode):

- chat: OpenAI fine-tuning format, ``{"messages": [{"role", "content", "weight"?}, ...],
  "tools"?: [...]}``; roles system/user/assistant/tool; ``weight`` (0 or 1) only on assistant
  turns. ``content`` may be a list of ``{"type": "text", "text": ...}`` parts (joined with a
  newline, as vLLM does); other part types (images, audio) are refused. Assistant turns may
  carry OpenAI ``tool_calls`` (their ``arguments``, a JSON string or an object, are parsed into
  an object), ``tool`` turns the tool's result.
- sharegpt (ShareGPT, as LLaMA-Factory and Axolotl read it): ``{"conversations": [{"from",
  "value"}, ...], "system"?, "tools"?}``, or the same turns under ``messages``. ``from`` is
  human/user, gpt/assistant/model/chatgpt, system, function_call (an assistant's tool call, its
  value the call's JSON), or observation/tool (the tool's result). A ``system`` column is the
  system prompt, a ``tools`` column (a JSON string or a list) the tools offered. Normalised to a
  chat Example, so it renders and trains exactly as OpenAI chat data: loss on the assistant turns.
- instruction (Alpaca): ``{"instruction", "input"?, "output"}``. The prompt is the standard
  Alpaca template, ``ALPACA_PROMPT`` when ``input`` is non-empty::

      Below is an instruction that describes a task, paired with an input that provides further
      context. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      ### Input:
      {input}

      ### Response:

  and ``ALPACA_PROMPT_NO_INPUT`` (no "paired with an input..." clause, no Input section) when
  ``input`` is missing, null, empty or whitespace. The output is the trained segment.
- completion: ``{"prompt", "completion"}``; the completion is trained. TRL's conversational
  form, ``prompt`` and ``completion`` as lists of chat messages, is a chat Example whose
  completion messages are trained and whose prompt messages are context.
- text: ``{"text"}``; all of it is trained.
- template: any columns, rendered by ``data.prompt`` / ``data.completion`` format strings.

An empty target is kept, not rejected: the quality report flags it.
"""

from __future__ import annotations

import difflib
import json
import string
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import Any

from tunelab.data.records import Record
from tunelab.errors import ConfigError, DataError


@dataclass
class Message:
    """One chat turn. ``weight`` follows OpenAI's fine-tuning format: 0 or 1 on assistant turns."""

    role: str  # system | user | assistant | tool
    content: str
    weight: int | None = None  # None: trained if assistant
    # OpenAI tool calls: [{"id"?, "type": "function", "function": {"name", "arguments": {...}}}]
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None  # on tool turns: the call this result answers


def tool_call_text(tool_calls: list[dict]) -> str:
    """Tool calls as text: one ``<tool_call>`` block of ``{"name", "arguments"}`` JSON per call.

    This is the Hermes / Qwen2.5 convention, which many open models are trained on; tunelab
    renders calls this way when a chat template has no tool support, and it is the canonical
    reference text of a tool-calling turn in evaluation.
    """
    blocks = []
    for call in tool_calls:
        function = call["function"]
        body = json.dumps({"name": function["name"], "arguments": function["arguments"]},
                          ensure_ascii=False)
        blocks.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(blocks)


def message_text(message: Message) -> str:
    """What a turn says as plain text: its content, then its tool calls (if any)."""
    if not message.tool_calls:
        return message.content
    calls = tool_call_text(message.tool_calls)
    return f"{message.content}\n{calls}" if message.content else calls


@dataclass
class Segment:
    """A piece of rendered text and whether its tokens carry loss."""

    text: str
    train: bool


@dataclass
class Example:
    """A normalised training example: chat messages, or text segments with loss flags."""

    format: str  # chat | instruction | completion | text | template
    source: str
    line: int
    messages: list[Message] | None = None  # chat: rendered later with the tokenizer's template
    segments: list[Segment] = field(default_factory=list)  # every other format
    label: str | None = None  # template / completion data: the target text, for label balance
    tools: list[dict] | None = None  # chat: the OpenAI tool definitions offered to the model

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


# --- detection and normalisation ------------------------------------------------------------

FORMATS = ("chat", "sharegpt", "instruction", "completion", "text", "template")
ROLES = ("system", "user", "assistant", "tool")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

_SHAPES = (
    '{"messages": [{"role": ..., "content": ...}, ...]} (chat), '
    '{"conversations": [{"from": ..., "value": ...}, ...]} (sharegpt), '
    '{"instruction", "input" (optional), "output"} (instruction), '
    '{"prompt", "completion"} (completion: strings, or TRL\'s message lists), {"text"} (text)'
)
_TEMPLATE_FIX = (
    "rename the fields to one of these shapes, or use template mode: set data.prompt and "
    "data.completion in the config to format strings over your columns, e.g. prompt: "
    '"Review: {text}\\nSentiment:" and completion: " {label}"'
)
_ROLE_HINTS = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


#: The preference shapes (data/preference.py reads them) that supervised reading refuses.
PREFERENCE_SHAPES = {
    "paired": '{"prompt", "chosen", "rejected"} (TRL)',
    "openai": '{"input": {"messages"}, "preferred_output", "non_preferred_output"} (OpenAI DPO)',
    "rejected_response": '{"messages", "rejected_response"}',
}


def preference_shape(record: Record) -> str | None:
    """The record's preference shape by its keys (a key of ``PREFERENCE_SHAPES``), or None."""
    keys = record.fields
    if "chosen" in keys and "rejected" in keys:
        return "paired"
    if "preferred_output" in keys:
        return "openai"
    if "rejected_response" in keys:
        return "rejected_response"
    return None


def detect_format(record: Record) -> str:
    """The record's format from its keys: chat, sharegpt, instruction, completion or text.

    Raises DataError listing the record's keys and the accepted shapes when none fits, and for
    preference records (a chosen and a rejected answer, or KTO's labelled answers in
    LLaMA-Factory's ``kto_tag``), which supervised training cannot read.
    """
    keys = record.fields
    shape = preference_shape(record)
    if shape is not None and "conversations" in keys:
        raise DataError(
            "this record is ShareGPT preference data (LLaMA-Factory: conversations with a chosen "
            "and a rejected turn), which supervised fine-tuning cannot read",
            where=record.where,
            fix='write it as TRL\'s pairs, which method.objective: dpo reads: {"prompt": [the '
            'conversation as {"role", "content"} messages], "chosen": [{"role": "assistant", '
            '"content": ...}], "rejected": [...]}',
        )
    if shape is not None:
        raise DataError(
            f"this record is preference data ({PREFERENCE_SHAPES[shape]}), which supervised "
            "fine-tuning cannot read",
            where=record.where,
            fix="set method.objective: dpo (or simpo, kto) in the config to train on preference "
            "pairs",
        )
    if "kto_tag" in keys:
        raise DataError(
            "this record is KTO data (LLaMA-Factory's kto_tag labels the answer good or bad), "
            "which supervised fine-tuning cannot read: it would train on the bad answers too",
            where=record.where,
            fix='write it as {"prompt": [messages], "completion": [{"role": "assistant", '
            '"content": ...}], "label": true/false} and set method.objective: kto',
        )
    if sharegpt_field(record) is not None:
        return "sharegpt"
    if "messages" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "instruction"
    if "prompt" in keys and "completion" in keys:
        return "completion"
    if "text" in keys and not keys.keys() & {"prompt", "completion", "instruction"}:
        return "text"
    raise DataError(
        f"cannot tell the format of a record with keys {_key_list(record)}; accepted shapes: "
        f"{_SHAPES}",
        where=record.where,
        fix=_TEMPLATE_FIX,
    )


def to_example(
    record: Record, fmt: str, *, prompt: str | None = None, completion: str | None = None
) -> Example:
    """Normalise one record of a known format into an Example (segments or chat messages).

    ``prompt`` and ``completion`` are the format strings of template mode (``fmt="template"``).
    Raises DataError naming file:line and the field for missing fields and wrong types.
    """
    if fmt == "chat":
        messages = _chat_messages(record)
        return Example("chat", record.source, record.line, messages=messages,
                       tools=_tools(record))
    if fmt == "sharegpt":
        return _sharegpt_example(record)
    if fmt == "instruction":
        instruction = _string_field(record, "instruction", fmt)
        output = _string_field(record, "output", fmt)
        context = _string_field(record, "input", fmt, required=False)
        if context and not context.isspace():
            prompt_text = ALPACA_PROMPT.format(instruction=instruction, input=context)
        else:
            prompt_text = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        segments = [Segment(prompt_text, train=False), Segment(output, train=True)]
        return Example(fmt, record.source, record.line, segments=segments, label=output)
    if fmt == "completion" and _conversational(record):
        return _conversational_example(record)
    if fmt == "completion":
        prompt_text = _string_field(record, "prompt", fmt)
        target = _string_field(record, "completion", fmt)
        segments = [Segment(prompt_text, train=False), Segment(target, train=True)]
        return Example(fmt, record.source, record.line, segments=segments, label=target)
    if fmt == "text":
        segments = [Segment(_string_field(record, "text", fmt), train=True)]
        return Example(fmt, record.source, record.line, segments=segments)
    if fmt == "template":
        if prompt is None or completion is None:
            raise ValueError("template format needs both prompt and completion format strings")
        prompt_text = _render_template(record, prompt, "data.prompt")
        target = _render_template(record, completion, "data.completion")
        segments = [Segment(prompt_text, train=False), Segment(target, train=True)]
        return Example(fmt, record.source, record.line, segments=segments, label=target.strip())
    raise ConfigError(
        f"unknown data format '{fmt}'",
        where="data.format",
        fix=f"use auto or one of {', '.join(FORMATS)}",
    )


def _key_list(record: Record) -> str:
    return ", ".join(map(repr, record.fields)) or "(none)"


def _kind(value: Any) -> str:
    """What a JSON-ish value is, with its article: 'a string', 'a number', 'null'."""
    if value is None:
        return "null"
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _string_field(record: Record, name: str, fmt: str, *, required: bool = True) -> str:
    if name not in record.fields:
        if not required:
            return ""
        raise DataError(
            f"missing field '{name}' (format '{fmt}' needs {_NEEDS[fmt]}; the record has keys "
            f"{_key_list(record)})",
            where=record.where,
            fix=f"add '{name}' to every record, or set data.format to the format the file uses",
        )
    value = record.fields[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"field '{name}' is {_kind(value)} ({_preview(value)}), expected a string",
            where=record.where,
            fix=_string_fix(name, value, fmt),
        )
    return value


def _string_fix(name: str, value: Any, fmt: str) -> str:
    """How to write a field that must be text. Never "quote the list": a message list written as
    a string would be trained on as its Python/JSON text."""
    if value is None:
        return f'give \'{name}\' a text value in every record ("" when there is none)'
    if isinstance(value, (bool, int, float)):
        return f"write the value as text: \"{name}\": {json.dumps(json.dumps(value))}"
    if fmt == "completion":
        return (f"write '{name}' as a string, or (TRL's conversational form) prompt and "
                'completion as lists of messages, e.g. "prompt": [{"role": "user", "content": '
                '"..."}], "completion": [{"role": "assistant", "content": "..."}]')
    return (f"put the text itself in '{name}'; for conversations use the chat format "
            '({"messages": [{"role", "content"}, ...]}) or ShareGPT ({"conversations": '
            '[{"from", "value"}, ...]})')


_NEEDS = {
    "chat": "messages",
    "sharegpt": "conversations",
    "instruction": "instruction and output",
    "completion": "prompt and completion",
    "text": "text",
}


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chat_messages(record: Record) -> list[Message]:
    """Validate OpenAI fine-tuning chat messages; errors name the field path."""
    if "messages" not in record.fields:
        sharegpt = "conversations" in record.fields
        raise DataError(
            f"missing field 'messages' (format 'chat' needs messages; the record has keys "
            f"{_key_list(record)})",
            where=record.where,
            fix="set data.format: sharegpt (or auto) for ShareGPT conversations" if sharegpt
            else "add a messages list to every record, or set data.format to the file's format",
        )
    raw_messages = record.fields["messages"]
    if not isinstance(raw_messages, list) or not raw_messages:
        what = "an empty list" if raw_messages == [] else _kind(raw_messages)
        raise DataError(
            f"messages is {what}, expected a non-empty list of {{role, content}} objects",
            where=record.where,
            fix='write messages as [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]',
        )
    messages = [_chat_message(record, f"messages[{index}]", raw)
                for index, raw in enumerate(raw_messages)]
    _check_trained(record, messages)
    return messages


def _check_trained(record: Record, messages: list[Message],
                   what: str = "assistant message") -> None:
    if not any(m.role == "assistant" and m.weight != 0 for m in messages):
        raise DataError(
            f"no {what} is trained: there is none, or every one has weight 0",
            where=record.where,
            fix="add an assistant message (the reply the model should learn) with weight 1 "
            "or without a weight",
        )


def _chat_message(record: Record, path: str, raw: Any) -> Message:
    if not isinstance(raw, dict):
        raise DataError(
            f"{path} is {_kind(raw)}, expected an object with role and content",
            where=record.where,
            fix='write each message as {"role": "user", "content": "..."}',
        )
    role = raw.get("role")
    if role is None and "from" in raw and "value" in raw:
        raise DataError(
            f"{path} is a ShareGPT turn (from / value), not an OpenAI message (role / content)",
            where=record.where,
            fix="set data.format: sharegpt (or auto, which detects it), or rename the keys",
        )
    if role not in ROLES:
        hint = _ROLE_HINTS.get(role) if isinstance(role, str) else None
        described = "missing" if role is None else f"{_preview(role)}"
        fix = f"use role '{hint}'" if hint else "use 'user' for the human turns"
        raise DataError(
            f"{path}.role {described} is not one of {', '.join(ROLES)}",
            where=record.where,
            fix=f"{fix} and 'assistant' for the replies the model should learn",
        )
    tool_calls = _tool_calls(record, path, role, raw.get("tool_calls"))
    content = raw.get("content")
    if isinstance(content, list):
        content = _joined_parts(record, path, content)
    elif content is None and tool_calls:
        content = ""  # OpenAI writes content: null on a turn that only calls tools
    elif not isinstance(content, str):
        raise DataError(
            f"{path}.content is {'missing' if 'content' not in raw else _kind(content)}, "
            "expected a string",
            where=record.where,
            fix="give every message its text as a string in content, or as a list of "
            '{"type": "text", "text": "..."} parts',
        )
    weight = raw.get("weight")
    if weight is not None:
        _check_weight(record, path, role, weight)
        weight = int(weight)
    tool_call_id = raw.get("tool_call_id") if role == "tool" else None
    return Message(role=role, content=content, weight=weight, tool_calls=tool_calls,
                   tool_call_id=tool_call_id if isinstance(tool_call_id, str) else None)


def _joined_parts(record: Record, path: str, parts: list) -> str:
    """OpenAI content parts → one string; only text parts can be trained on."""
    texts = []
    for index, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            described = f"type {kind!r}" if kind else _kind(part)
            raise DataError(
                f"{path}.content[{index}] is a content part of {described}; only text parts "
                '({"type": "text", "text": "..."}) can be used',
                where=record.where,
                fix="drop the record, or replace images, audio and files by a text description",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_calls(record: Record, path: str, role: str, raw: Any) -> list[dict] | None:
    """Validate OpenAI tool calls; arguments become objects (JSON strings are parsed)."""
    if raw is None or raw == []:
        return None
    example = ('"tool_calls": [{"type": "function", "function": {"name": "get_weather", '
               '"arguments": "{\\"city\\": \\"Paris\\"}"}}]')
    if role != "assistant" or not isinstance(raw, list):
        what = f"on a {role} message" if role != "assistant" else f"{_kind(raw)}"
        raise DataError(f"{path}.tool_calls is {what}; tool calls are a list on assistant turns",
                        where=record.where, fix=f"write them as {example}")
    calls = []
    for index, call in enumerate(raw):
        where = f"{path}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}.function.name is missing; a tool call names the function "
                            "it calls", where=record.where, fix=f"write it as {example}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise DataError(f"{where}.function.arguments is not valid JSON ({error.msg})",
                                where=record.where,
                                fix="write the arguments as a JSON object, or a string holding "
                                "one") from None
        if not isinstance(arguments, dict):
            raise DataError(f"{where}.function.arguments is {_kind(arguments)}, expected a JSON "
                            "object", where=record.where, fix=f"write it as {example}")
        normalised = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            normalised["id"] = call["id"]
        calls.append(normalised)
    return calls


def _tools(record: Record, tools: Any = None) -> list[dict] | None:
    """The record's OpenAI ``tools`` list (function definitions; ``tools`` in place of the
    record's column), checked for names."""
    tools = record.fields.get("tools") if tools is None else tools
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise DataError(f"tools is {_kind(tools)}, expected a list of function definitions",
                        where=record.where,
                        fix='write tools as [{"type": "function", "function": {"name": ..., '
                        '"description": ..., "parameters": {...}}}]')
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(f"tools[{index}] has no function.name",
                            where=record.where,
                            fix='write each tool as {"type": "function", "function": {"name": '
                            '..., "parameters": {...}}}')
    return tools


def _check_weight(record: Record, path: str, role: str, weight: Any) -> None:
    if role != "assistant":
        raise DataError(
            f"{path}.weight is set on a {role} message; only assistant messages carry a weight",
            where=record.where,
            fix="remove the weight (only assistant replies are trained)",
        )
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise DataError(
            f"{path}.weight is {_preview(weight)}, expected 0 or 1",
            where=record.where,
            fix="use weight 1 to train on this reply and 0 to skip it",
        )


# --- ShareGPT and TRL's conversational prompt / completion ----------------------------------

#: ShareGPT speakers (``from``) as chat roles, as LLaMA-Factory and Axolotl map them;
#: function_call is an assistant turn that calls a tool, observation the tool's answer.
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool", "tool": "tool",
}


def sharegpt_field(record: Record) -> str | None:
    """The column holding a record's ShareGPT turns: ``conversations``, or ``messages`` whose
    first turn is ``{from, value}``; None for anything else."""
    fields = record.fields
    if "conversations" in fields:
        return "conversations"
    turns = fields.get("messages")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) \
            and "from" in turns[0] and "role" not in turns[0]:
        return "messages"
    return None


def _sharegpt_example(record: Record) -> Example:
    """ShareGPT turns (plus the record's system and tools columns) → a chat Example."""
    if "kto_tag" in record.fields or preference_shape(record) is not None:
        detect_format(record)  # raises: preference data, even where data.format names sharegpt
    name = sharegpt_field(record)
    if name is None:
        raise DataError(
            f"missing field 'conversations' (format 'sharegpt' needs conversations; the record "
            f"has keys {_key_list(record)})",
            where=record.where,
            fix="add a conversations list of {from, value} turns, or set data.format to the "
            "file's format",
        )
    turns = record.fields[name]
    if not isinstance(turns, list) or not turns:
        what = "an empty list" if turns == [] else _kind(turns)
        raise DataError(f"{name} is {what}, expected a non-empty list of {{from, value}} turns",
                        where=record.where,
                        fix='write it as [{"from": "human", "value": "..."}, {"from": "gpt", '
                        '"value": "..."}]')
    messages = [_sharegpt_message(record, f"{name}[{index}]", turn)
                for index, turn in enumerate(turns)]
    system = record.fields.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise DataError(f"field 'system' is {_kind(system)}, expected the system prompt as "
                            "a string", where=record.where, fix="write system as a string")
        if messages[0].role == "system":
            raise DataError(f"the record has a system column and {name}[0] is a system turn; "
                            "which one is the system prompt is ambiguous", where=record.where,
                            fix="keep one of the two")
        messages.insert(0, Message(role="system", content=system))
    _check_trained(record, messages, "gpt (assistant) turn")
    return Example("chat", record.source, record.line, messages=messages,
                   tools=_tools(record, _sharegpt_tools(record)))


def _sharegpt_message(record: Record, path: str, turn: Any) -> Message:
    if not isinstance(turn, dict):
        raise DataError(f"{path} is {_kind(turn)}, expected an object with from and value",
                        where=record.where, fix='write each turn as {"from": "human", '
                        '"value": "..."}')
    speaker_key = "from" if "from" in turn or "role" not in turn else "role"
    speaker = turn.get(speaker_key)
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        described = "is missing" if speaker is None else (
            f"{_preview(speaker)} is not one of {', '.join(SHAREGPT_ROLES)}")
        raise DataError(f"{path}.{speaker_key} {described}", where=record.where,
                        fix="use human for the person's turns, gpt for the replies the model "
                        "should learn, system, function_call (a tool call) or observation (its "
                        "result)")
    value_key = "value" if "value" in turn or "content" not in turn else "content"
    value = turn.get(value_key)
    raw: dict[str, Any] = {"role": SHAREGPT_ROLES[speaker]}
    if speaker == "function_call":
        raw.update(content="", tool_calls=_sharegpt_calls(record, f"{path}.{value_key}", value))
    elif isinstance(value, (str, list)):
        raw["content"] = value
    else:
        what = "missing" if value_key not in turn else _kind(value)
        raise DataError(f"{path}.{value_key} is {what}, expected the turn's text as a string",
                        where=record.where,
                        fix=f"give every turn its text as a string in {value_key}")
    if "weight" in turn:
        raw["weight"] = turn["weight"]
    return _chat_message(record, path, raw)


def _sharegpt_calls(record: Record, path: str, value: Any) -> list[dict]:
    """A function_call turn's value: one ``{"name", "arguments"}`` call or a list of them, as
    JSON text or as objects (LLaMA-Factory writes JSON text) → OpenAI tool calls."""
    example = '"{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"Paris\\"}}"'
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON ({error.msg}); a function_call turn "
                            "holds the call as JSON", where=record.where,
                            fix=f"write it as {example}") from None
    calls = value if isinstance(value, list) else [value]
    normalised = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise DataError(f"{path} has no function name; a function_call turn holds "
                            '{"name", "arguments"}', where=record.where,
                            fix=f"write it as {example}")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: the arguments of {call['name']} are not valid JSON "
                                f"({error.msg})", where=record.where,
                                fix="write the arguments as a JSON object") from None
        if not isinstance(arguments, dict):
            raise DataError(f"{path}: the arguments of {call['name']} are {_kind(arguments)}, "
                            "expected an object", where=record.where,
                            fix=f"write it as {example}")
        normalised.append({"type": "function",
                           "function": {"name": call["name"], "arguments": arguments}})
    return normalised


def _sharegpt_tools(record: Record) -> list[dict] | None:
    """LLaMA-Factory's tools column (a JSON string, or a list, of function definitions) as
    OpenAI tools; definitions already in OpenAI's shape are kept."""
    tools = record.fields.get("tools")
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise DataError(f"field 'tools' is not valid JSON ({error.msg})", where=record.where,
                            fix='write tools as a list of {"name", "description", "parameters"} '
                            "definitions, or as a string holding one") from None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        return tools
    return [tool if not isinstance(tool, dict) or "function" in tool or "name" not in tool
            else {"type": "function", "function": tool} for tool in tools]


def _conversational(record: Record) -> bool:
    """TRL's conversational prompt-completion: prompt or completion is a list of messages."""
    return any(isinstance(record.fields.get(name), list) for name in ("prompt", "completion"))


def _conversational_example(record: Record) -> Example:
    """Prompt messages (context, never trained) then completion messages (the assistant turns
    trained), as TRL's SFTTrainer trains them; a string on either side is one message."""
    messages: list[Message] = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        value = record.fields.get(name)
        if isinstance(value, str):
            raws, paths = [{"role": role, "content": value}], [name]
        elif isinstance(value, list) and value:
            raws, paths = value, [f"{name}[{index}]" for index in range(len(value))]
        else:
            what = "missing" if name not in record.fields else (
                "an empty list" if value == [] else _kind(value))
            raise DataError(f"field '{name}' is {what}; in TRL's conversational form prompt and "
                            "completion are lists of chat messages", where=record.where,
                            fix=f'write {name} as [{{"role": "{role}", "content": "..."}}]')
        part = [_chat_message(record, path, raw) for path, raw in zip(paths, raws, strict=True)]
        if name == "prompt":
            for message in part:
                if message.role == "assistant":
                    message.weight = 0  # the prompt's replies are context
        else:
            _check_trained(record, part, "assistant message of completion")
        messages += part
    return Example("chat", record.source, record.line, messages=messages, tools=_tools(record))


def _template_fields(template: str, config_key: str) -> list[str]:
    """The column names a format string uses; ConfigError for a malformed template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ConfigError(
            f"the format string {template!r} is malformed ({error})",
            where=config_key,
            fix="write columns as {name}; write a literal brace as {{ or }}",
        ) from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ConfigError(
                f"the format string {template!r} uses {{{name}}}; only plain column names work",
                where=config_key,
                fix="name a column, e.g. {text}",
            )
        names.append(name)
    return names


def _render_template(record: Record, template: str, config_key: str) -> str:
    values = {}
    for name in _template_fields(template, config_key):
        values[name] = _template_value(record, name, config_key)
    try:
        return template.format_map(values)
    except (ValueError, TypeError) as error:
        raise DataError(
            f"{config_key} {template!r} cannot format this record ({error})",
            where=record.where,
            fix=f"check the format spec in {config_key} against the column's values",
        ) from None


def _template_value(record: Record, name: str, config_key: str) -> Any:
    if name not in record.fields:
        similar = difflib.get_close_matches(name, list(map(str, record.fields)), n=1)
        hint = f"did you mean '{similar[0]}'? " if similar else ""
        raise DataError(
            f"{config_key} uses column '{name}', which this record does not have "
            f"(columns: {_key_list(record)})",
            where=record.where,
            fix=f"{hint}use one of the record's columns in {config_key}",
        )
    value = record.fields[name]
    # numbers and booleans format as str(value); anything else would print Python reprs
    if isinstance(value, (str, int, float)):
        return value
    raise DataError(
        f"column '{name}' is {_kind(value)}, which cannot be put into {config_key}",
        where=record.where,
        fix=f"give '{name}' a text or number value in every record",
    )


# --- records of whole files -----------------------------------------------------------------


def to_examples(
    records: list[Record],
    fmt: str = "auto",
    *,
    prompt: str | None = None,
    completion: str | None = None,
) -> list[Example]:
    """Normalise records, index for index; ``fmt`` is auto, template or a format to force.

    With ``prompt``/``completion`` format strings the format is template. In auto mode each
    record is detected, and the records of one file (consecutive records of one ``source``)
    may not mix formats.
    """
    fmt = _checked_format(fmt, prompt, completion)
    if fmt != "auto":
        return [to_example(record, fmt, prompt=prompt, completion=completion)
                for record in records]
    return [example for _, same_file in groupby(records, key=attrgetter("source"))
            for example in _auto_examples(list(same_file))]


def _checked_format(fmt: str, prompt: str | None, completion: str | None) -> str:
    """The format records are normalised in: template when ``prompt``/``completion`` are
    given, else ``fmt``; ConfigError for a format that does not exist or lacks its templates."""
    if prompt is not None or completion is not None:
        return _template_mode(fmt, prompt, completion)
    if fmt == "template":
        raise ConfigError(
            "data.format is template but data.prompt and data.completion are not set",
            where="data.format",
            fix='set data.prompt and data.completion, e.g. "Review: {text}\\nSentiment:" and '
            '" {label}"',
        )
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(
            f"unknown data format '{fmt}'",
            where="data.format",
            fix=f"use auto or one of {', '.join(FORMATS)}",
        )
    return fmt


def _template_mode(fmt: str, prompt: str | None, completion: str | None) -> str:
    if prompt is None or completion is None:
        given, missing = ("data.prompt", "data.completion")
        if prompt is None:
            given, missing = missing, given
        raise ConfigError(
            f"{given} is set but {missing} is not; template mode needs both",
            where=missing,
            fix=f'set {missing} too, e.g. prompt: "Review: {{text}}\\nSentiment:" and '
            'completion: " {label}"',
        )
    if fmt not in ("auto", "template"):
        raise ConfigError(
            f"data.format is '{fmt}' but data.prompt/data.completion are set (template mode)",
            where="data.format",
            fix="remove data.prompt and data.completion, or set data.format to auto",
        )
    _template_fields(prompt, "data.prompt")
    _template_fields(completion, "data.completion")
    return "template"


def _auto_examples(records: list[Record]) -> list[Example]:
    first = records[0]
    file_format = detect_format(first)
    examples = []
    for record in records:
        record_format = detect_format(record)
        if record_format != file_format:
            raise DataError(
                f"this record is {record_format} but the file's first record (line {first.line}) "
                f"is {file_format}; one file must use one format",
                where=record.where,
                fix="split the file by format, or convert the records to one shape",
            )
        examples.append(to_example(record, record_format))
    return examples


# --- text views used by quality checks ------------------------------------------------------


def example_text(example: Example) -> str:
    """The whole example as plain text: chat as "role: content" lines, else the segments."""
    if example.messages is not None:
        return "\n".join(f"{m.role}: {message_text(m)}" for m in example.messages)
    return "".join(segment.text for segment in example.segments)


def example_prompt(example: Example) -> str:
    """The untrained part: chat messages before the last trained reply, else untrained segments."""
    if example.messages is not None:
        last = last_trained_turn(example.messages)
        return "\n".join(f"{m.role}: {message_text(m)}" for m in example.messages[:last])
    return "".join(segment.text for segment in example.segments if not segment.train)


def example_target(example: Example) -> str:
    """The trained part: the last trained assistant reply (chat), else the trained segments."""
    if example.messages is not None:
        last = last_trained_turn(example.messages)
        return message_text(example.messages[last]) if last >= 0 else ""
    return "".join(segment.text for segment in example.segments if segment.train)


def last_trained_turn(messages: list[Message]) -> int:
    """Index of the last assistant turn with a non-zero weight (the reference), or -1."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == "assistant" and messages[index].weight != 0:
            return index
    return -1
