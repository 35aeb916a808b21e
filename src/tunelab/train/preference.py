"""Preference objectives (DPO, SimPO, KTO): answers' log-probabilities, compared, as a loss.

A micro-batch of preference pairs is collated like any batch (packed without padding, or padded):
each pair's chosen and rejected answers are two sequences of it, and each sequence's summed
log-probability of its answer tokens comes from one forward pass (``sequence_logps``: the output
layer applied a chunk of answer tokens at a time, recomputed in the backward pass, so the full
logits never exist). The reference model's log-probabilities come from the same model with the
adapter switched off (no second copy), or, for full fine-tuning, from a pass over the data
before training (``reference_logps``), kept per pair.

The losses follow TRL's definitions (``DPOTrainer`` with its sigmoid loss, ``CPOTrainer`` with
``loss_type="simpo"``, ``KTOTrainer``), so a run can be checked against TRL's numbers
(``benchmarks/preference_vs_trl.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.packing import Batch, collate, plan_batches
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.objectives import Objective
from tunelab.train.loss import target_logps

# What a preference step logs (each summed over the step's pairs, then divided by their count).
STAT_NAMES = ("reward_accuracy", "margin", "chosen_logp", "rejected_logp", "chosen_reward",
              "rejected_reward")


@dataclass
class PairBatch(Batch):
    """A micro-batch of preference pairs (or KTO's unpaired answers) as sequences of one batch.

    Sequences are ordered chosen₀, rejected₀, chosen₁, rejected₁, … for pairs; answer₀, answer₁,
    … for unpaired data, followed by KTO's mismatched sequences (answer i after prompt i − 1),
    whose log-ratio estimates the KL term.
    """

    n_pairs: int = 0
    paired: bool = True
    desirable: torch.Tensor | None = None  # [n_pairs] bool, unpaired data
    reference: torch.Tensor | None = None  # [sequences] precomputed reference log-probs
    n_mismatched: int = 0  # KTO: trailing sequences that only estimate the KL term

    @property
    def loss_units(self) -> int:
        return self.n_pairs

    def to(self, device: torch.device) -> PairBatch:
        moved = super().to(device)
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(**{**vars(moved), "n_pairs": self.n_pairs, "paired": self.paired,
                            "desirable": move(self.desirable), "reference": move(self.reference),
                            "n_mismatched": self.n_mismatched})


def pair_sequences(pairs: list, mismatched: list[TokenizedExample] | None = None
                   ) -> list[TokenizedExample]:
    """The sequences of ``pairs`` in ``PairBatch``'s order (then KTO's ``mismatched`` ones)."""
    if pairs and pairs[0].rejected is not None:
        return [example for pair in pairs for example in (pair.chosen, pair.rejected)]
    return [pair.chosen for pair in pairs] + list(mismatched or [])


def mismatched_sequences(pairs: list) -> list[TokenizedExample]:
    """KTO's KL sequences, fixed for the run: answer i after the prompt of answer i + 1 (the
    last after the first's), whose log-ratio estimates the policy's KL from the reference."""
    answers = [pair.chosen for pair in pairs]
    return [_after_prompt_of(answers[(index + 1) % len(answers)], answer)
            for index, answer in enumerate(answers)]


def _after_prompt_of(prompt_from: TokenizedExample, answer_from: TokenizedExample
                     ) -> TokenizedExample:
    """``answer_from``'s answer after ``prompt_from``'s prompt (KTO's mismatched pair)."""
    cut_prompt, cut_answer = prompt_from.n_prompt_tokens, answer_from.n_prompt_tokens
    ids = prompt_from.input_ids[:cut_prompt] + answer_from.input_ids[cut_answer:]
    labels = [IGNORE_INDEX] * cut_prompt + answer_from.labels[cut_answer:]
    return TokenizedExample(ids, labels, answer_from.source, answer_from.line)


def collate_pairs(pairs: list, *, packing: bool, pad_id: int,
                  mismatched: list[TokenizedExample] | None = None,
                  reference: torch.Tensor | None = None) -> PairBatch:
    """One micro-batch of ``pairs`` (``data.preference.TokenizedPair``); ``mismatched``: KTO's
    KL sequences of these pairs; ``reference``: their precomputed reference log-probs, in
    ``PairBatch`` order."""
    sequences = pair_sequences(pairs, mismatched)
    batch = collate(sequences, packing=packing, pad_id=pad_id)
    paired = pairs[0].rejected is not None
    desirable = None if paired else torch.tensor([bool(pair.desirable) for pair in pairs])
    return PairBatch(**vars(batch), n_pairs=len(pairs), paired=paired, desirable=desirable,
                     reference=reference, n_mismatched=len(mismatched or []))


def sequence_logps(model: nn.Module, batch: Batch, *, chunk_tokens: int = 512
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's target tokens, their count), per sequence
    (``loss.target_logps``: chunked, no full logits kept)."""
    token_logps, owners, _ = target_logps(model, batch, chunk_tokens=chunk_tokens)
    n_sequences = int((batch.position_ids == 0).sum())
    sums = token_logps.new_zeros(n_sequences).index_add(0, owners, token_logps)
    counts = torch.zeros(n_sequences, device=sums.device).index_add(
        0, owners, torch.ones_like(token_logps))
    return sums, counts


@contextmanager
def reference_model(model: nn.Module):
    """The reference model: ``model`` with its adapter switched off (peft), under no_grad."""
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), disabled:
        yield model


@dataclass(frozen=True)
class PreferenceSettings:
    """The objective's constants (``method.*``)."""

    objective: str  # dpo | simpo | kto
    beta: float
    sft_weight: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


def pair_losses(policy: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None,
                batch: PairBatch, settings: PreferenceSettings
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(each pair's loss, the step's stats summed over pairs) from the sequences' log-probs."""
    if settings.objective == "kto":
        return _kto_losses(policy, counts, reference, batch, settings)
    chosen, rejected = policy[0::2], policy[1::2]
    if settings.objective == "simpo":
        chosen_score = chosen / counts[0::2].clamp(min=1)
        rejected_score = rejected / counts[1::2].clamp(min=1)
        rewards = (settings.beta * chosen_score, settings.beta * rejected_score)
        losses = -F.logsigmoid(rewards[0] - rewards[1] - settings.simpo_gamma)
    else:  # dpo, TRL's sigmoid loss
        rewards = (settings.beta * (chosen - reference[0::2]),
                   settings.beta * (rejected - reference[1::2]))
        losses = -F.logsigmoid(rewards[0] - rewards[1])
    if settings.sft_weight:
        losses = losses - settings.sft_weight * chosen / counts[0::2].clamp(min=1)
    margin = (rewards[0] - rewards[1]).detach()
    return losses, {"reward_accuracy": (margin > 0).float().sum(), "margin": margin.sum(),
                    "chosen_logp": chosen.detach().sum(), "rejected_logp": rejected.detach().sum(),
                    "chosen_reward": rewards[0].detach().sum(),
                    "rejected_reward": rewards[1].detach().sum()}


def _kto_losses(policy, counts, reference, batch: PairBatch, settings: PreferenceSettings):
    """KTO (TRL's ``KTOTrainer``): each answer's log-ratio against a KL baseline estimated from
    the mismatched sequences (detached, clipped at 0)."""
    n = batch.n_pairs
    ratio = policy[:n] - reference[:n]
    if batch.n_mismatched:
        kl = (policy[n:] - reference[n:]).detach().mean().clamp(min=0)
    else:
        kl = ratio.new_zeros(())
    desirable = batch.desirable
    rewards = settings.beta * ratio
    good_loss = settings.desirable_weight * (1 - torch.sigmoid(settings.beta * (ratio - kl)))
    bad_loss = settings.undesirable_weight * (1 - torch.sigmoid(settings.beta * (kl - ratio)))
    losses = torch.where(desirable, good_loss, bad_loss)
    if settings.sft_weight:
        nll = policy[:n] / counts[:n].clamp(min=1)
        losses = losses - settings.sft_weight * torch.where(desirable, nll, torch.zeros_like(nll))
    detached = rewards.detach()
    good, bad = desirable.float(), (~desirable).float()
    # unpaired: "accuracy" is the share of answers on the side of 0 their label asks for
    correct = torch.where(desirable, detached > 0, detached < 0).float()
    return losses, {"reward_accuracy": correct.sum(), "margin": (detached * (2 * good - 1)).sum(),
                    "chosen_logp": (policy[:n].detach() * good).sum(),
                    "rejected_logp": (policy[:n].detach() * bad).sum(),
                    "chosen_reward": (detached * good).sum(),
                    "rejected_reward": (detached * bad).sum(), "kl": kl * n}


class PreferenceLoss(nn.Module):
    """The model and its summed preference loss over a ``PairBatch``, as one module (what DDP and
    FSDP wrap, like ``distributed.StepLoss``): ``(loss summed over pairs, stats)``."""

    def __init__(self, model: nn.Module, settings: PreferenceSettings, *, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.settings = settings
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: PairBatch, per_pair: bool = False):
        """(the batch's summed loss, its summed statistics); ``per_pair`` (validation): (each
        pair's loss, each pair's reward margin, the statistics)."""
        policy, counts = sequence_logps(self.model, batch, chunk_tokens=self.chunk_tokens)
        reference = batch.reference
        if reference is None and self.settings.objective != "simpo":
            with reference_model(self.model):
                reference, _ = sequence_logps(self.model, batch, chunk_tokens=self.chunk_tokens)
        losses, stats = pair_losses(policy, counts, reference, batch, self.settings)
        if per_pair:
            return (losses.detach(), pair_margins(policy, counts, reference, batch,
                                                  self.settings), stats)
        if batch.n_tokens == 0:  # a padding batch of an uneven rank (distributed.collate_share)
            return losses.sum() * 0.0, {name: value * 0.0 for name, value in stats.items()}
        return losses.sum(), stats


def pair_margins(policy: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None,
                 batch: PairBatch, settings: PreferenceSettings) -> torch.Tensor:
    """Each pair's reward margin (chosen − rejected implicit reward; KTO: the answer's reward,
    signed by its label): > 0 is a pair the model orders as the data does."""
    n = batch.n_pairs
    if not batch.paired:
        rewards = settings.beta * (policy[:n] - reference[:n])
        return (torch.where(batch.desirable, rewards, -rewards)).detach()
    if settings.objective == "simpo":  # of mean log-probs per answer token
        mean = policy / counts.clamp(min=1)
        return (settings.beta * (mean[0::2] - mean[1::2])).detach()
    return (settings.beta * ((policy[0::2] - reference[0::2])
                             - (policy[1::2] - reference[1::2]))).detach()


def settings_of(method) -> PreferenceSettings:
    """The preference constants of a config's ``method`` section."""
    return PreferenceSettings(method.objective, method.beta, method.sft_weight,
                              method.simpo_gamma, method.desirable_weight,
                              method.undesirable_weight)


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list, mismatched: list[TokenizedExample] | None, *,
                    packing: bool, pad_id: int, batch_tokens: int, chunk_tokens: int,
                    device: torch.device) -> list[torch.Tensor]:
    """Each pair's reference log-probs (its sequences' in ``PairBatch`` order; KTO: its answer's
    and its mismatched sequence's) from ``model`` as it is now: computed once before a full
    fine-tuning run, whose model has no adapter to switch off."""
    was_training = model.training
    model.eval()
    result: list[torch.Tensor] = []
    for indices in plan_batches([pair.length for pair in pairs], batch_tokens=batch_tokens,
                                packing=packing):
        chunk = [pairs[i] for i in indices]
        extra = [mismatched[i] for i in indices] if mismatched else None
        batch = collate_pairs(chunk, packing=packing, pad_id=pad_id, mismatched=extra)
        logps, _ = sequence_logps(model, batch.to(device), chunk_tokens=chunk_tokens)
        logps = logps.float().cpu()
        for place in range(len(chunk)):
            if extra:
                result.append(torch.stack([logps[place], logps[len(chunk) + place]]))
            else:
                result.append(logps[2 * place:2 * place + 2])
    model.train(was_training)
    return result


def batch_reference(references: list[torch.Tensor] | None, indices: list[int],
                    objective: Objective) -> torch.Tensor | None:
    """The precomputed reference log-probs of the pairs at ``indices`` in ``PairBatch`` order."""
    if references is None:
        return None
    picked = [references[i] for i in indices]
    if objective.data == "unpaired":  # answers first, then the mismatched sequences
        return torch.cat([torch.stack([r[0] for r in picked]), torch.stack([r[1] for r in picked])])
    return torch.cat(picked)


def padding_pair_batch(batch: PairBatch) -> PairBatch:
    """``batch`` as a padding batch: its graph runs, nothing of it counts."""
    return replace(batch, n_tokens=0, n_target_tokens=0, n_pairs=0)


def collate_pair_share(pairs: list, micro_batches: list[list[int]], *, packing: bool,
                       pad_id: int, mismatched: list[TokenizedExample] | None,
                       references: list[torch.Tensor] | None,
                       objective: Objective) -> list[PairBatch]:
    """A rank's micro-batches of pairs (``distributed.collate_share`` for preference data): an
    empty one becomes a padding batch that runs the same graph and counts for nothing."""
    filler = next((batch[0] for batch in micro_batches if batch), 0)
    batches = []
    for indices in micro_batches:
        chosen = indices or [filler]
        batch = collate_pairs([pairs[i] for i in chosen], packing=packing, pad_id=pad_id,
                              mismatched=[mismatched[i] for i in chosen] if mismatched else None,
                              reference=batch_reference(references, chosen, objective))
        batches.append(batch if indices else padding_pair_batch(batch))
    return batches


@torch.no_grad()
def kl_to_reference(model: nn.Module, tokenizer, prompt_ids: list[list[int]], *,
                    max_new_tokens: int, seed: int, stop_ids: set[int] | None = None) -> dict:
    """KL(policy ‖ reference) on held-out prompts, estimated from one answer per prompt sampled
    from the policy (temperature 1): the mean over prompts of Σ (log π − log π_ref) over the
    answer's tokens, with its bootstrap interval. The reference is the adapter switched off."""
    from tunelab.eval.stats import metric_with_ci
    from tunelab.train.rollout import answer_logprobs, sample_answers

    if not prompt_ids:
        return {}
    rollouts = sample_answers(model, tokenizer, prompt_ids, group_size=1,
                              max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                              generator=torch.Generator().manual_seed(seed), stop_ids=stop_ids)
    was_training = model.training
    model.eval()
    with reference_model(model):
        reference = answer_logprobs(model, rollouts, temperature=1.0)
    model.train(was_training)
    per_prompt = [sum(r.logprobs) - float(ref.sum()) for r, ref in
                  zip(rollouts, reference, strict=True)]
    return metric_with_ci(per_prompt, seed=seed)


@torch.no_grad()
def validate_pairs(step_model: nn.Module, batches: Iterable[PairBatch], *, cluster,
                   device: torch.device) -> tuple[float, dict]:
    """(the objective's loss, mean over the held-out pairs; their statistics): ``val_reward_
    accuracy`` (the share ordered as the data orders them) with its bootstrap interval over
    pairs, ``val_margin``, the answers' log-probabilities and rewards; every rank's pairs
    (``cluster``: ``distributed.Cluster``) counted once."""
    from tunelab.eval.stats import bootstrap_ci
    from tunelab.train.step import autocast

    was_training = step_model.training
    step_model.eval()
    loss_sum, stat_sums, margins = 0.0, {}, []
    for batch in batches:
        with autocast(device):
            losses, pair_margins, stats = step_model(batch.to(device), per_pair=True)
        if batch.n_pairs:
            loss_sum += float(losses.sum())
            margins += pair_margins.float().cpu().tolist()
            for name, value in stats.items():
                stat_sums[name] = stat_sums.get(name, 0.0) + float(value)
    step_model.train(was_training)
    margins = cluster.gathered(margins)
    n_pairs = max(1, len(margins))
    low, high = bootstrap_ci([float(margin > 0) for margin in margins])
    stats = {f"val_{name}": round(cluster.total(value) / n_pairs, 6)
             for name, value in sorted(stat_sums.items())}
    stats["val_reward_accuracy_ci"] = [round(low, 4), round(high, 4)]
    stats["val_pairs"] = len(margins)
    return cluster.total(loss_sum) / n_pairs, stats
