"""Preference data (DPO, SimPO, KTO): records → pairs of ordinary Examples → token ids.

A preference example is two ordinary ``Example``s that share a prompt: the prompt with the
chosen answer and the prompt with the rejected one (KTO: one answer and whether it is
desirable). They are ordinary examples on purpose: the one renderer and tokenizer
(``prepare.tokenize_as_trained``) turn them into ids, the prompt untrained and only the answer
trained, exactly as supervised data, so the chat template, loss mask and evaluation prompts
cannot drift between objectives. The shapes, detected per record by their keys:

- paired (TRL): ``{"prompt", "chosen", "rejected"}``, each a string or a list of chat messages
  (the prompt ending with a user turn, each answer one or more assistant turns). Without a
  prompt (TRL's implicit prompt), chosen and rejected are whole conversations and the messages
  they share at the start are the prompt. A prompt beside whole conversations is not read
  again (UltraFeedback's copy of the first user turn). A string beside message lists is one
  message (a user prompt, an assistant answer).
- openai (OpenAI / Together DPO): ``{"input": {"messages", "tools"?}, "preferred_output":
  [assistant message], "non_preferred_output": [assistant message]}``.
- rejected_response: ``{"messages", "rejected_response"}``, the messages ending with the chosen
  assistant turn, which a string or an assistant message replaces in the rejected example.
- unpaired (KTO): ``{"prompt", "completion", "label"}``, label true or false (a JSON boolean,
  or the text true / false of a CSV file).

Messages are validated by ``formats.to_example`` (roles, content parts, tool calls) as one
conversation per answer, so errors name the record's file:line and the field the message came
from. An assistant turn of the prompt is shown, not trained (weight 0). KTO also reads the
paired shapes, each pair as two unpaired answers (chosen desirable, rejected not: TRL's
``unpair_preference_dataset``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunelab.config import DataConfig
from tunelab.data.formats import (
    PREFERENCE_SHAPES,
    Example,
    example_text,
    preference_shape,
    to_example,
)
from tunelab.data.prepare import as_examples, split_validation, tokenize_as_trained
from tunelab.data.readers import read_records
from tunelab.data.records import Record
from tunelab.data.tokenize import TokenizedExample, fit_to_length
from tunelab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from tunelab.objectives import Objective

#: Every shape read here: the paired ones supervised reading refuses, and KTO's.
SHAPES = {**PREFERENCE_SHAPES, "unpaired": '{"prompt", "completion", "label": true/false} (KTO)'}

_LABELS = {"true": True, "false": False}


@dataclass
class PreferenceExample:
    """A prompt with a chosen and a rejected answer (pairs), or with one labelled answer (KTO)."""

    chosen: Example  # the prompt + the chosen (KTO: the only) answer, an ordinary Example
    rejected: Example | None  # the prompt + the rejected answer; None for unpaired data
    desirable: bool | None  # KTO's label; None for pairs
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class TokenizedPair:
    """A preference example's token ids: the chosen (KTO: the only) answer's and the rejected's."""

    chosen: TokenizedExample
    rejected: TokenizedExample | None
    desirable: bool | None
    source: str
    line: int

    @property
    def length(self) -> int:
        """Tokens of chosen and rejected together."""
        return sum(len(side.input_ids) for side in self._sides)

    @property
    def n_target_tokens(self) -> int:
        """Target tokens of both answers."""
        return sum(side.n_target_tokens for side in self._sides)

    @property
    def truncated(self) -> bool:
        return any(side.truncated for side in self._sides)

    @property
    def _sides(self) -> list[TokenizedExample]:
        return [self.chosen] if self.rejected is None else [self.chosen, self.rejected]


def is_preference_record(record: Record) -> str | None:
    """The record's preference shape (a key of ``SHAPES``) by its keys, or None.

    ``{"prompt", "completion", "label"}`` counts as KTO's only with a true/false label; with any
    other label it is completion data whose label supervised training ignores.
    """
    shape = _shape(record)
    if shape == "unpaired" and _label(record.fields["label"]) is None:
        return None
    return shape


def _shape(record: Record) -> str | None:
    shape = preference_shape(record)
    if shape is None and {"prompt", "completion", "label"} <= record.fields.keys():
        return "unpaired"
    return shape


