"""Chunked and packed losses equal the plain path: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.packing import collate, plan_batches
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.model import varlen
from tunelab.model.adapters import apply_method
from tunelab.model.load import load_model
from tunelab.train.loss import batch_loss_sum, chunked_loss


def examples(vocab: int) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length, prompt in [(9, 4), (5, 2), (13, 7), (6, 3)]:
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(TokenizedExample(ids, labels, "data.jsonl", len(out) + 1))
    return out


def reference_loss(model, example: TokenizedExample) -> torch.Tensor:
    """Summed loss of one example, computed unpacked through the model's own logits."""
    logits = model(input_ids=torch.tensor([example.input_ids])).logits
    return F.cross_entropy(logits[0, :-1].float(), torch.tensor(example.labels[1:]),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def lora_model(path: str, per_example_attention: bool = False):
    torch.manual_seed(0)
    base = load_model(path, device="cpu")
    if per_example_attention:
        assert varlen.enable(base)
    model = apply_method(base, kind="lora", r=4, alpha=8, dropout=0.0,
                         targets="all-linear", rslora=False)
    # LoRA B starts at zero; give it values so gradients through A are not trivially zero.
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def grads(model) -> dict[str, torch.Tensor]:
    found = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return found


def assert_close_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        # Relative to the tensor's norm: float32 summation order differs between the paths, so a
        # single near-zero element can differ by more than 1e-5 of itself.
        error = float((a[name] - b[name]).norm() / b[name].norm())
        assert error <= 1e-5, f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("trainable_head", [True, False])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_loss_equals_full_logits_cross_entropy(trainable_head, softcap):
    torch.manual_seed(0)
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(trainable_head)
    labels = torch.randint(0, 50, (2, 12))
    labels[0, :5] = IGNORE_INDEX
    logits = head(hidden)[:, :-1].reshape(-1, 50)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    plain = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    (plain / 7).backward()  # an upstream gradient other than 1 (the loop divides the sum)
    expected_hidden = hidden.grad.clone()
    expected_head = head.weight.grad.clone() if trainable_head else None
    hidden.grad, head.weight.grad = None, None
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    chunked = chunked_loss(hidden, labels, head, chunk_tokens=4, softcap=softcap)
    # 18 targets, 5 chunks: a frozen head's logits are computed once per chunk (the gradient in
    # the forward pass); a trainable head's are recomputed in the backward pass.
    assert len(calls) == 5
    (chunked / 7).backward()
    assert len(calls) == (10 if trainable_head else 5)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    torch.testing.assert_close(hidden.grad, expected_hidden, rtol=1e-5, atol=1e-7)
    if trainable_head:
        torch.testing.assert_close(head.weight.grad, expected_head, rtol=1e-5, atol=1e-7)
    else:
        assert head.weight.grad is None


def test_chunked_loss_without_gradients_keeps_nothing_for_backward():
    hidden = torch.randn(1, 12, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    labels = torch.randint(0, 50, (1, 12))
    with torch.no_grad():
        loss = chunked_loss(hidden, labels, head, chunk_tokens=4)
    assert loss.grad_fn is None and loss.item() > 0


@pytest.mark.parametrize("per_example_attention", [False, True])
def test_packed_loss_and_gradients_equal_unpacked(tiny_model_dir, per_example_attention):
    model = lora_model(tiny_model_dir, per_example_attention)
    data = examples(model.config.vocab_size)
    reference = sum(reference_loss(model, ex) for ex in data)
    reference.backward()
    expected = grads(model)

    packed = collate(data, packing=True)
    assert packed.input_ids.shape == (1, sum(len(ex.input_ids) for ex in data))  # no padding
    assert packed.position_ids[0, :9].tolist() == list(range(9))
    assert packed.position_ids[0, 9:14].tolist() == list(range(5))
    loss = batch_loss_sum(model, packed, chunk_tokens=8)
    loss.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=0)
    assert_close_grads(grads(model), expected)
    assert packed.n_target_tokens == sum(ex.n_target_tokens for ex in data)


def test_padded_batch_loss_equals_unpacked(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    data = examples(model.config.vocab_size)
    reference = sum(reference_loss(model, ex) for ex in data).detach()
    padded = collate(data, packing=False, pad_id=0)
    assert padded.attention_mask is not None and padded.input_ids.shape == (4, 13)
    torch.testing.assert_close(batch_loss_sum(model, padded).detach(), reference, rtol=1e-5,
                               atol=0)


def test_token_budget_batches():
    lengths = [100, 30, 60, 10, 90, 50]
    packed = plan_batches(lengths, batch_tokens=128, packing=True)
    assert all(sum(lengths[i] for i in b) <= 128 for b in packed)
    assert sorted(i for b in packed for i in b) == list(range(6))
    padded = plan_batches(lengths, batch_tokens=128, packing=False)
    assert all(len(b) * max(lengths[i] for i in b) <= 128 or len(b) == 1 for b in padded)
    shuffled = plan_batches(lengths, batch_tokens=128, packing=True, seed=3)
    assert shuffled == plan_batches(lengths, batch_tokens=128, packing=True, seed=3)
    assert [i for b in shuffled for i in b] != list(range(6))
