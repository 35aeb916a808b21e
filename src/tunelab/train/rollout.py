"""Answers sampled from the model in training (reinforcement's rollouts) and their log-probs.

``sample_answers`` decodes ``group_size`` answers per prompt in left-padded batches with the
model's own KV cache, sampling from ``softmax(logits / temperature)`` (nucleus ``top_p``) with
the trainer's ``torch.Generator``, so the sampling stream is a state a checkpoint keeps. It
records each sampled token's log-probability under the distribution before the nucleus cut, as
TRL's ``old_per_token_logps`` are. ``answer_logprobs`` recomputes them by teacher forcing: the
two agree when the answers come from the policy being trained, which is what the on-policy
guard checks (``logprob_gap``). ``preflight`` samples from the starting model before training
to say whether the rewards can teach it anything (pass@1, pass@G, groups that tie).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from tunelab.eval.stats import metric_with_ci
from tunelab.model.adapters import model_parts
from tunelab.train.reward import Rewards, RewardScores, reward_columns, tied_groups

PASS_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Rollout:
    """One sampled answer to one prompt."""

    prompt_index: int  # which of the prompts given it answers
    prompt_ids: list[int]
    answer_ids: list[int]  # EOS (or the stop id) included when the answer ended on its own
    logprobs: list[float]  # the sampler's log-prob of each answer token (before top_p)
    truncated: bool  # cut at max_new_tokens without ending
    text: str  # the answer decoded without special tokens


@dataclass(frozen=True)
class RLPrompt:
    """A training prompt of a reinforcement run: what the model reads and what judges it."""

    text: str
    ids: list[int]
    target: str  # the reference the task reward compares answers with
    fields: Mapping[str, Any] = field(default_factory=dict)  # the record's raw fields
    where: str = ""  # the record's file:line
    context: str | None = None  # what the hallucination check reads (eval.context)


class PromptLike(Protocol):
    """What scoring needs of a prompt: ``RLPrompt``, or ``data.tokenize.EvalPrompt``."""

    text: str
    ids: list[int]
    target: str


@torch.no_grad()
def sample_answers(model: nn.Module, tokenizer, prompt_ids: Sequence[Sequence[int]], *,
                   group_size: int, max_new_tokens: int, temperature: float, top_p: float,
                   generator: torch.Generator, batch_rows: int = 32,
                   stop_ids: set[int] | None = None) -> list[Rollout]:
    """``group_size`` sampled answers per prompt, prompt by prompt (``Rollout.prompt_index``).

    A row stops at the tokenizer's EOS or any of ``stop_ids`` (e.g. the chat template's
    end-of-turn id), or after ``max_new_tokens``. Draws come from ``generator`` alone, on its
    device (a CPU generator with a GPU model copies each step's probabilities to the CPU), so
    the same generator state gives the same answers. The model runs in eval mode; its mode is
    restored afterwards.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be above 0, got {temperature}")
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    stops = set(stop_ids or ()) | ({tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [(index, list(ids)) for index, ids in enumerate(prompt_ids) for _ in range(group_size)]
    was_training = model.training
    model.eval()
    sampled: list[tuple[int, list[int], list[int], list[float], bool]] = []
    try:
        for start in range(0, len(rows), batch_rows):
            sampled += _sample_batch(model, rows[start:start + batch_rows], stops=stops, pad=pad,
                                     max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, generator=generator)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode([answer for _, _, answer, _, _ in sampled],
                                   skip_special_tokens=True)
    return [Rollout(index, prompt, answer, logprobs, truncated, text)
            for (index, prompt, answer, logprobs, truncated), text in zip(sampled, texts,
                                                                          strict=True)]


def _sample_batch(model: nn.Module, rows: list[tuple[int, list[int]]], *, stops: set[int],
                  pad: int, max_new_tokens: int, temperature: float, top_p: float,
                  generator: torch.Generator) -> list:
    """One left-padded batch decoded token by token; finished rows leave the batch (and the
    cache), so a long answer does not keep the short ones' rows computing."""
    device = next(model.parameters()).device
    width = max(len(ids) for _, ids in rows)
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in rows], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in rows],
                        device=device)
    # Left padding shifts each row's tokens; the positions they were trained at start at 0.
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    stop_tensor = torch.tensor(sorted(stops), device=device, dtype=torch.long)
    cache = DynamicCache(config=model.config)
    with_cache = {_cache_argument(model): cache, "use_cache": True}
    answers: list[list[int]] = [[] for _ in rows]
    logprobs: list[list[float]] = [[] for _ in rows]
    active = torch.arange(len(rows), device=device)  # the rows still writing, as batch indices
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=1, **with_cache).logits[:, -1]
    next_position = positions[:, -1] + 1
    for step in range(max_new_tokens):
        tokens, token_logprobs = _draw(logits, temperature=temperature, top_p=top_p,
                                       generator=generator)
        for row, token, logprob in zip(active.tolist(), tokens.tolist(),
                                       token_logprobs.tolist(), strict=True):
            answers[row].append(token)
            logprobs[row].append(logprob)
        going = ~torch.isin(tokens, stop_tensor)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = torch.nonzero(going).flatten()
            cache.batch_select_indices(keep)
            active, tokens, mask, next_position = (active[keep], tokens[keep], mask[keep],
                                                   next_position[keep])
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask,
                       position_ids=next_position[:, None], **with_cache).logits[:, -1]
        next_position = next_position + 1
    return [(index, ids, answer, logprob, answer[-1] not in stops)
            for (index, ids), answer, logprob in zip(rows, answers, logprobs, strict=True)]