def preference_prompt(example: PreferenceExample) -> Example:
    """The example whose prompt (everything before its reference) is the pair's prompt and whose
    reference is the chosen answer: what evaluation and the before/after samples render."""
    return example.chosen


# --- records → preference examples ----------------------------------------------------------


def to_preference_examples(records: list[Record], data: DataConfig,
                           objective: Objective) -> list[PreferenceExample]:
    """Normalise preference records for ``objective`` (``OBJECTIVES[name]``), record by record.

    Pairs objectives (dpo, simpo) read the paired shapes; unpaired ones (kto) read KTO's shape
    and the paired shapes, each pair as two answers. Raises DataError naming file:line and the
    field, ConfigError for a data section preference data cannot honour.
    """
    check_preference_section(data)
    if not objective.preference:
        raise ValueError(f"objective {objective.name!r} does not train on preference data")
    examples: list[PreferenceExample] = []
    for record in records:
        shape = _shape(record)
        if shape is None and record.fields.keys() & {"chosen", "rejected"}:
            missing = "rejected" if "chosen" in record.fields else "chosen"
            raise DataError(f"missing field '{missing}' (a pair needs a chosen and a rejected "
                            f"answer; the record has keys {_keys(record)})", where=record.where,
                            fix=f"add '{missing}' to every record")
        if shape is None:
            raise DataError(
                f"this record is not preference data (keys {_keys(record)}); accepted shapes: "
                + ", ".join(SHAPES.values()),
                where=record.where,
                fix="write the records in one of these shapes, or set method.objective: sft to "
                "train on ordinary examples")
        if shape == "unpaired":
            if objective.data != "unpaired":
                raise DataError(
                    f"this record is unpaired data ({SHAPES['unpaired']}): one answer labelled "
                    f"good or bad, while {objective.title} learns from pairs of a chosen and a "
                    "rejected answer", where=record.where,
                    fix="use method.objective: kto, or write the records as prompt / chosen / "
                    "rejected pairs")
            examples.append(_unpaired(record))
            continue
        chosen, rejected = _PAIRED[shape](record)
        if objective.data == "unpaired":  # TRL's unpairing: chosen desirable, rejected not
            examples += [PreferenceExample(chosen, None, True, record.source, record.line),
                         PreferenceExample(rejected, None, False, record.source, record.line)]
        else:
            examples.append(PreferenceExample(chosen, rejected, None, record.source, record.line))
    return examples


def check_preference_section(data: DataConfig) -> None:
    """ConfigError for the data settings preference data cannot honour."""
    problems = [
        ("data.tasks", bool(data.tasks), "multitask data (data.tasks) is not supported for "
         "preference data", "train one preference run per task, with data.train"),
        ("data.prompt", data.prompt is not None or data.completion is not None, "template mode "
         "(data.prompt / data.completion) is not supported for preference data",
         "remove data.prompt and data.completion and put prompt / chosen / rejected columns "
         "in the file"),
        ("data.format", data.format != "auto", f"data.format is {data.format!r}, but preference "
         "records are read by their shape", "remove data.format (auto)"),
        ("data.train_on", data.train_on != "completion", "data.train_on: all would put the "
         "shared prompt into the compared log-probabilities", "remove data.train_on"),
    ]
    for where, wrong, message, fix in problems:
        if wrong:
            raise ConfigError(message, where=where, fix=fix)


