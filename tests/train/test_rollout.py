"""Rollouts: sampling reproducible from the generator's state, the sampler's log-probs equal to
teacher forcing (the on-policy guard's basis), rows independent of their batch, and the
pre-flight's pass rates and ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunelab.data.tokenize import EvalPrompt
from tunelab.eval.generate import generate_texts
from tunelab.model import varlen
from tunelab.model.adapters import apply_method
from tunelab.model.load import load_model, load_tokenizer
from tunelab.train.reward import Rewards, reward_from_function
from tunelab.train.rollout import (
    RLPrompt,
    answer_logprobs,
    logprob_gap,
    preflight,
    sample_answers,
    score_rollouts,
)

PROMPTS = ["Review: The movie was great, 9/10! Sentiment:", "Review: This plot was dull",
           "What is the capital of France?"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The trainer's set-up: LoRA (B not zero, so it changes the outputs) on per-example
    attention."""
    torch.manual_seed(0)
    base = load_model(tiny_model_dir, device="cpu", dtype="float32")
    varlen.enable(base)
    model = apply_method(base, kind="lora", r=4, alpha=8, dropout=0.0, targets="all-linear",
                         rslora=False)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return model


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]
            for p in PROMPTS]


def sample(model, tokenizer, prompt_ids, seed=0, **options):
    settings = {"group_size": 3, "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0,
                **options}
    return sample_answers(model, tokenizer, prompt_ids,
                          generator=torch.Generator().manual_seed(seed), **settings)


def test_sampling_reproduces_from_the_generator_state(model, tokenizer, prompt_ids):
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    options = {"group_size": 2, "max_new_tokens": 10, "temperature": 0.9, "top_p": 0.95,
               "batch_rows": 4}
    first = sample_answers(model, tokenizer, prompt_ids, generator=generator, **options)
    second = sample_answers(model, tokenizer, prompt_ids,
                            generator=torch.Generator().set_state(state), **options)
    assert first == second
    assert [r.prompt_index for r in first] == [0, 0, 1, 1, 2, 2]
    # the stream moved on: the next draws are new answers
    third = sample_answers(model, tokenizer, prompt_ids, generator=generator, **options)
    assert [r.answer_ids for r in third] != [r.answer_ids for r in first]


