"""The serving engine: batched generation equals one-at-a-time generation, token for token,
prompts that arrive together are prefilled in one forward pass per adapter."""

from __future__ import annotations

import threading

import pytest
import torch

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
    assert engine.prefill_passes == 1  # four prompts of different lengths, left-padded
    assert engine.decode_passes == 11  # the first token comes from the prefill


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


def run_engine(engine: Engine, requests: list[tuple[list[list[int]], str | None, Sampling]],
               *, one_at_a_time: bool = False) -> list[dict[int, str]]:
    """Each request's texts by choice: all queued before the first turn, or each submitted
    only after the one before it finished (so every prefill holds one request)."""
    collectors = [Collector(expected=len(prompts) * sampling.n)
                  for prompts, _, sampling in requests]
    if not one_at_a_time:
        for (prompts, adapter, sampling), collector in zip(requests, collectors, strict=True):
            engine.submit(Request(prompts, adapter, sampling, collector))
    engine.start()
    try:
        for (prompts, adapter, sampling), collector in zip(requests, collectors, strict=True):
            if one_at_a_time:
                engine.submit(Request(prompts, adapter, sampling, collector))
            assert collector.finished.wait(120)
    finally:
        engine.stop()
    assert all(done.kind == "done" for c in collectors for done in c.done.values())
    return [c.texts for c in collectors]


@pytest.fixture(scope="module")
def two_adapters(tiny_model_dir):
    """The tiny model with two LoRA adapters whose B matrices are random (so they matter)."""
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_model_dir, device="cpu")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, config, adapter_name="first")
    model.add_adapter("second", config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model.eval(), load_tokenizer(tiny_model_dir)


def test_prompts_arriving_together_are_prefilled_once_per_adapter_and_stay_exact(two_adapters):
    model, tokenizer = two_adapters
    greedy = Sampling(max_new_tokens=10)
    requests = [([ids(tokenizer, PROMPTS[0])], "first", greedy),
                ([ids(tokenizer, PROMPTS[1]), ids(tokenizer, PROMPTS[3])], "second", greedy),
                ([ids(tokenizer, PROMPTS[2])], None, Sampling(max_new_tokens=10, n=2)),
                ([ids(tokenizer, PROMPTS[3])], "first", greedy),
                ([ids(tokenizer, PROMPTS[1])], "second", greedy)]
    together = Engine(model, tokenizer)
    batched = run_engine(together, requests)
    alone = Engine(model, tokenizer)
    assert batched == run_engine(alone, requests, one_at_a_time=True)
    assert together.prefill_passes == 3 and alone.prefill_passes == len(requests)
    # and what each model gives offline, so an adapter mixed up in the batch would show
    offline = {}
    for adapter in ("first", "second"):
        model.set_adapter(adapter)
        offline[adapter] = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=10)
    with model.disable_adapter():
        offline[None] = generate_texts(model, tokenizer, PROMPTS, max_new_tokens=10)
    assert batched == [{0: offline["first"][0]}, {0: offline["second"][1], 1: offline["second"][3]},
                       {0: offline[None][2], 1: offline[None][2]}, {0: offline["first"][3]},
                       {0: offline["second"][1]}]
    assert offline["first"][3] != offline["second"][3] != offline[None][3]


def test_a_prefill_over_the_token_budget_is_split_and_stays_exact(tiny):
    model, tokenizer = tiny
    requests = [([ids(tokenizer, prompt)], None, Sampling(max_new_tokens=8))
                for prompt in PROMPTS]
    longest = max(len(ids(tokenizer, prompt)) for prompt in PROMPTS)
    engine = Engine(model, tokenizer, max_prefill_tokens=2 * longest)
    texts = run_engine(engine, requests)
    assert engine.prefill_passes == 2  # two prompts each
    assert [t[0] for t in texts] == generate_texts(model, tokenizer, PROMPTS, max_new_tokens=8)


def test_seeded_samples_do_not_depend_on_the_requests_prefilled_beside_them(tiny):
    model, tokenizer = tiny
    sampled = ([ids(tokenizer, PROMPTS[0])], None,
               Sampling(max_new_tokens=10, temperature=1.0, seed=3, n=2))
    others = [([ids(tokenizer, prompt)], None, Sampling(max_new_tokens=10, temperature=1.0,
                                                        seed=number))
              for number, prompt in enumerate(PROMPTS[1:])]
    alone = run_engine(Engine(model, tokenizer), [sampled])[0]
    beside = run_engine(Engine(model, tokenizer), [others[0], sampled, *others[1:]])[1]
    assert alone == beside and alone[0] != alone[1]
