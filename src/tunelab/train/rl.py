"""Reinforcement with verifiable rewards (GRPO, RLOO): each step samples, scores and learns.

A step takes its prompts from the run's schedule (a prompt counts as one unit of it), samples
``rl.group_size`` answers to each from the model being trained (``rollout.sample_answers``, in
this process, with this step's adapter: on-policy by construction), scores them with the rewards
(``reward.Rewards``) and compares each answer with its group (``reward.advantages``). The
answers then go through the loop's own step (``step.forward_backward``) as one more kind of
batch, whose loss is the policy gradient: each answer token's log-probability, weighted by its
answer's advantage over the loss's normaliser (``rl.loss``), with an optional k3 KL penalty
towards the reference (the adapter switched off).

The trainer's log-probabilities of the sampled tokens come out of the same forward pass as the
loss, so the on-policy guard costs nothing: at step 1 and every ``rl.guard_every`` steps their
mean gap to the sampler's must stay under ``rl.guard_tolerance``. Each step's sampling seed is
a function of the run's seed and the step, so a resumed run samples what it would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tunelab.config import Config
from tunelab.data.packing import Batch, collate, plan_batches
from tunelab.data.prepare import Split, read_run_splits
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample, eval_prompts
from tunelab.errors import ConfigError, TrainingError
from tunelab.train.loss import target_logps
from tunelab.train.preference import reference_model
from tunelab.train.reward import Rewards, advantages, load_rewards, tie_share
from tunelab.train.rollout import RLPrompt, Rollout, preflight, sample_answers, score_rollouts


@dataclass
class RLBatch(Batch):
    """Sampled answers after their prompts, with each answer token's weight in the loss."""

    token_weights: torch.Tensor | None = None  # [target tokens] advantage / normaliser
    kl_scale: torch.Tensor | None = None  # [target tokens] the normaliser alone
    sampler_logps: torch.Tensor | None = None  # [target tokens] what the sampler computed
    units: float = 0.0  # this batch's share of the loss's normaliser

    @property
    def loss_units(self) -> float:
        return self.units

    def to(self, device: torch.device) -> RLBatch:
        moved = super().to(device)
        return RLBatch(**vars(moved), token_weights=self.token_weights.to(device),
                       kl_scale=self.kl_scale.to(device),
                       sampler_logps=self.sampler_logps.to(device), units=self.units)


class PolicyGradientLoss(nn.Module):
    """The model and its policy-gradient loss over an ``RLBatch``, as one module (what DDP
    wraps, like ``distributed.StepLoss``): ``(summed loss, summed statistics)``."""

    def __init__(self, model: nn.Module, *, temperature: float, kl_weight: float,
                 chunk_tokens: int):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: RLBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, _, entropy = target_logps(self.model, batch, chunk_tokens=self.chunk_tokens,
                                         temperature=self.temperature, entropy=True)
        # exp(logp − logp) is 1 with logp's gradient: the on-policy importance ratio
        ratio = torch.exp(logps - logps.detach())
        loss = -(batch.token_weights * ratio).sum()
        stats = {"logprob_gap": (logps.detach() - batch.sampler_logps).abs().sum(),
                 "entropy": entropy.sum(), "answer_tokens": logps.new_tensor(logps.numel())}
        if self.kl_weight:
            with reference_model(self.model):
                reference, _, _ = target_logps(self.model, batch, chunk_tokens=self.chunk_tokens,
                                               temperature=self.temperature)
            delta = reference - logps
            k3 = torch.exp(delta) - delta - 1  # Schulman's unbiased, positive KL estimator
            loss = loss + self.kl_weight * (batch.kl_scale * k3).sum()
            stats["kl"] = k3.detach().sum()
        if batch.n_tokens == 0:  # a padding batch of an uneven rank
            return loss * 0.0, {name: value * 0.0 for name, value in stats.items()}
        return loss, stats


def rl_prompts(config: Config, split: Split, tokenizer) -> list[RLPrompt]:
    """A split's prompts as the model reads them (the renderer training uses), each with its
    reference, its record's columns, its file:line and (``eval.context``) its context."""
    data = config.data
    prompts = eval_prompts(split.examples, tokenizer, chat_template=data.chat_template,
                           chat_template_kwargs=data.chat_template_kwargs,
                           max_seq_len=config.train.max_seq_len)
    context = config.eval.context if config.eval else None
    return [RLPrompt(prompt.text, list(prompt.ids), prompt.target, record.fields, record.where,
                     context.format_map(record.fields) if context else None)
            for prompt, record in zip(prompts, split.records, strict=True)]


@dataclass
class Reinforcement:
    """What a reinforcement run's steps read: prompts, rewards, settings."""

    prompts: list[RLPrompt]
    validation_prompts: list[RLPrompt]
    rewards: Rewards
    estimator: str  # grpo | rloo
    stop_ids: set[int]