def test_train_mode_is_restored(model, tokenizer, prompt_ids):
    model.train()
    try:
        sample(model, tokenizer, prompt_ids[:1], group_size=1, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("which", ["plain", "lora"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampler_logprobs_equal_teacher_forcing(request, which, temperature, top_p, tokenizer,
                                                prompt_ids):
    model = request.getfixturevalue("model" if which == "plain" else "lora_model")
    model.eval()
    rollouts = sample(model, tokenizer, prompt_ids, temperature=temperature, top_p=top_p,
                      batch_rows=4)
    recomputed = answer_logprobs(model, rollouts, temperature=temperature, batch_rows=5)
    for rollout, logprobs in zip(rollouts, recomputed, strict=True):
        assert len(rollout.logprobs) == len(rollout.answer_ids) == logprobs.numel()
        np.testing.assert_allclose(rollout.logprobs, logprobs.detach().numpy(), atol=1e-4)
    assert logprob_gap([r.logprobs for r in rollouts], recomputed) < 1e-5


def test_answer_logprobs_carry_gradients(lora_model, tokenizer, prompt_ids):
    rollouts = sample(lora_model, tokenizer, prompt_ids[:1], group_size=2, max_new_tokens=4)
    with torch.enable_grad():
        logprobs = answer_logprobs(lora_model, rollouts, temperature=1.0)
        torch.cat(logprobs).sum().backward()
    grads = [p.grad for n, p in lora_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    lora_model.zero_grad(set_to_none=True)


def test_rows_do_not_depend_on_their_batch(model, tokenizer, prompt_ids):
    short, long = prompt_ids[1], prompt_ids[0] + prompt_ids[2][1:]
    assert len(long) > len(short) + 5
    # the short prompt left-padded beside a longer one, against teacher forcing it alone
    together = sample(model, tokenizer, [short, long], group_size=2, max_new_tokens=10)
    for rollout in together:
        alone = answer_logprobs(model, [rollout], temperature=1.0)[0]
        np.testing.assert_allclose(rollout.logprobs, alone.detach().numpy(), atol=1e-4)
    # and the answers of a batch scored alone or in a batch agree
    batched = answer_logprobs(model, together, temperature=1.0)
    for rollout, logprobs in zip(together, batched, strict=True):
        alone = answer_logprobs(model, [rollout], temperature=1.0)[0]
        torch.testing.assert_close(logprobs, alone, atol=1e-5, rtol=0)


def test_left_padded_rows_count_positions_from_their_first_token(model, tokenizer, prompt_ids):
    # RoPE attention depends only on position differences, so the batch-independence test
    # cannot see a shifted row; an absolute position embedding would.
    seen = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_ids"].clone()),
        with_kwargs=True)
    try:
        sample(model, tokenizer, [prompt_ids[1], prompt_ids[0]], group_size=1,
               max_new_tokens=2, stop_ids=set())
    finally:
        hook.remove()
    short, long = len(prompt_ids[1]), len(prompt_ids[0])
    assert seen[0][0, long - short:].tolist() == list(range(short))
    assert seen[0][1].tolist() == list(range(long))
    assert seen[1][:, 0].tolist() == [short, long]


def test_truncated_flag_and_stop_ids(model, tokenizer, prompt_ids):
    cut = sample(model, tokenizer, prompt_ids, max_new_tokens=2)
    for rollout in cut:
        ended = rollout.answer_ids[-1] == tokenizer.eos_token_id
        assert rollout.truncated == (not ended) and len(rollout.answer_ids) <= 2
    # every token a stop id: each answer is one token, ended, not truncated
    stopped = sample(model, tokenizer, prompt_ids, stop_ids=set(range(len(tokenizer))))
    assert all(len(r.answer_ids) == 1 and not r.truncated for r in stopped)


def test_eos_ends_a_row_early_while_others_go_on(model, tokenizer, prompt_ids):
    eos = tokenizer.eos_token_id
    bias = torch.zeros(len(tokenizer))
    bias[eos] = 2.5  # EOS made likely, so some rows stop before max_new_tokens
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        rollouts = sample(model, tokenizer, prompt_ids, group_size=4, max_new_tokens=8)
        recomputed = answer_logprobs(model, rollouts, temperature=1.0)
    finally:
        hook.remove()
    lengths = [len(r.answer_ids) for r in rollouts]
    assert min(lengths) < 8 and max(lengths) == 8
    for rollout, logprobs in zip(rollouts, recomputed, strict=True):
        ended = eos in rollout.answer_ids
        assert not ended or rollout.answer_ids.index(eos) == len(rollout.answer_ids) - 1
        assert rollout.truncated == (not ended)
        assert tokenizer.eos_token not in rollout.text
        np.testing.assert_allclose(rollout.logprobs, logprobs.detach().numpy(), atol=1e-4)


def test_near_zero_temperature_is_greedy(model, tokenizer, prompt_ids):
    rollouts = sample(model, tokenizer, prompt_ids, group_size=1, temperature=1e-6,
                      max_new_tokens=8)
    greedy = generate_texts(model, tokenizer, prompt_ids, max_new_tokens=8)
    assert [r.text for r in rollouts] == greedy


def test_preflight_reports_pass_rates_and_ties(model, tokenizer, prompt_ids):
    prompts = [EvalPrompt(text, ids, "x") for text, ids in zip(PROMPTS, prompt_ids,
                                                                 strict=True)]

    def alternating(prompts, completions, **columns):  # 1, 0, 1, 0 within every group
        return [float(i % 2 == 0) for i in range(len(completions))]

    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    common = {"group_size": 4, "max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0,
              "n_resamples": 200}
    varied = preflight(model, tokenizer, prompts, python_rewards(alternating),
                       generator=torch.Generator().manual_seed(0), **common)
    assert {"prompts", "group_size", "pass_at_1", "pass_at_group", "tied_share",
            "mean_reward", "truncated_share"} <= varied.keys()
    assert (varied["prompts"], varied["group_size"]) == (3, 4)
    assert varied["pass_at_1"]["value"] == 0.5 and varied["pass_at_group"]["value"] == 1.0
    assert varied["tied_share"]["value"] == 0.0 and varied["mean_reward"] == 0.5
    assert len(varied["pass_at_1"]["ci"]) == 2
    tied = preflight(model, tokenizer, prompts, python_rewards(constant),
                     generator=torch.Generator().manual_seed(0), **common)
    assert tied["tied_share"]["value"] == 1.0 and tied["pass_at_1"]["value"] == 1.0
    assert 0.0 <= tied["truncated_share"] <= 1.0


def test_score_rollouts_passes_record_fields_and_wheres(model, tokenizer, prompt_ids):
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **columns):
        seen.update(prompts=prompts, answer=answer, ids=completion_ids)
        return [None] * len(completions)

    prompts = [RLPrompt(PROMPTS[i], prompt_ids[i], "", {"answer": str(i)}, f"train.jsonl:{i}")
               for i in range(2)]
    rollouts = sample(model, tokenizer, prompt_ids[:2], group_size=2, max_new_tokens=3)
    scores = score_rollouts(python_rewards(spy), prompts, rollouts)
    assert seen["answer"] == ["0", "0", "1", "1"] and seen["prompts"][2] == PROMPTS[1]
    assert seen["ids"] == [r.answer_ids for r in rollouts]
    assert np.isnan(scores.total).all()


def python_rewards(function) -> Rewards:
    """Rewards of one python function, as load_rewards builds them from a python: entry."""
    return Rewards([reward_from_function(function)])
