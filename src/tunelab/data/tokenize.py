"""Rendered examples → token ids and labels (−100 where no loss), for training and evaluation.

Text comes from ``data/render.py``; here it becomes ids. Segments (prompt / completion pieces,
chat turns) are tokenized in one batched call to the fast tokenizer and joined, so a segment's
ids never depend on its neighbours. An assistant turn carries loss (its content and end-of-turn
tokens) unless its ``weight`` is 0; completion-style data ends with a trained EOS.

An example longer than ``max_seq_len`` is fitted by ``truncation`` (``data.truncation``):

- ``prompt`` (default): cut the middle of everything before the first trained token, keeping
  its start (instructions, system prompt) and its end (the question, the generation prompt), so
  the whole target is learned. A target longer than ``max_seq_len`` by itself loses its end.
- ``drop``: leave the example out (it comes back without tokens; training skips it).
- ``end``: cut the end, target included — what most trainers do.

Evaluation prompts (``eval_prompts``) are the training ids before the reference, fitted the
``prompt`` way whatever the setting: every test example is answered, against its whole reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.formats import Example, Segment
from tunelab.data.render import Prompt, bos_to_add, prompt_segments, reference_text, render_segments

IGNORE_INDEX = -100
TRUNCATION = ("prompt", "drop", "end")


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

    @property
    def n_prompt_tokens(self) -> int:
        """Tokens before the first trained one (all of them when nothing is trained)."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX),
                    len(self.labels))


@dataclass(frozen=True)
class EvalPrompt(Prompt):
    """An evaluation prompt (text and the ids training put before the reference) and the
    reference the model should write."""

    target: str = ""


def tokenize_examples(examples: list[Example], tokenizer, *, max_seq_len: int,
                      train_on: str = "completion", chat_template: str | None = None,
                      chat_template_kwargs: dict | None = None,
                      truncation: str = "prompt") -> list[TokenizedExample]:
    """Tokenize examples in one batch; labels are −100 outside trained segments.

    ``train_on="all"`` puts loss on every token. Examples longer than ``max_seq_len`` are fitted
    by ``truncation`` (see the module docstring) and marked ``truncated``.
    ``chat_template_kwargs``: the chat template's extra variables (data.chat_template_kwargs).
    """
    rendered = [render_segments(example, tokenizer, chat_template, chat_template_kwargs)
                for example in examples]
    return _tokenize(examples, rendered, tokenizer, max_seq_len=max_seq_len, train_on=train_on,
                     truncation=truncation)


def eval_prompts(examples: list[Example], tokenizer, *, chat_template: str | None = None,
                 chat_template_kwargs: dict | None = None,
                 demos: list[list[Example]] | None = None,
                 max_seq_len: int | None = None) -> list[EvalPrompt]:
    """Each example's evaluation prompt and reference, as training renders and tokenizes it.

    The prompt is everything before the reference (the last trained assistant turn, or the
    trained segment); ``demos[i]`` are solved examples shown before example ``i`` (few-shot).
    """
    splits = [prompt_segments(example, tokenizer, chat_template=chat_template,
                              chat_template_kwargs=chat_template_kwargs,
                              demos=demos[index] if demos else ())
              for index, example in enumerate(examples)]
    as_trained = [[Segment(s.text, False) for s in prompt] + rest for prompt, rest in splits]
    tokenized = _tokenize(examples, as_trained, tokenizer, max_seq_len=max_seq_len or 10**9,
                          train_on="completion", truncation="prompt")
    prompts = []
    for example, (prompt, _), tokens in zip(examples, splits, tokenized, strict=True):
        ids = tokens.input_ids[:tokens.n_prompt_tokens]
        text = (tokenizer.decode(ids, skip_special_tokens=False) if tokens.truncated
                else "".join(segment.text for segment in prompt))
        prompts.append(EvalPrompt(text, ids, reference_text(example)))
    return prompts


def _tokenize(examples: list[Example], rendered: list[list[Segment]], tokenizer, *,
              max_seq_len: int, train_on: str, truncation: str) -> list[TokenizedExample]:
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, not {truncation!r}")
    texts = [segment.text for segments in rendered for segment in segments]
    ids_per_text = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bos = bos_to_add(tokenizer)
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
        if truncated:
            input_ids, labels = fit_to_length(input_ids, labels, max_seq_len, truncation)
        out.append(TokenizedExample(input_ids, labels, example.source, example.line, truncated))
    return out


def fit_to_length(input_ids: list[int], labels: list[int], max_seq_len: int,
                  truncation: str) -> tuple[list[int], list[int]]:
    """Ids and labels of a too-long example cut to ``max_seq_len`` the ``truncation`` way."""
    if truncation == "drop":
        return [], []
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), 0)
    keep_prompt = max_seq_len - (len(input_ids) - first)
    if truncation == "end" or first == 0 or keep_prompt < 1:
        return input_ids[:max_seq_len], labels[:max_seq_len]
    head = (keep_prompt + 1) // 2  # the start keeps BOS and the instructions
    tail = keep_prompt - head  # the end keeps the question and the generation prompt
    kept = input_ids[:head] + input_ids[first - tail:first]
    return kept + input_ids[first:], [IGNORE_INDEX] * len(kept) + labels[first:]


def truncation_effects(tokenized: list[TokenizedExample], max_seq_len: int) -> dict:
    """How many examples each ``data.truncation`` choice affects at ``max_seq_len``.

    ``tokenized`` must be untruncated (tokenized with a very large ``max_seq_len``).
    """
    longer = [ex for ex in tokenized if len(ex.input_ids) > max_seq_len]
    target_too_long = sum(len(ex.input_ids) - ex.n_prompt_tokens > max_seq_len - 1
                          for ex in longer)
    return {
        "max_seq_len": max_seq_len, "longer": len(longer),
        "prompt": {"prompt_cut": len(longer) - target_too_long,
                   "target_cut": target_too_long},
        "drop": {"dropped": len(longer)},
        "end": {"target_cut": sum(ex.n_target_tokens > 0 for ex in longer),
                "target_lost": sum(ex.n_prompt_tokens >= max_seq_len for ex in longer)},
    }
