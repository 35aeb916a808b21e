"""Render an example of any format as the text a model reads: for training, evaluation, serving.

The one owner of "record → prompt and target". Training (``data/tokenize.py``) turns
``render_segments`` into ids and a loss mask; evaluation, few-shot demonstrations and the
before/after samples take ``prompt_segments`` (everything before the reference, which is the
last trained assistant turn or the trained segment); serving takes ``chat_prompt``. Because they
all render through these functions, an evaluation prompt is, token for token, what training put
before the reference.

Chat examples go through the tokenizer's chat template (or ``data.chat_template``, or ChatML
when the tokenizer has none), with ``data.chat_template_kwargs`` (e.g. ``enable_thinking``) as
the template's extra variables in every rendering. Each message's text is the difference
between the rendering of the conversation up to it and up to the one before, so the loss mask
follows the template exactly; an assistant turn's generation prompt
("<|im_start|>assistant\\n") is untrained.

Some templates are not prefix-stable: Qwen3's drops the ``<think>`` block of an assistant turn
once a user turn follows it and writes the last one differently. For those the conversation is
rendered once, whole, and the loss mask comes from the template's ``{% generation %}`` tags
where it has them (transformers' assistant-token mask), else from each assistant content
located in order in that rendering, up to and including the end-of-turn token (the tokenizer's
EOS) that follows it. A content the rendering does not hold verbatim is a DataError. Both warn
when the generation prompt serving renders differs from what training puts before the last
answer (Qwen3 without ``enable_thinking: false``: the empty think block).

Tool calls: when the template knows tools (it mentions ``tool_calls``), messages and the
``tools`` list are handed to it as they are. Otherwise (SmolLM2's template, for one) a fallback
writes them as text any template carries, in the Hermes / Qwen2.5 convention: the tool list is
appended to the system message (``TOOLS_SYSTEM_PROMPT``; a system message is added when there
is none), an assistant's calls follow its content as ``<tool_call>`` JSON blocks
(``formats.tool_call_text``), and a tool's result becomes a user turn wrapped in
``<tool_response>`` tags — a user turn, so templates that insist on alternating user and
assistant turns accept it.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import Any

from tunelab.data.formats import Example, Message, Segment, last_trained_turn, message_text
from tunelab.errors import DataError

#: ChatML, used when the tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The fallback's tool list, appended to the system message (Hermes / Qwen2.5 wording).
TOOLS_SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query. The function signatures "
    "are within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function "
    "call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}}\n</tool_call>"
)


#: A template marks the assistant's text with these (transformers' assistant-token mask).
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Prompt:
    """A prompt as text and as the token ids the model reads (BOS included where it belongs)."""

    text: str
    ids: list[int]


def chat_template_of(tokenizer, chat_template: str | None = None) -> str:
    """The template chat data is rendered with: the config's, the tokenizer's, or ChatML."""
    return chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def supports_tools(template: str) -> bool:
    """Whether a chat template renders tool calls itself (else the text fallback is used)."""
    return "tool_calls" in template


def bos_to_add(tokenizer) -> int | None:
    """The BOS id if this tokenizer adds one by itself (Llama-2/3 do, ChatML models do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def render_segments(example: Example, tokenizer, chat_template: str | None = None,
                    chat_template_kwargs: dict | None = None) -> list[Segment]:
    """The example as text segments, trainable where it carries loss (training's view).

    Chat data: the prefix differences of the template's renderings, exact where the template
    is prefix-stable; otherwise one whole rendering, masked by the template's generation tags
    or by its assistant contents located in order (see the module docstring).
    """
    if example.messages is None:
        return list(example.segments)
    template = chat_template_of(tokenizer, chat_template)
    turns, tools = template_turns(example.messages, example.tools, template)
    rendering = _Rendering(tokenizer, template, tools, chat_template_kwargs or {}, example.where)
    try:
        return _prefix_segments(turns, rendering)
    except _NotPrefixStable:
        pass
    if GENERATION_TAG.search(template):
        segments = _tagged_segments(turns, rendering)
    else:
        segments = _located_segments(turns, rendering)
    _check_generation_prompt(turns, segments, rendering)
    return segments


def prompt_segments(example: Example, tokenizer, *, chat_template: str | None = None,
                    chat_template_kwargs: dict | None = None, demos: list[Example] = ()
                    ) -> tuple[list[Segment], list[Segment]]:
    """(prompt, rest) of an example as training renders it, split before its reference.

    The reference is the last trained assistant turn (chat) or the last trained segment. With
    ``demos`` (few-shot), solved examples come first: for chat as earlier user/assistant turns,
    otherwise as prompt + target texts separated by blank lines; the prompt is then one segment.
    """
    segments = render_segments(example, tokenizer, chat_template, chat_template_kwargs)
    last = max((i for i, s in enumerate(segments) if s.train), default=len(segments))
    if not demos:
        return segments[:last], segments[last:]
    if example.messages is not None:
        head, query = _split_system(_query_messages(example))
        shown = [m for demo in demos for m in _split_system(_solved_messages(demo))[1]]
        text = chat_prompt(head + shown + query, tokenizer, chat_template=chat_template,
                           chat_template_kwargs=chat_template_kwargs, tools=example.tools).text
        return [Segment(text, False)], segments[last:]
    solved = ["".join(s.text for s in _solved_segments(demo)) for demo in demos]
    query = "".join(segment.text for segment in segments[:last])
    return [Segment("\n\n".join(solved + [query]), False)], segments[last:]


def reference_text(example: Example) -> str:
    """What the model should answer: the last trained assistant turn's text (its tool calls
    as ``<tool_call>`` blocks), or the trained segment of the other formats."""
    if example.messages is not None:
        last = last_trained_turn(example.messages)
        return message_text(example.messages[last]) if last >= 0 else ""
    trained = [segment.text for segment in example.segments if segment.train]
    return trained[-1] if trained else ""


def chat_prompt(messages: list[Message] | list[dict], tokenizer, *,
                chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                tools: list[dict] | None = None) -> Prompt:
    """A conversation rendered for the model to answer next: the chat template with the
    generation prompt, tool calls as training renders them. Serving and evaluation use it.

    ``messages`` are ``Message`` objects or OpenAI message dicts (``role``, ``content`` as a
    string or text parts, ``tool_calls``, ``tool_call_id``).
    """
    template = chat_template_of(tokenizer, chat_template)
    as_messages = [m if isinstance(m, Message) else _message(m) for m in messages]
    turns, template_tools = template_turns(as_messages, tools, template)
    text = _apply(tokenizer, template, [t for t, _ in turns], template_tools, True, "chat prompt",
                  chat_template_kwargs)
    bos = bos_to_add(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Prompt(text, ([bos] if bos is not None else []) + ids)


def user_prompt(prompt: str, tokenizer, *, chat: bool, chat_template: str | None = None,
                chat_template_kwargs: dict | None = None) -> str:
    """A user's prompt as the model sees it: raw, or as one user turn of the chat template."""
    if not chat:
        return prompt
    return chat_prompt([Message("user", prompt)], tokenizer, chat_template=chat_template,
                       chat_template_kwargs=chat_template_kwargs).text


def template_turns(messages: list[Message], tools: list[dict] | None, template: str
                   ) -> tuple[list[tuple[dict, Message | None]], list[dict] | None]:
    """The messages as the template's dicts, each with its Message (None for an added system
    turn), and the tools to hand to the template (None when the fallback wrote them)."""
    uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)
    if not uses_tools or supports_tools(template):
        turns = [(_native(m), m) for m in messages]
        return turns, tools or None
    turns = [(_fallback(m), m) for m in messages]
    if tools:
        listing = TOOLS_SYSTEM_PROMPT.format(
            tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
        if turns and turns[0][1] is not None and turns[0][1].role == "system":
            system, message = turns[0]
            turns[0] = ({"role": "system", "content": f"{system['content']}\n\n{listing}"},
                        message)
        else:
            turns.insert(0, ({"role": "system", "content": listing}, None))
    return turns, None


def _native(message: Message) -> dict:
    turn = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _fallback(message: Message) -> dict:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.content}\n</tool_response>"}
    return {"role": message.role, "content": message_text(message)}


def _message(raw: dict) -> Message:
    """An OpenAI message dict (as serving receives it) → Message, arguments parsed."""
    calls = []
    for call in raw.get("tool_calls") or []:
        function = dict(call["function"])
        if isinstance(function.get("arguments"), str):
            function["arguments"] = json.loads(function["arguments"] or "{}")
        calls.append({**call, "type": "function", "function": function})
    content = raw.get("content") or ""
    if isinstance(content, list):  # OpenAI content parts: text only, joined as training joins
        kinds = {part.get("type") for part in content} - {"text"}
        if kinds:
            raise DataError(f"a {raw['role']} message has content parts of type "
                            f"{', '.join(sorted(map(str, kinds)))}; only text can be rendered",
                            where="messages", fix="send text parts only")
        content = "\n".join(part["text"] for part in content)
    return Message(raw["role"], content, tool_calls=calls or None,
                   tool_call_id=raw.get("tool_call_id"))


def _query_messages(example: Example) -> list[Message]:
    """A chat example's messages before its reference turn (the evaluation query)."""
    return list(example.messages[:last_trained_turn(example.messages)])


def _solved_messages(example: Example) -> list[Message]:
    """A chat example up to and including its reference turn (a few-shot demonstration)."""
    return list(example.messages[:last_trained_turn(example.messages) + 1])


def _split_system(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """Leading system messages apart from the rest: a demonstration's go, the query's lead."""
    count = 0
    while count < len(messages) and messages[count].role == "system":
        count += 1
    return messages[:count], messages[count:]


def _solved_segments(example: Example) -> list[Segment]:
    trained = max((i for i, s in enumerate(example.segments) if s.train),
                  default=len(example.segments) - 1)
    return example.segments[:trained + 1]


def _apply(tokenizer, template: str, turns: list[dict], tools: list[dict] | None,
           generation_prompt: bool, where: str, options: dict | None = None) -> str:
    if not turns:
        return ""
    try:
        return tokenizer.apply_chat_template(turns, tools=tools, chat_template=template,
                                             tokenize=False,
                                             add_generation_prompt=generation_prompt,
                                             **(options or {}))
    except Exception as error:  # jinja raises its own errors for data it cannot render
        raise DataError(f"the chat template cannot render this conversation: {error}",
                        where=where,
                        fix="check the roles and their order, or set data.chat_template") from None


@dataclass(frozen=True)
class _Rendering:
    """What every rendering of one conversation shares: template, tools, extra variables."""

    tokenizer: Any
    template: str
    tools: list[dict] | None
    options: dict
    where: str

    def text(self, turns: list[dict], generation_prompt: bool) -> str:
        return _apply(self.tokenizer, self.template, turns, self.tools, generation_prompt,
                      self.where, self.options)

    def assistant_mask(self, turns: list[dict]) -> list[int]:
        """transformers' mask of the tokens the template's generation tags enclose."""
        try:
            return self.tokenizer.apply_chat_template(
                turns, tools=self.tools, chat_template=self.template, tokenize=True,
                return_dict=True, return_assistant_tokens_mask=True,
                **self.options)["assistant_masks"]
        except Exception as error:
            raise DataError(f"the chat template's generation tags cannot be read: {error}",
                            where=self.where, fix="check the {% generation %} tags, or set "
                            "data.chat_template to a prefix-stable template") from None


class _NotPrefixStable(Exception):
    """A rendering is not a prefix of the next one: the mask needs one whole rendering."""


def _is_assistant(message: Message | None) -> bool:
    return message is not None and message.role == "assistant"


def _is_trained(message: Message | None) -> bool:
    return _is_assistant(message) and message.weight != 0


def _prefix_segments(turns: list[tuple[dict, Message | None]], rendering: _Rendering
                     ) -> list[Segment]:
    """Each message's text as the difference of renderings up to it and up to the one before;
    an assistant's generation prompt untrained before it."""
    dicts = [turn for turn, _ in turns]
    segments: list[Segment] = []
    rendered = ""
    for index, (_, message) in enumerate(turns):
        before = rendered
        if _is_assistant(message):
            prompt = rendering.text(dicts[:index], True)
            _append(segments, _suffix(before, prompt), False)
            before = prompt
        rendered = rendering.text(dicts[:index + 1], False)
        _append(segments, _suffix(before, rendered), _is_trained(message))
    return segments


def _tagged_segments(turns: list[tuple[dict, Message | None]], rendering: _Rendering
                     ) -> list[Segment]:
    """One whole rendering, trained where the generation tags enclose a trained turn."""
    dicts = [turn for turn, _ in turns]
    text = rendering.text(dicts, False)
    mask = rendering.assistant_mask(dicts)
    offsets = rendering.tokenizer(text, add_special_tokens=False,
                                  return_offsets_mapping=True)["offset_mapping"]
    spans = _masked_spans(offsets, mask)
    assistants = [message for _, message in turns if _is_assistant(message)]
    if len(spans) != len(assistants):
        raise DataError(f"the chat template's generation tags enclose {len(spans)} pieces of "
                        f"text for {len(assistants)} assistant turns, so the loss mask cannot "
                        "be read from them", where=rendering.where,
                        fix="put {% generation %}...{% endgeneration %} around each assistant "
                        "turn once, or set data.chat_template to a prefix-stable template")
    return _cut(text, [span for span, message in zip(spans, assistants, strict=True)
                       if _is_trained(message)])


def _masked_spans(offsets: list[tuple[int, int]], mask: list[int]) -> list[tuple[int, int]]:
    """Character spans of the runs of masked tokens."""
    spans: list[tuple[int, int]] = []
    previous = 0
    for (start, end), masked in zip(offsets, mask, strict=True):
        if masked and previous:
            spans[-1] = (spans[-1][0], end)
        elif masked:
            spans.append((start, end))
        previous = masked
    return spans


def _located_segments(turns: list[tuple[dict, Message | None]], rendering: _Rendering
                      ) -> list[Segment]:
    """One whole rendering, each trained assistant content located in it carrying the loss up
    to and including the end-of-turn token (EOS) after it, before the next message."""
    text = rendering.text([turn for turn, _ in turns], False)
    places = _locate(text, turns)
    end_of_turn = rendering.tokenizer.eos_token
    spans = []
    for index, (_, message) in enumerate(turns):
        if not _is_trained(message):
            continue
        if places[index] is None:
            content = turns[index][0].get("content")
            raise _unstable_error(rendering.where, f"message {index + 1}, an assistant turn, "
                                  + ("has no text to locate in the whole rendering (tool calls "
                                     "only)" if not content else
                                     "is not in the whole rendering verbatim"))
        start, end = places[index]
        limit = next((place[0] for place in places[index + 1:] if place), len(text))
        stop = text.find(end_of_turn, end, limit) if end_of_turn else -1
        if stop < 0:
            raise _unstable_error(rendering.where, f"no end-of-turn token ({end_of_turn}) "
                                  f"follows message {index + 1}, an assistant turn")
        spans.append((start, stop + len(end_of_turn)))
    return _cut(text, spans)


def _locate(text: str, turns: list[tuple[dict, Message | None]]
            ) -> list[tuple[int, int] | None]:
    """Where each message's content is in the whole rendering, searched in order (so a reply
    that repeats the question is found after it); None where it is empty or not verbatim."""
    places: list[tuple[int, int] | None] = []
    cursor = 0
    for turn, _ in turns:
        content = turn.get("content") or ""
        start = text.find(content, cursor) if content else -1
        if start < 0:
            places.append(None)
            continue
        places.append((start, start + len(content)))
        cursor = start + len(content)
    return places


def _cut(text: str, spans: list[tuple[int, int]]) -> list[Segment]:
    """``text`` as segments, trained inside ``spans`` (in order, not overlapping)."""
    segments: list[Segment] = []
    cursor = 0
    for start, end in spans:
        _append(segments, text[cursor:start], False)
        _append(segments, text[start:end], True)
        cursor = end
    _append(segments, text[cursor:], False)
    return segments


def _check_generation_prompt(turns: list[tuple[dict, Message | None]], segments: list[Segment],
                             rendering: _Rendering) -> None:
    """Warn when serving's generation prompt is not what training puts before the last answer:
    a served (or few-shot) prompt would then differ from every trained one."""
    last = max((i for i, (_, message) in enumerate(turns) if _is_trained(message)), default=-1)
    trained = [i for i, segment in enumerate(segments) if segment.train]
    if last < 0 or not trained:
        return
    before = "".join(segment.text for segment in segments[:trained[-1]])
    if rendering.text([turn for turn, _ in turns[:last]], True) != before:
        warnings.warn(
            "the chat template's generation prompt differs from what it writes before an "
            "answer in a whole conversation (Qwen3: an empty <think> block), so served prompts "
            "differ from trained ones; set data.chat_template_kwargs (Qwen3: {enable_thinking: "
            "false}) or data.chat_template", stacklevel=3)


def _suffix(before: str, after: str) -> str:
    if not after.startswith(before):
        raise _NotPrefixStable
    return after[len(before):]


def _unstable_error(where: str, detail: str) -> DataError:
    return DataError(
        "the chat template renders a conversation differently once a message is added, so "
        f"the loss mask cannot be derived from it ({detail})",
        where=where,
        fix="set data.chat_template to a template whose renderings are prefixes of each other "
        "(e.g. ChatML), or one that marks assistant text with {% generation %} tags",
    )


def _append(segments: list[Segment], text: str, train: bool) -> None:
    if not text:
        return
    if segments and segments[-1].train == train:
        segments[-1] = Segment(segments[-1].text + text, train)
    else:
        segments.append(Segment(text, train))