def _paired_trl(record: Record) -> tuple[Example, Example]:
    fields = record.fields
    chosen, rejected = fields["chosen"], fields["rejected"]
    prompt = fields.get("prompt")
    for name in ("prompt", "chosen", "rejected"):
        if name in fields:
            _check_text_or_messages(record, name, fields[name], allow_none=name == "prompt")
    if isinstance(chosen, str) and isinstance(rejected, str) and not isinstance(prompt, list):
        if prompt is None:
            raise DataError("chosen and rejected are strings but there is no prompt",
                            where=record.where,
                            fix="add a prompt column, or write chosen and rejected as message "
                            "lists (whose shared leading messages are then the prompt)")
        return (_completion_example(record, prompt, chosen),
                _completion_example(record, prompt, rejected))
    tools = fields.get("tools")
    whole = [_is_conversation(chosen), _is_conversation(rejected)]
    if all(whole):
        return _implicit_prompt(record, chosen, rejected, tools)
    if any(whole):
        conversation, answer = ("chosen", "rejected") if whole[0] else ("rejected", "chosen")
        raise DataError(f"{conversation} is a whole conversation (it starts before the "
                        f"assistant's turn) but {answer} is the answer alone",
                        where=record.where,
                        fix="write both as whole conversations (the prompt is then the messages "
                        "they share) or both as the answer alone, after a prompt column")
    if prompt is None:
        raise DataError("chosen and rejected hold answers only, and there is no prompt",
                        where=record.where,
                        fix="add a prompt column (a string or a message list ending with the "
                        "user's turn), or write chosen and rejected as whole conversations")
    prompt_part = ("prompt", _as_messages(prompt, "user"), 0)
    return tuple(_chat_example(record, [prompt_part, (name, _as_messages(
        fields[name], "assistant"), 0)], tools, answer=name) for name in ("chosen", "rejected"))


def _paired_openai(record: Record) -> tuple[Example, Example]:
    fields = record.fields
    source = fields.get("input")
    if not isinstance(source, dict) or not isinstance(source.get("messages"), list):
        raise DataError(f"input is {_kind(source)}; OpenAI's preference format puts the prompt "
                        "in input.messages", where=record.where,
                        fix='write input as {"messages": [{"role": "user", "content": "..."}]}')
    sides = []
    for name in ("preferred_output", "non_preferred_output"):
        if name not in fields:
            raise DataError(f"missing field '{name}' (the record has keys {_keys(record)})",
                            where=record.where,
                            fix="give every record a preferred_output and a non_preferred_output"
                            ', each [{"role": "assistant", "content": "..."}]')
        _check_text_or_messages(record, name, fields[name])
        sides.append(_chat_example(record, [("input.messages", source["messages"], 0),
                                            (name, _as_messages(fields[name], "assistant"), 0)],
                                   source.get("tools"), answer=name))
    return sides[0], sides[1]


def _paired_rejected_response(record: Record) -> tuple[Example, Example]:
    fields = record.fields
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"messages is {_kind(messages)}; with rejected_response, messages hold "
                        "the conversation ending with the chosen assistant reply",
                        where=record.where,
                        fix='write messages as [{"role": "user", ...}, {"role": "assistant", ...}]')
    response = fields["rejected_response"]
    if isinstance(response, dict):
        role = response.get("role", "assistant")
        if role != "assistant":
            raise DataError(f"rejected_response.role is {role!r}; the rejected response is the "
                            "assistant's reply", where=record.where,
                            fix='write it as a string or as {"role": "assistant", "content": '
                            '"..."}')
        response = {**response, "role": "assistant"}
    elif not isinstance(response, str):
        raise DataError(f"rejected_response is {_kind(response)}, expected a string or an "
                        "assistant message", where=record.where,
                        fix='write it as a string or as {"role": "assistant", "content": "..."}')
    tools = fields.get("tools")
    prompt = messages[:-1]
    chosen = _chat_example(record, [("messages", prompt, 0),
                                    ("messages", messages[-1:], len(prompt))],
                           tools, answer="messages")
    rejected = _chat_example(record, [("messages", prompt, 0),
                                      ("rejected_response", _as_messages(response, "assistant"),
                                       None)], tools, answer="rejected_response")
    return chosen, rejected


_PAIRED = {"paired": _paired_trl, "openai": _paired_openai,
           "rejected_response": _paired_rejected_response}


def _unpaired(record: Record) -> PreferenceExample:
    fields = record.fields
    desirable = _label(fields["label"])
    if desirable is None:
        raise DataError(f"field 'label' is {_kind(fields['label'])} ({fields['label']!r}); KTO's "
                        "label says whether the completion is desirable", where=record.where,
                        fix="write label as true or false (a JSON boolean, or the text true / "
                        "false in a CSV file)")
    prompt, completion = fields["prompt"], fields["completion"]
    _check_text_or_messages(record, "prompt", prompt)
    _check_text_or_messages(record, "completion", completion)
    if isinstance(prompt, str) and isinstance(completion, str):
        example = _completion_example(record, prompt, completion)
    else:
        example = _chat_example(record, [("prompt", _as_messages(prompt, "user"), 0),
                                         ("completion", _as_messages(completion, "assistant"),
                                          0)], fields.get("tools"), answer="completion")
    return PreferenceExample(example, None, desirable, record.source, record.line)


