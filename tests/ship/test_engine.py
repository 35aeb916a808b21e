"""The serving engine: batched generation equals one-at-a-time generation, token for token."""

from __future__ import annotations

import threading

import pytest

from tunelab.data.render import bos_to_add
from tunelab.eval.generate import generate_texts
from tunelab.model.load import load_model, load_tokenizer
from tunelab.ship.engine import Engine, Request, Sampling

PROMPTS = ["Review: The movie was good", "Hi", "Translate to German: Good morning! Guten",
           "1 2 3 4 5 6 7 8 9 10 11 12 13"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu").eval(), load_tokenizer(tiny_model_dir)


class Collector:
    """Gathers one request's events; ``then`` runs once after ``after`` deltas (to join late)."""

    def __init__(self, expected: int = 1, then=None, after: int = 0):
        self.expected = expected
        self.texts: dict[int, str] = {}
        self.done: dict[int, object] = {}
        self.finished = threading.Event()
        self.then, self.after, self.deltas = then, after, 0

    def __call__(self, event) -> None:
        if event.kind == "delta":
            self.texts[event.index] = self.texts.get(event.index, "") + event.text
            self.deltas += 1
            if self.then is not None and self.deltas == self.after:
                self.then()
        else:
            self.done[event.index] = event
            if event.kind == "error" or len(self.done) == self.expected:
                self.finished.set()


def ids(tokenizer, text: str) -> list[int]:
    bos = bos_to_add(tokenizer)
    return ([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False).input_ids


def test_requests_queued_together_share_every_decode_pass_and_match_offline(tiny):
    model, tokenizer = tiny
    expected = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=12)
    engine = Engine(model, tokenizer)
    collectors = [Collector() for _ in PROMPTS]
    for prompt, collector in zip(PROMPTS, collectors, strict=True):
        engine.submit(Request([ids(tokenizer, prompt)], None, Sampling(max_new_tokens=12),
                              collector))
    engine.start()  # all four arrive before the first turn: one batch of different lengths
    try:
        assert all(c.finished.wait(60) for c in collectors)
    finally:
        engine.stop()
    assert [c.texts.get(0, "") for c in collectors] == expected
    assert all(c.done[0].finish_reason == "length" for c in collectors)
    assert all(c.done[0].completion_tokens == 12 for c in collectors)
    assert engine.decode_passes == 11  # the first token comes from each prefill


def test_a_request_joining_a_running_batch_starts_at_once_and_stays_exact(tiny):
    model, tokenizer = tiny
    expected = generate_texts(model, tokenizer, PROMPTS[:2], max_new_tokens=30)
    engine = Engine(model, tokenizer)
    late = Collector()
    join = lambda: engine.submit(Request([ids(tokenizer, PROMPTS[1])], None,  # noqa: E731
                                         Sampling(max_new_tokens=30), late))
    early = Collector(then=join, after=5)
    engine.submit(Request([ids(tokenizer, PROMPTS[0])], None, Sampling(max_new_tokens=30), early))
    engine.start()
    try:
        assert early.finished.wait(60) and late.finished.wait(60)
    finally:
        engine.stop()
    assert [early.texts[0], late.texts[0]] == expected
    # the late request ran beside the early one: fewer passes than running them one after another
    assert engine.decode_passes < 2 * 29


def test_stop_strings_cut_the_text_and_are_never_streamed(tiny):
    model, tokenizer = tiny
    full = generate_texts(model, tokenizer, [PROMPTS[0]], max_new_tokens=20)[0]
    stop = full[6:9]  # a marker the greedy continuation certainly contains
    engine = Engine(model, tokenizer)
    collector = Collector()
    engine.submit(Request([ids(tokenizer, PROMPTS[0])], None,
                          Sampling(max_new_tokens=20, stop=(stop,)), collector))
    engine.start()
    try:
        assert collector.finished.wait(60)
    finally:
        engine.stop()
    assert collector.texts.get(0, "") == full[:full.find(stop)]
    assert collector.done[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_choices_differ(tiny):
    model, tokenizer = tiny
    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=3)
    runs = []
    for _ in range(2):
        engine = Engine(model, tokenizer)
        collector = Collector(expected=3)
        engine.submit(Request([ids(tokenizer, PROMPTS[0])], None, sampling, collector))
        engine.start()
        try:
            assert collector.finished.wait(60)
        finally:
            engine.stop()
        runs.append([collector.texts.get(i, "") for i in range(3)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


def test_a_cancelled_request_leaves_the_batch_and_reports_no_end(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    other = Collector()
    request = Request([ids(tokenizer, PROMPTS[0])], None, Sampling(max_new_tokens=200), None)
    cancelled = Collector(then=request.cancelled.set, after=3)
    request.on_event = cancelled
    engine.submit(request)
    engine.submit(Request([ids(tokenizer, PROMPTS[1])], None, Sampling(max_new_tokens=20), other))
    engine.start()
    try:
        assert other.finished.wait(60)
        for _ in range(600):
            if engine.running_sequences() == 0:
                break
            threading.Event().wait(0.05)
    finally:
        engine.stop()
    assert engine.running_sequences() == 0 and engine.cancelled_sequences == 1
    assert not cancelled.done and len(cancelled.texts[0]) > 0
    assert other.done[0].completion_tokens == 20
