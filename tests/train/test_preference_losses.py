"""Preference objectives: answers' log-probs as the full logits give them, TRL's losses, the
reference with the adapter off, precomputed references, and runs from the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.model import varlen
from tunelab.model.adapters import apply_method
from tunelab.model.load import load_model
from tunelab.objectives import OBJECTIVES
from tunelab.train import preference
from tunelab.train.preference import PreferenceLoss, PreferenceSettings


@dataclass
class Pair:  # the shape of data.preference.TokenizedPair that the objective reads
    chosen: TokenizedExample
    rejected: TokenizedExample | None
    desirable: bool | None = None
    source: str = "pairs.jsonl"
    line: int = 1

    @property
    def length(self) -> int:
        return len(self.chosen.input_ids) + (len(self.rejected.input_ids) if self.rejected
                                             else 0)


def example(prompt: list[int], answer: list[int]) -> TokenizedExample:
    return TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer, "p", 1)


def make_pairs(seed: int = 0, n: int = 3, paired: bool = True) -> list[Pair]:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda k: torch.randint(5, 400, (k,), generator=generator).tolist()  # noqa: E731
    pairs = []
    for index in range(n):
        prompt = draw(4 + index)
        if paired:
            pairs.append(Pair(example(prompt, draw(3 + index)),
                              example(prompt, draw(2 + 2 * index))))
        else:
            pairs.append(Pair(example(prompt, draw(3 + index)), None, desirable=index % 2 == 0))
    return pairs


def full_logps(model, sequence: TokenizedExample) -> float:
    """The answer's summed log-probability from the model's own forward pass, full logits."""
    ids = torch.tensor([sequence.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].float()
    labels = torch.tensor(sequence.labels[1:])
    keep = labels != IGNORE_INDEX
    return float(-F.cross_entropy(logits[keep], labels[keep], reduction="sum"))


@pytest.fixture
def lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, dtype="float32", device="cpu")
    varlen.enable(model)
    model = apply_method(model, kind="lora", r=4, alpha=8, dropout=0.0, targets="all-linear",
                         rslora=False)
    # a trained-looking adapter: B = 0 at initialisation would make policy == reference
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("packing", [True, False])
def test_sequence_logps_equal_full_logits(lora_model, packing):
    pairs = make_pairs()
    batch = preference.collate_pairs(pairs, packing=packing, pad_id=0)
    sums, counts = preference.sequence_logps(lora_model, batch, chunk_tokens=5)
    expected = [full_logps(lora_model, s) for s in preference.pair_sequences(pairs)]
    assert sums.tolist() == pytest.approx(expected, abs=1e-4)
    assert counts.tolist() == [sum(label != IGNORE_INDEX for label in s.labels[1:])
                               for s in preference.pair_sequences(pairs)]


def test_dpo_loss_is_trl_sigmoid_loss_against_the_adapter_disabled_base(lora_model):
    pairs = make_pairs()
    settings = PreferenceSettings("dpo", beta=0.1)
    batch = preference.collate_pairs(pairs, packing=True, pad_id=0)
    loss, stats = PreferenceLoss(lora_model, settings, chunk_tokens=64)(batch)
    expected, margins = 0.0, []
    for pair in pairs:
        policy = [full_logps(lora_model, pair.chosen), full_logps(lora_model, pair.rejected)]
        with lora_model.disable_adapter():
            reference = [full_logps(lora_model, pair.chosen),
                         full_logps(lora_model, pair.rejected)]
        logits = (policy[0] - reference[0]) - (policy[1] - reference[1])
        expected += -math.log(1 / (1 + math.exp(-0.1 * logits)))
        margins.append(0.1 * logits)
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(stats["margin"]) == pytest.approx(sum(margins), abs=1e-4)
    assert float(stats["reward_accuracy"]) == sum(m > 0 for m in margins)
    loss.backward()
    grads = [p.grad for n, p in lora_model.named_parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_dpo_at_initialisation_is_log_two(tiny_model_dir):
    model = apply_method(load_model(tiny_model_dir, dtype="float32", device="cpu"), kind="lora",
                         r=4, alpha=8, dropout=0.0, targets="all-linear", rslora=False)
    pairs = make_pairs()
    loss, _ = PreferenceLoss(model, PreferenceSettings("dpo", beta=0.1), chunk_tokens=64)(
        preference.collate_pairs(pairs, packing=True, pad_id=0))
    assert float(loss) / len(pairs) == pytest.approx(math.log(2), abs=1e-6)


def test_simpo_loss_uses_mean_logps_and_no_reference(lora_model):
    pairs = make_pairs()
    settings = PreferenceSettings("simpo", beta=2.0, simpo_gamma=0.5)
    loss, _ = PreferenceLoss(lora_model, settings, chunk_tokens=64)(
        preference.collate_pairs(pairs, packing=True, pad_id=0))
    expected = 0.0
    for pair in pairs:
        means = [full_logps(lora_model, s) / (len(s.input_ids) - s.n_prompt_tokens)
                 for s in (pair.chosen, pair.rejected)]
        expected += -F.logsigmoid(torch.tensor(2.0 * (means[0] - means[1]) - 0.5)).item()
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_kto_loss_with_its_mismatched_kl_baseline(lora_model):
    pairs = make_pairs(paired=False, n=4)
    mismatched = preference.mismatched_sequences(pairs)
    # answer i after the prompt of answer i + 1
    assert mismatched[0].input_ids[:pairs[1].chosen.n_prompt_tokens] == \
        pairs[1].chosen.input_ids[:pairs[1].chosen.n_prompt_tokens]
    settings = PreferenceSettings("kto", beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    batch = preference.collate_pairs(pairs, packing=True, pad_id=0, mismatched=mismatched)
    loss, stats = PreferenceLoss(lora_model, settings, chunk_tokens=64)(batch)

    def ratio(sequence):
        policy = full_logps(lora_model, sequence)
        with lora_model.disable_adapter():
            return policy - full_logps(lora_model, sequence)

    kl = max(0.0, sum(ratio(s) for s in mismatched) / len(mismatched))
    expected = 0.0
    for pair in pairs:
        r = ratio(pair.chosen)
        if pair.desirable:
            expected += 1 - 1 / (1 + math.exp(-0.1 * (r - kl)))
        else:
            expected += 2.0 * (1 - 1 / (1 + math.exp(-0.1 * (kl - r))))
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(stats["kl"]) == pytest.approx(kl * len(pairs), abs=1e-5)


def test_precomputed_reference_equals_the_live_one(tiny_model_dir):
    """Full fine-tuning's references, computed once before training, are what the starting
    model gives inside any micro-batch."""
    model = load_model(tiny_model_dir, dtype="float32", device="cpu")
    varlen.enable(model)
    pairs = make_pairs(n=5)
    references = preference.reference_logps(model, pairs, None, packing=True, pad_id=0,
                                            batch_tokens=40, chunk_tokens=16,
                                            device=torch.device("cpu"))
    picked = preference.batch_reference(references, [3, 1], OBJECTIVES["dpo"])
    expected = [full_logps(model, s) for s in preference.pair_sequences([pairs[3], pairs[1]])]
    assert picked.tolist() == pytest.approx(expected, abs=1e-4)


def test_padding_pair_batch_counts_for_nothing(lora_model):
    pairs = make_pairs()
    batches = preference.collate_pair_share(pairs, [[0, 1], []], packing=True, pad_id=0,
                                            mismatched=None, references=None,
                                            objective=OBJECTIVES["dpo"])
    assert [b.loss_units for b in batches] == [2, 0]
    loss, stats = PreferenceLoss(lora_model, PreferenceSettings("dpo", 0.1), chunk_tokens=64)(
        batches[1])
    assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values())