def _label(value: Any) -> bool | None:
    """KTO's label: a JSON boolean, or the text true / false (CSV); None for anything else."""
    if isinstance(value, bool):
        return value
    return _LABELS.get(value.strip().lower()) if isinstance(value, str) else None


def _completion_example(record: Record, prompt: str, answer: str) -> Example:
    """A string prompt and answer as completion data: the prompt untrained, the answer (+EOS)
    trained."""
    return to_example(Record({"prompt": prompt, "completion": answer}, record.source,
                             record.line), "completion")


def _implicit_prompt(record: Record, chosen: list, rejected: list,
                     tools: Any) -> tuple[Example, Example]:
    """Whole conversations: the messages both start with are the prompt (TRL's extract_prompt),
    the rest of each its answer, which must start with an assistant turn."""
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        _check_answer(record, name, conversation)
    sides = [_chat_example(record, [(name, conversation, 0)], tools, answer=None)
             for name, conversation in (("chosen", chosen), ("rejected", rejected))]
    shared = 0
    for left, right in zip(sides[0].messages, sides[1].messages, strict=False):
        if left != right:
            break
        shared += 1
    # Identical conversations (or one a continuation of the other): the answer is still the
    # last assistant turn, so the pair is kept and data check reports it.
    shared = min(shared, *(_last_assistant(side.messages) for side in sides))
    if shared == 0:
        raise DataError("chosen and rejected share no leading messages, so there is no prompt "
                        "(TRL's implicit prompt is the messages both start with)",
                        where=record.where,
                        fix="start both with the same user turn(s), or add a prompt column and "
                        "keep only the answers in chosen and rejected")
    for name, side in zip(("chosen", "rejected"), sides, strict=True):
        first = side.messages[shared]
        if first.role != "assistant":
            raise DataError(f"chosen and rejected first differ at {name}[{shared}], a "
                            f"{first.role} turn; the shared prompt must be followed by the "
                            "assistant's answers, which are what differs", where=record.where,
                            fix="make the conversations identical up to the answers")
        _prompt_untrained(side, shared)
    return sides[0], sides[1]


def _last_assistant(messages: list) -> int:
    return max((i for i, m in enumerate(messages) if m.role == "assistant"), default=0)


#: Messages taken from one field: its name, the messages, the index of the first in that field
#: (None: the field is one message, not a list).
_Part = tuple[str, list, "int | None"]


def _chat_example(record: Record, parts: list[_Part], tools: Any, *,
                  answer: str | None) -> Example:
    """One conversation from messages of several fields, validated by ``formats.to_example``
    with the record's file:line; errors name the field a message came from. The last part is
    the answer (``answer`` names it), the earlier ones the prompt, which is left untrained."""
    messages = [message for _, part, _ in parts for message in part]
    starts = _starts(parts)
    if answer is not None:
        _check_answer(record, answer, parts[-1][1])
    fields: dict[str, Any] = {"messages": messages}
    if tools is not None:
        fields["tools"] = tools
    try:
        example = to_example(Record(fields, record.source, record.line), "chat")
    except DataError as error:
        raise DataError(_renamed(error.message, parts, starts), where=error.where,
                        fix=error.fix) from None
    if answer is not None:
        _prompt_untrained(example, starts[-1])
        if example.messages[-1].weight == 0:
            raise DataError(f"the last turn of {answer} has weight 0, so the answer is not "
                            "compared", where=record.where, fix="remove its weight")
    return example


def _starts(parts: list[_Part]) -> list[int]:
    """Where each part's messages start in the joined conversation."""
    starts, total = [], 0
    for _, part, _ in parts:
        starts.append(total)
        total += len(part)
    return starts