def set_up_reinforcement(config: Config, tokenizer) -> Reinforcement:
    """The run's prompts (train and validation, records kept) and rewards."""
    if config.data.tasks:
        raise ConfigError("reinforcement trains on one task's prompts", where="data.tasks",
                          fix="train each task on its own, or use method.objective: sft")
    train, validation = read_run_splits(config.data, seed=config.train.seed)
    rewards = load_rewards(config.rl.rewards, config.eval, config_dir=None)
    return Reinforcement(rl_prompts(config, train, tokenizer),
                         rl_prompts(config, validation, tokenizer), rewards,
                         config.method.objective, _stop_ids(tokenizer))


def _stop_ids(tokenizer) -> set[int]:
    """Token ids that end an answer besides EOS: the chat template's end-of-turn marker."""
    ids = set()
    for marker in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        token = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token, int) and token != tokenizer.unk_token_id:
            ids.add(token)
    return ids


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of optimizer step ``step``: resuming at a step samples its answers."""
    return (seed * 1_000_003 + step) % (2**63)


def sample_step(model: nn.Module, tokenizer, reinforcement: Reinforcement, indices: list[int],
                config: Config, *, step: int, device: torch.device):
    """The step's rollouts for the prompts at ``indices``, their rewards and advantages."""
    from tunelab.train.step import autocast

    rl = config.rl
    generator = torch.Generator().manual_seed(step_seed(config.train.seed, step))
    prompts = [reinforcement.prompts[i] for i in indices]
    started = time.perf_counter()
    with autocast(device):  # the precision the loss's forward pass runs in
        rollouts = sample_answers(model, tokenizer, [p.ids for p in prompts],
                                  group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
                                  temperature=rl.temperature, top_p=rl.top_p,
                                  generator=generator, stop_ids=reinforcement.stop_ids)
    rollout_s = time.perf_counter() - started
    scores = score_rollouts(reinforcement.rewards, prompts, rollouts)
    totals = scores.total.reshape(len(prompts), rl.group_size)
    advantage = advantages(totals, estimator=reinforcement.estimator,
                           scale=rl.scale_rewards).reshape(-1)
    return rollouts, scores, totals, advantage, rollout_s


def answer_batches(rollouts: list[Rollout], advantage: np.ndarray, config: Config, *,
                   pad_id: int) -> list[RLBatch]:
    """The step's answers as micro-batches of ``train.batch_tokens``, each answer token weighted
    by its answer's advantage over the loss's normaliser; a left-out answer (truncated under
    ``rl.mask_truncated``, or no reward judged it) weighs 0."""
    rl = config.rl
    kept = [np.isfinite(a) and not (rl.mask_truncated and r.truncated)
            for r, a in zip(rollouts, advantage, strict=True)]
    answer_tokens = sum(len(r.answer_ids) for r, keep in zip(rollouts, kept, strict=True) if keep)
    n_kept = sum(kept)
    per_token = []  # each answer's (weight of each of its tokens, normaliser share per token)
    for rollout, value, keep in zip(rollouts, advantage, kept, strict=True):
        length = len(rollout.answer_ids)
        if not keep:
            per_token.append((0.0, 0.0))
        elif rl.loss == "dapo":  # one mean over every kept answer token of the step
            per_token.append((float(value), 1.0))
        elif rl.loss == "grpo":  # each answer's mean, then the answers' mean
            per_token.append((float(value) / length, 1.0 / length))
        else:  # dr_grpo: each answer's sum over the longest allowed answer
            per_token.append((float(value) / rl.max_new_tokens, 1.0 / rl.max_new_tokens))
    units_total = answer_tokens if rl.loss == "dapo" else n_kept
    sequences = [TokenizedExample(r.prompt_ids + r.answer_ids,
                                  [IGNORE_INDEX] * len(r.prompt_ids) + r.answer_ids, "rollout", i)
                 for i, r in enumerate(rollouts)]
    batches = []
    for indices in plan_batches([len(s.input_ids) for s in sequences],
                                batch_tokens=config.train.batch_tokens, packing=True):
        batch = collate([sequences[i] for i in indices], packing=True, pad_id=pad_id)
        weights = [per_token[i][0] for i in indices for _ in rollouts[i].answer_ids]
        scales = [per_token[i][1] for i in indices for _ in rollouts[i].answer_ids]
        sampler = [p for i in indices for p in rollouts[i].logprobs]
        share = sum((len(rollouts[i].answer_ids) if rl.loss == "dapo" else 1)
                    for i in indices if kept[i])
        batches.append(RLBatch(**vars(batch), token_weights=torch.tensor(weights),
                               kl_scale=torch.tensor(scales), sampler_logps=torch.tensor(sampler),
                               units=float(share)))
    if units_total == 0:  # nothing to learn from in this step: the pass still runs the guard
        for batch in batches:
            batch.units = 1.0 / len(batches)
    return batches


