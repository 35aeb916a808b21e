"""Tool calls in served answers: what ``tool_choice`` asks of generation, and the calls read back.

A tuned model writes a call as it was trained to (``data/render.py``): in tunelab's fallback
rendering, and in Hermes / Qwen2.5 templates, a ``<tool_call>`` block of ``{"name",
"arguments"}`` JSON; templates of their own format (Llama 3.1) a bare JSON object. The answer's
text is read back by the parser evaluation scores calls with (``eval.metrics.parse_tool_calls``),
so serving and ``tunelab eval`` agree on what the model called.

``tool_choice`` is honoured by prefixing the answer: ``required`` starts it with the opening
``<tool_call>`` tag, a named function with the tag and ``{"name": NAME, "arguments":`` exactly as
training renders it, so the model writes only the arguments. ``none`` stops generation where a
call would begin. Prefixing needs the ``<tool_call>`` format; a template with a format of its own
gets a 400 for ``required`` and named functions rather than a guess.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from tunelab.data.render import supports_tools

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass(frozen=True)
class ToolPlan:
    """How one request's answer is generated and read: tool calls parsed out of it or not,
    the text forced at its start, and the stop strings the server adds."""

    parse: bool = False
    prefix: str = ""
    stop: tuple[str, ...] = ()
    single: bool = False  # parallel_tool_calls false: one call at most


class ToolChoiceError(ValueError):
    """A tool_choice the server cannot honour for this model (the message says why)."""


def tagged_format(template: str) -> bool:
    """Whether calls are written as ``<tool_call>`` blocks: tunelab's fallback rendering (the
    template has no tool support) or a template that writes the tags itself."""
    return not supports_tools(template) or OPEN in template


def plan_tools(tool_names: list[str], tool_choice: str | None, named: str | None,
               parallel: bool, template: str) -> ToolPlan:
    """The plan for ``tool_choice`` (``auto`` | ``none`` | ``required``, or ``named``, a
    function's name) over the offered tools; a ToolChoiceError where it cannot be honoured."""
    tagged = tagged_format(template)
    single = (CLOSE,) if not parallel and tagged else ()
    if named is not None:
        if named not in tool_names:
            raise ToolChoiceError(f"tool_choice names the function {named!r}, which is not in "
                                  f"tools ({', '.join(tool_names)})")
        _need_tags(tagged, "a named function")
        prefix = f"{OPEN}\n{{\"name\": {json.dumps(named, ensure_ascii=False)}, \"arguments\":"
        return ToolPlan(True, prefix, single, not parallel)
    if tool_choice == "none":
        return ToolPlan(False, "", (OPEN,) if tagged else ())
    if tool_choice == "required":
        _need_tags(tagged, "'required'")
        return ToolPlan(True, f"{OPEN}\n", single, not parallel)
    return ToolPlan(True, "", single, not parallel)


def _need_tags(tagged: bool, what: str) -> None:
    if not tagged:
        raise ToolChoiceError(
            f"tool_choice {what} is honoured by starting the answer with a <tool_call> block, "
            "and this model's chat template writes tool calls in a format of its own; send "
            "tool_choice 'auto' (the calls the model writes are still parsed)")


def read_tool_calls(text: str, single: bool = False) -> tuple[str | None, list[dict] | None]:
    """(content, tool_calls) of an answer: OpenAI's ``tool_calls`` with fresh ids and the
    content before the first call; ``(text, None)`` where it holds no call or one that cannot
    be read (a malformed call is the model's text, never an error)."""
    from tunelab.eval.metrics import parse_tool_calls

    start = text.find(OPEN)
    if start < 0 and not text.lstrip().startswith(("{", "[")):
        return text, None
    calls, failed = parse_tool_calls(text[max(start, 0):])
    if failed or not calls:
        return text, None
    before = text[:max(start, 0)]
    return (before if before.strip() else None), [_openai_call(call) for call in
                                                  calls[:1 if single else None]]


def _openai_call(call: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


class ToolCallStream:
    """A streamed answer's text split as :func:`read_tool_calls` splits the whole: content
    passes as it comes until a call may be starting (a ``<tool_call>`` tag, or an answer that
    opens with JSON); from there the text is held and read at the end."""

    def __init__(self, prefix: str = "", single: bool = False):
        self.text = prefix
        self.sent = 0  # characters of content sent
        self.holding = False
        self.single = single

    def feed(self, delta: str) -> str:
        """The content that can be sent now, after ``delta``."""
        self.text += delta
        if self.holding:
            return ""
        start = self.text.find(OPEN)
        if start >= 0 or (self.sent == 0 and self.text.lstrip().startswith(("{", "["))):
            ready, self.holding = max(start, 0), True
        else:
            ready = len(self.text) - _partial_tag(self.text)
        if not self.text[:ready].strip():
            return ""  # whitespace alone so far: dropped if a call follows, as read_tool_calls
        out = self.text[self.sent:ready]
        self.sent = max(self.sent, ready)
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        """(content still to send, tool_calls) at the end of the answer."""
        _, calls = read_tool_calls(self.text, self.single)
        if calls is not None:
            return "", calls
        return self.text[self.sent:], None


def _partial_tag(text: str) -> int:
    """How many characters at the end of ``text`` may be the start of a ``<tool_call>`` tag."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:size]):
            return size
    return 0