def _renamed(message: str, parts: list[_Part], starts: list[int]) -> str:
    """formats' ``messages[i]`` as the field it came from: ``chosen[0]``, ``input.messages[2]``."""
    def field_path(match: re.Match) -> str:
        index = int(match.group(1))
        part = max(i for i, start in enumerate(starts) if start <= index and parts[i][1])
        name, _, first = parts[part]
        return name if first is None else f"{name}[{index - starts[part] + first}]"
    return re.sub(r"\bmessages\[(\d+)\]", field_path, message)


def _check_answer(record: Record, name: str, messages: list) -> None:
    """An answer is one or more turns ending with the assistant's."""
    if not messages:
        raise DataError(f"{name} is an empty list; it holds the assistant's answer",
                        where=record.where,
                        fix=f'write {name} as [{{"role": "assistant", "content": "..."}}]')
    last = messages[-1]
    role = last.get("role") if isinstance(last, dict) else None
    if isinstance(last, dict) and role != "assistant":
        raise DataError(f"{name} ends with a {role!r} turn; an answer ends with the assistant's "
                        "reply", where=record.where,
                        fix=f"end {name} with an assistant message")


def _prompt_untrained(example: Example, n_prompt: int) -> None:
    """Assistant turns of the prompt are context: weight 0, so only the answer is trained."""
    for message in example.messages[:n_prompt]:
        if message.role == "assistant":
            message.weight = 0


def _check_text_or_messages(record: Record, name: str, value: Any, *,
                            allow_none: bool = False) -> None:
    if isinstance(value, (str, list)) or (allow_none and value is None):
        return
    raise DataError(f"field '{name}' is {_kind(value)}, expected a string or a list of messages",
                    where=record.where,
                    fix=f'write {name} as a string or as [{{"role": ..., "content": "..."}}]')


def _is_conversation(value: Any) -> bool:
    """A message list that starts before the answer (a system or user turn first)."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and value[0].get("role") != "assistant")


def _as_messages(value: Any, role: str) -> list:
    """A string as one ``role`` message, a message dict as a list of one, a list as it is."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [value] if isinstance(value, dict) else value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _keys(record: Record) -> str:
    return ", ".join(map(repr, record.fields)) or "(none)"


# --- the run's splits and their token ids ---------------------------------------------------


@dataclass
class PreferenceSplits:
    """A config's preference examples per split, before tokenizing."""

    train: list[PreferenceExample]
    validation: list[PreferenceExample]  # data.validation, or split off train
    test: list[PreferenceExample]  # read only when asked for
    shape: str | None = None  # the first training record's shape (a key of SHAPES)
    # Every test example: the chosen ones of preference files and the examples of files in a
    # supervised format (what tunelab eval scores a preference-trained model on).
    test_examples: list[Example] = field(default_factory=list)


def read_preference_splits(data: DataConfig, *, seed: int, objective: Objective,
                           test: bool = False) -> PreferenceSplits:
    """The data files' preference examples (errors name file:line): validation files, else
    ``data.validation_split`` of the train records held out with the run's seed, as
    ``prepare.read_splits`` does; a KTO pair is split as one record, so its halves stay
    together. A test file whose first record is no preference shape is read as ordinary
    examples (evaluation data), into ``test_examples`` only."""
    check_preference_section(data)
    train, validation = _records(data.train), _records(data.validation)
    shape = _shape(train[0]) if train else None
    if not validation and data.validation_split > 0:
        kept, held_out = split_validation(len(train), fraction=data.validation_split, seed=seed)
        train, validation = [train[i] for i in kept], [train[i] for i in held_out]
    splits = PreferenceSplits(to_preference_examples(train, data, objective),
                              to_preference_examples(validation, data, objective), [], shape)
    for path in data.test if test else []:
        records = read_records(path)
        if is_preference_record(records[0]) is None:
            splits.test_examples += as_examples(records, data)
            continue
        examples = to_preference_examples(records, data, objective)
        splits.test += examples
        splits.test_examples += [example.chosen for example in examples]
    return splits


def _records(paths: list[str]) -> list[Record]:
    return [record for path in paths for record in read_records(path)]