def step_metrics(rollouts: list[Rollout], scores, totals: np.ndarray, rollout_s: float,
                 stats: dict[str, float], n_units: float) -> dict:
    """What a reinforcement step logs beside the loss: rewards (each function's mean and
    spread), groups that tie, answers' lengths and truncation, the guard's gap, entropy, KL."""
    tokens = max(1.0, stats.get("answer_tokens", 0.0) * n_units)
    per_token = {name: round(stats[name] * n_units / tokens, 6)
                 for name in ("logprob_gap", "entropy", "kl") if name in stats}
    lengths = [len(r.answer_ids) for r in rollouts]
    record = {"reward": _rounded(np.nanmean(totals)), "reward_std": _rounded(np.nanstd(totals)),
              "tied_share": round(tie_share(totals), 4),
              "answer_tokens_mean": round(float(np.mean(lengths)), 2),
              "truncated_share": round(float(np.mean([r.truncated for r in rollouts])), 4),
              "rollout_s": round(rollout_s, 3),
              "rollout_tokens_per_second": round(sum(lengths) / max(rollout_s, 1e-9), 1),
              **per_token}
    for name, values in scores.per_function.items():
        record[f"reward_{name}"] = _rounded(np.nanmean(values))
        record[f"reward_{name}_std"] = _rounded(np.nanstd(values))
    return record


def _rounded(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def check_on_policy(gap: float, *, step: int, config: Config) -> None:
    """Fail the run when the trainer's log-probs of the sampled tokens are not the sampler's."""
    rl = config.rl
    if step != 1 and step % rl.guard_every:
        return
    if gap > rl.guard_tolerance:
        raise TrainingError(
            f"at step {step} the trainer's log-probabilities of the sampled answers differ from "
            f"the sampler's by {gap:.4f} nats per token (rl.guard_tolerance: "
            f"{rl.guard_tolerance}): the answers are not from the policy being trained",
            where="rl.guard_tolerance", fix="train in float32 (model.dtype: float32), or raise "
            "rl.guard_tolerance if the gap is a kernel's rounding (bf16 kernels differ more)")


@torch.no_grad()
def validation_reward(model: nn.Module, tokenizer, reinforcement: Reinforcement,
                      config: Config, *, limit: int = 64) -> dict:
    """The mean total reward of greedy answers to (up to ``limit``) validation prompts, with its
    bootstrap interval: the held-out measure of what the rewards ask for."""
    from tunelab.eval.generate import generate_texts
    from tunelab.eval.stats import bootstrap_ci

    prompts = reinforcement.validation_prompts[:limit]
    if not prompts:
        return {}
    texts = generate_texts(model, tokenizer, [p.ids for p in prompts],
                           max_new_tokens=config.rl.max_new_tokens)
    rollouts = [Rollout(i, p.ids, [], [], False, text) for i, (p, text) in
                enumerate(zip(prompts, texts, strict=True))]
    totals = score_rollouts(reinforcement.rewards, prompts, rollouts).total
    finite = totals[np.isfinite(totals)]
    if not finite.size:
        return {}
    low, high = bootstrap_ci(finite.tolist())
    return {"val_reward": round(float(finite.mean()), 6),
            "val_reward_ci": [round(low, 4), round(high, 4)], "val_prompts": int(finite.size)}


def run_preflight(model: nn.Module, tokenizer, reinforcement: Reinforcement, config: Config,
                  device: torch.device) -> dict:
    """The pre-flight before any training: the starting model's pass@1 / pass@G and tied
    groups on ``rl.preflight_prompts`` training prompts; stops a run with nothing to learn."""
    from tunelab.train.step import autocast

    rl = config.rl
    prompts = reinforcement.prompts[:rl.preflight_prompts]
    if not prompts:
        return {}
    generator = torch.Generator().manual_seed(step_seed(config.train.seed, 0))
    with autocast(device):
        report = preflight(model, tokenizer, prompts, reinforcement.rewards,
                           group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
                           temperature=rl.temperature, top_p=rl.top_p, generator=generator,
                           stop_ids=reinforcement.stop_ids)
    tied = report["tied_share"]["value"]
    if tied > rl.max_tied_share:
        raise TrainingError(
            f"nothing to learn from: in the pre-flight {tied:.0%} of {report['prompts']} groups "
            f"of {rl.group_size} answers got the same reward for every answer (pass@1 "
            f"{report['pass_at_1']['value']:.2f}, pass@{rl.group_size} "
            f"{report['pass_at_group']['value']:.2f}); a tied group has no advantage to learn "
            "from", where="rl.max_tied_share",
            fix="start from an SFT run (train.init_from), add shots or a clearer prompt, raise "
            "rl.temperature or rl.group_size, or use a reward with partial credit")
    return report


def describe_preflight(report: dict) -> str:
    """One line for the console."""
    if not report:
        return "Pre-flight: no prompts."
    group, mean = report["group_size"], report["mean_reward"]
    return (f"Pre-flight on {report['prompts']} prompts × {group} answers: pass@1 "
            f"{_interval(report['pass_at_1'])}, pass@{group} "
            f"{_interval(report['pass_at_group'])}, tied groups "
            f"{_interval(report['tied_share'])}, mean reward "
            f"{'n/a' if mean is None else round(mean, 3)}")


def _interval(metric: dict) -> str:
    low, high = metric.get("ci") or (None, None)
    if low is None:
        return f"{metric['value']:.2f}"
    return f"{metric['value']:.2f} [{low:.2f}, {high:.2f}]"

