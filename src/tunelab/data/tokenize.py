"""Render an Example with the chat or prompt template → token ids + labels (−100 where no loss).

Segments (prompt / completion pieces) are tokenized in one batched call to the fast tokenizer.
Chat examples are rendered with the tokenizer's chat template, or ``DEFAULT_CHAT_TEMPLATE``
(ChatML) when it has none; each message's text is the difference between the rendering of the
conversation up to it and up to the one before, so the loss mask follows the template exactly.
An assistant turn carries loss (its content and end-of-turn tokens) unless its ``weight`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.formats import Example, Segment
from tunelab.errors import DataError

IGNORE_INDEX = -100

#: ChatML, used when the tokenizer has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TokenizedExample:
    """Token ids and labels of one example, and where the example came from."""

    input_ids: list[int]
    labels: list[int]
    source: str
    line: int
    truncated: bool = False

    @property
    def n_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def chat_segments(example: Example, tokenizer, chat_template: str | None = None) -> list[Segment]:
    """Render a chat example into text segments, trainable where an assistant turn is trained."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    messages = [{"role": m.role, "content": m.content} for m in example.messages or []]
    segments: list[Segment] = []
    rendered = ""
    for index, message in enumerate(example.messages or []):
        before = rendered
        if message.role == "assistant":
            # The generation prompt ("<|im_start|>assistant\n") belongs to the untrained side.
            prompt = _render(tokenizer, template, messages[:index], True, example)
            _append(segments, _suffix(before, prompt, example), False)
            before = prompt
        rendered = _render(tokenizer, template, messages[: index + 1], False, example)
        trained = message.role == "assistant" and message.weight != 0
        _append(segments, _suffix(before, rendered, example), trained)
    return segments


def tokenize_examples(examples: list[Example], tokenizer, *, max_seq_len: int,
                      train_on: str = "completion",
                      chat_template: str | None = None) -> list[TokenizedExample]:
    """Tokenize examples in one batch; labels are −100 outside trained segments.

    ``train_on="all"`` puts loss on every token. Examples longer than ``max_seq_len`` are cut at
    the end and marked ``truncated``.
    """
    rendered = [
        chat_segments(ex, tokenizer, chat_template) if ex.messages is not None else ex.segments
        for ex in examples
    ]
    texts = [segment.text for segments in rendered for segment in segments]
    ids_per_text = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = _bos_to_add(tokenizer)
    eos = tokenizer.eos_token_id
    out = []
    cursor = 0
    for example, segments in zip(examples, rendered, strict=True):
        input_ids: list[int] = [bos] if bos is not None else []
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        for segment in segments:
            ids = ids_per_text[cursor]
            cursor += 1
            input_ids += ids
            keep = segment.train or train_on == "all"
            labels += ids if keep else [IGNORE_INDEX] * len(ids)
        if example.messages is None and eos is not None and (not input_ids or input_ids[-1] != eos):
            # Completion-style data ends with EOS, trained, so the tuned model learns to stop.
            input_ids.append(eos)
            labels.append(eos if segments and (segments[-1].train or train_on == "all")
                          else IGNORE_INDEX)
        truncated = len(input_ids) > max_seq_len
        out.append(TokenizedExample(input_ids[:max_seq_len], labels[:max_seq_len],
                                    example.source, example.line, truncated))
    return out


def _bos_to_add(tokenizer) -> int | None:
    """The BOS id if this tokenizer adds one by itself (Llama-2/3 do, ChatML models do not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if probe and probe[0] == bos else None


def _render(tokenizer, template: str, messages: list[dict], generation_prompt: bool,
            example: Example) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises its own errors for data it cannot render
        raise DataError(f"the chat template cannot render this conversation: {error}",
                        where=example.where,
                        fix="check the roles and their order, or set data.chat_template") from None


def _suffix(before: str, after: str, example: Example) -> str:
    if not after.startswith(before):
        raise DataError(
            "the chat template renders a conversation differently once a message is added, so "
            "the loss mask cannot be derived from it",
            where=example.where,
            fix="set data.chat_template to a template whose renderings are prefixes of each other "
            "(e.g. ChatML)",
        )
    return after[len(before):]


def _append(segments: list[Segment], text: str, train: bool) -> None:
    if not text:
        return
    if segments and segments[-1].train == train:
        segments[-1] = Segment(segments[-1].text + text, train)
    else:
        segments.append(Segment(text, train))


def prompt_and_target(example: Example, tokenizer,
                      chat_template: str | None = None) -> tuple[str, str]:
    """The text a model is prompted with and the trained text that should follow it.

    For chat data the prompt ends with the assistant generation prompt of the last trained turn.
    """
    segments = (chat_segments(example, tokenizer, chat_template) if example.messages is not None
                else example.segments)
    last = max((i for i, s in enumerate(segments) if s.train), default=len(segments))
    prompt = "".join(segment.text for segment in segments[:last])
    target = segments[last].text if last < len(segments) else ""
    return prompt, target


def render_user_prompt(prompt: str, tokenizer, *, chat: bool,
                       chat_template: str | None = None) -> str:
    """A user's prompt as the model sees it: raw, or as one user turn of the chat template."""
    if not chat:
        return prompt
    template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