def tokenize_pairs(examples: list[PreferenceExample], tokenizer, data: DataConfig, *,
                   max_seq_len: int) -> list[TokenizedPair]:
    """Chosen and rejected examples tokenized as trained, in one batched call.

    Each answer fits ``max_seq_len`` by ``data.truncation``, and the two sides of a pair are cut
    alike, so they keep identical prompt ids: ``prompt`` cuts the same prompt tokens from both
    (as many as the longer answer needs), ``drop`` drops both when one is too long.
    """
    flat = [side for example in examples for side in (example.chosen, example.rejected)
            if side is not None]
    tokenized = iter(tokenize_as_trained(flat, tokenizer, data, max_seq_len=10**9))
    pairs = []
    for example in examples:
        sides = [next(tokenized)] + ([next(tokenized)] if example.rejected is not None else [])
        sides = _fit_pair(sides, max_seq_len, data.truncation)
        pairs.append(TokenizedPair(sides[0], sides[1] if len(sides) > 1 else None,
                                   example.desirable, example.source, example.line))
    return pairs


def _fit_pair(sides: list[TokenizedExample], max_seq_len: int,
              truncation: str) -> list[TokenizedExample]:
    """The sides of a pair fitted to ``max_seq_len`` with the same prompt cut."""
    if all(len(side.input_ids) <= max_seq_len for side in sides):
        return sides
    longest_answer = max(len(side.input_ids) - side.n_prompt_tokens for side in sides)
    keep_prompt = max_seq_len - longest_answer
    fitted = []
    for side in sides:
        limit = max_seq_len
        if truncation == "prompt" and keep_prompt >= 1:
            # the limit at which fit_to_length keeps keep_prompt prompt tokens of this side
            limit = keep_prompt + len(side.input_ids) - side.n_prompt_tokens
        how = "drop" if truncation == "drop" else ("end" if keep_prompt < 1 else truncation)
        if len(side.input_ids) > limit or how == "drop":
            ids, labels = fit_to_length(side.input_ids, side.labels, limit, how)
            side = TokenizedExample(ids, labels, side.source, side.line, truncated=True)
        fitted.append(side)
    return fitted


@dataclass
class PreferenceData:
    """Tokenized preference train and validation examples, what was left out, and a summary."""

    train: list[TokenizedPair]  # only pairs whose every answer keeps a target token
    validation: list[TokenizedPair]  # likewise
    validation_examples: list[Example]  # the chosen (desirable) validation examples, for samples
    skipped: list[TokenizedPair]  # training pairs with an answer left without target tokens
    report: dict


def prepare_preference_data(data: DataConfig, tokenizer, *, max_seq_len: int, seed: int,
                            objective: Objective) -> PreferenceData:
    """Read the preference files, split off validation data, tokenize both in batches: what
    ``prepare.prepare_data`` is for ordinary examples.

    Raises DataError when no training pair keeps a target token in every answer.
    """
    splits = read_preference_splits(data, seed=seed, objective=objective)
    train, validation = (tokenize_pairs(examples, tokenizer, data, max_seq_len=max_seq_len)
                         for examples in (splits.train, splits.validation))
    kept = [pair for pair in train if _has_targets(pair)]
    if not kept:
        raise DataError("no training pair has a target token to learn from in every answer",
                        where=", ".join(data.train),
                        fix="check the answers and train.max_seq_len")
    report = {
        "format": splits.train[0].chosen.format, "shape": splits.shape,
        "objective_data": objective.data,
        "train_examples": len(train), "validation_examples": len(validation),
        "train_tokens": sum(pair.length for pair in train),
        "train_target_tokens": sum(pair.n_target_tokens for pair in train),
        "truncated": sum(pair.truncated for pair in train),
    }
    if objective.data == "pairs":
        report["identical_pairs"] = sum(_identical(example) for example in splits.train)
    else:
        report["desirable"] = sum(example.desirable is True for example in splits.train)
    return PreferenceData(kept, [pair for pair in validation if _has_targets(pair)],
                          [preference_prompt(example) for example in splits.validation
                           if example.desirable is not False],
                          [pair for pair in train if not _has_targets(pair)], report)


def _has_targets(pair: TokenizedPair) -> bool:
    return all(side.n_target_tokens > 0 for side in pair._sides)


def _identical(example: PreferenceExample) -> bool:
    return example.rejected is not None and (
        example_text(example.chosen) == example_text(example.rejected))