def _cache_argument(model: nn.Module) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; older releases know only the
    former (as ship/engine.py asks)."""
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def _draw(logits: torch.Tensor, *, temperature: float, top_p: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A token per row from softmax(logits / temperature) cut to its nucleus ``top_p``, and
    its log-probability under the uncut distribution."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        # Keep the most probable tokens until their mass reaches top_p (the first always).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    tokens = torch.multinomial(probs.to(generator.device), 1, generator=generator)
    tokens = tokens.to(logits.device)
    return tokens[:, 0], logp.gather(1, tokens)[:, 0]


def answer_logprobs(model: nn.Module, rollouts: Sequence[Rollout], *, temperature: float,
                    batch_rows: int = 32) -> list[torch.Tensor]:
    """Each rollout's answer-token log-probs under softmax(logits / temperature), by teacher
    forcing: one forward pass per batch of right-padded rows (prompt + answer) with an
    attention mask; the output layer runs on the answer's positions only.

    A path independent of the trainer's packed rows, so the guard that compares it with the
    sampler also catches a fault in those. Gradients flow when called under grad; the model's
    mode is left as it is (compare in eval mode, or with dropout off).
    """
    body, output_layer, softcap = model_parts(model)
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(rollouts), batch_rows):
        chunk = rollouts[start:start + batch_rows]
        sequences = [r.prompt_ids + r.answer_ids for r in chunk]
        width = max(len(s) for s in sequences)
        input_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences],
                            device=device)
        positions = torch.arange(width, device=device).expand(len(chunk), width)
        hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state
        # Answer token k is predicted at the position before it: the prompt's last token for k=0.
        rows = torch.tensor([i for i, r in enumerate(chunk) for _ in r.answer_ids], device=device)
        columns = torch.tensor([len(r.prompt_ids) - 1 + k for r in chunk
                                for k in range(len(r.answer_ids))], device=device)
        targets = torch.tensor([t for r in chunk for t in r.answer_ids], device=device)
        logits = output_layer(hidden[rows, columns]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token_logp = torch.log_softmax(logits / temperature, dim=-1).gather(
            1, targets[:, None])[:, 0]
        out += list(token_logp.split([len(r.answer_ids) for r in chunk]))
    return out


def logprob_gap(sampler: Sequence[Sequence[float]], trainer: Sequence[torch.Tensor]) -> float:
    """Mean absolute difference per token between the sampler's and the trainer's log-probs of
    the same answers (nats); every token weighs the same."""
    if len(sampler) != len(trainer):
        raise ValueError(f"{len(sampler)} sampled answers against {len(trainer)} recomputed")
    total, count = 0.0, 0
    for sampled, recomputed in zip(sampler, trainer, strict=True):
        recomputed = recomputed.detach().float().cpu()
        if len(sampled) != recomputed.numel():
            raise ValueError(f"an answer has {len(sampled)} sampled log-probs and "
                             f"{recomputed.numel()} recomputed")
        total += float((torch.tensor(sampled, dtype=torch.float32) - recomputed).abs().sum())
        count += len(sampled)
    return total / count if count else 0.0


def score_rollouts(rewards: Rewards, prompts: Sequence[PromptLike],
                   rollouts: Sequence[Rollout]) -> RewardScores:
    """The rewards of each rollout against its prompt (``Rollout.prompt_index``): the prompt's
    text, reference, record fields, context and file:line repeated for each of its answers."""
    chosen = [prompts[r.prompt_index] for r in rollouts]
    columns = reward_columns([getattr(p, "fields", {}) for p in chosen], group_size=1)
    return rewards.score(
        [p.text for p in chosen], [r.text for r in rollouts], [p.target for p in chosen],
        columns, [getattr(p, "context", None) for p in chosen],
        [getattr(p, "where", "") or f"prompt {r.prompt_index}" for p, r in zip(
            chosen, rollouts, strict=True)],
        completion_ids=[r.answer_ids for r in rollouts])


def preflight(model: nn.Module, tokenizer, prompts: Sequence[PromptLike], rewards: Rewards, *,
              group_size: int, max_new_tokens: int, temperature: float, top_p: float,
              generator: torch.Generator, stop_ids: set[int] | None = None,
              batch_rows: int = 32, pass_reward: float = 1.0, n_resamples: int = 1000,
              seed: int = 0) -> dict:
    """Before training: ``group_size`` answers per prompt from the starting model, scored.

    An answer passes when its total reward is the maximum, ``pass_reward`` (1 for one 0-1
    reward; a NaN total, no reward judging it, does not pass). pass_at_1 is the mean over
    prompts of the share of answers that pass, pass_at_group the share of prompts with at least
    one that does, tied_share the share of groups whose rewards are all equal (nothing to learn
    from them); each with a seeded bootstrap interval over prompts.
    """
    rollouts = sample_answers(model, tokenizer, [p.ids for p in prompts],
                              group_size=group_size, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, generator=generator,
                              batch_rows=batch_rows, stop_ids=stop_ids)
    scores = score_rollouts(rewards, prompts, rollouts)
    totals = scores.total.reshape(len(prompts), group_size)
    with np.errstate(invalid="ignore"):
        passed = totals >= pass_reward - PASS_TOLERANCE
    interval = lambda values: metric_with_ci(  # noqa: E731
        values.astype(float), n_resamples=n_resamples, seed=seed)
    return {
        "prompts": len(prompts), "group_size": group_size,
        "pass_at_1": interval(passed.mean(axis=1)),
        "pass_at_group": interval(passed.any(axis=1)),
        "tied_share": interval(tied_groups(totals)),
        "mean_reward": _nan_mean(scores.total),
        "per_reward": {name: _nan_mean(values) for name, values in scores.per_function.items()},
        "truncated_share": float(np.mean([r.truncated for r in rollouts])) if rollouts else 0.0,
    }


def _nan_mean(values: np.ndarray) -> float | None:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else None
