"""Loss masks: exactly the completion / assistant tokens carry labels."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tunelab.data.formats import Example, Message, Segment
from tunelab.data.render import render_segments
from tunelab.data.tokenize import IGNORE_INDEX, eval_prompts, tokenize_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def completion(prompt: str, target: str) -> Example:
    return Example("template", "data.jsonl", 1,
                   segments=[Segment(prompt, False), Segment(target, True)], label=target)


def trained_text(tokenizer, tokenized) -> str:
    ids = [label for label in tokenized.labels if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_completion_labels_cover_exactly_the_completion_and_eos(tokenizer):
    [tokenized] = tokenize_examples([completion("Review: good movie\nSentiment:", " positive")],
                                    tokenizer, max_seq_len=64)
    prompt_ids = tokenizer("Review: good movie\nSentiment:", add_special_tokens=False).input_ids
    target_ids = tokenizer(" positive", add_special_tokens=False).input_ids
    assert tokenized.input_ids == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert tokenized.labels == ([IGNORE_INDEX] * len(prompt_ids) + target_ids
                                + [tokenizer.eos_token_id])
    assert tokenized.n_target_tokens == len(target_ids) + 1


def test_train_on_all_puts_loss_on_the_prompt_too(tokenizer):
    [tokenized] = tokenize_examples([completion("Review: bad", " negative")], tokenizer,
                                    max_seq_len=64, train_on="all")
    assert tokenized.labels == tokenized.input_ids


def test_chat_loss_only_on_assistant_turns_with_weight(tokenizer):
    example = Example("chat", "chat.jsonl", 3, messages=[
        Message("system", "Be brief."),
        Message("user", "Is it good?"),
        Message("assistant", "It is bad.", weight=0),
        Message("user", "And now?"),
        Message("assistant", "It is good."),
    ])
    [tokenized] = tokenize_examples([example], tokenizer, max_seq_len=256)
    assert trained_text(tokenizer, tokenized) == "It is good.<|im_end|>\n"
    # Everything else, the weight-0 answer included, is context only.
    full = tokenizer.decode(tokenized.input_ids)
    assert "It is bad." in full and full.startswith("<|im_start|>system\nBe brief.")


def test_chat_without_template_uses_chatml(tiny_model_dir_no_template):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir_no_template)
    example = Example("chat", "chat.jsonl", 1, messages=[Message("user", "Hi"),
                                                          Message("assistant", "Hello")])
    segments = render_segments(example, tokenizer)
    assert [(s.text, s.train) for s in segments] == [
        ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello<|im_end|>\n", True),
    ]


def test_truncation_at_the_end_cuts_the_target_and_is_flagged(tokenizer):
    [long, short] = tokenize_examples(
        [completion("the movie was good " * 30, " positive"), completion("ok", " fine")],
        tokenizer, max_seq_len=16, truncation="end")
    assert len(long.input_ids) == 16 and long.truncated
    assert long.n_target_tokens == 0  # the target was cut off: the loop skips such examples
    assert not short.truncated


def test_eval_prompt_and_reference(tokenizer):
    [prompt] = eval_prompts([completion("Review: dull\nSentiment:", " negative")], tokenizer)
    assert (prompt.text, prompt.target) == ("Review: dull\nSentiment:", " negative")
    chat = Example("chat", "c.jsonl", 1, messages=[Message("user", "Hi"),
                                                    Message("assistant", "Hello")])
    [prompt] = eval_prompts([chat], tokenizer)
    assert prompt.text.endswith("<|im_start|>assistant\n") and prompt.target == "Hello"
