"""Token-budget batches, padding-free packed or padded.

Packed: the examples of a batch are concatenated into one row with no padding at all; position
ids restart at 0 for every example, which transformers turns into a block-diagonal causal mask
(no attention across examples), and the first token of each example carries no label, so no
example is predicted from the one before it. The loss of a packed batch equals the per-example
losses computed unpacked.

Padded (``packing: false``): rows padded on the right to the batch's longest example, with an
attention mask; rows per batch chosen so that rows × longest ≤ the token budget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass
class Batch:
    """Model inputs for one micro-batch and the counts the loop logs."""

    input_ids: torch.Tensor  # [rows, length]
    labels: torch.Tensor  # [rows, length], IGNORE_INDEX where no loss
    position_ids: torch.Tensor  # [rows, length]
    attention_mask: torch.Tensor | None  # None when packed: the position ids say it all
    n_examples: int
    n_tokens: int  # real (non-padding) tokens
    n_target_tokens: int  # tokens whose prediction carries loss

    @property
    def loss_units(self) -> int:
        """What the step's loss is the mean over: target tokens (a preference batch: pairs)."""
        return self.n_target_tokens

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.position_ids),
                     move(self.attention_mask), self.n_examples, self.n_tokens,
                     self.n_target_tokens)


def plan_batches(lengths: list[int], *, batch_tokens: int, packing: bool,
                 seed: int | None = None) -> list[list[int]]:
    """Group example indices into batches of at most ``batch_tokens`` tokens.

    With ``seed`` the order is shuffled (the same seed gives the same plan, which is what makes
    resuming exact); without it the order is kept (validation). An example longer than the budget
    gets a batch of its own.
    """
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0  # packed: tokens so far; padded: rows × longest so far
    longest = 0
    for index in order:
        length = lengths[index]
        if packing:
            cost = used + length
        else:
            cost = (len(current) + 1) * max(longest, length)
        if current and cost > batch_tokens:
            batches.append(current)
            current, used, longest = [], 0, 0
            cost = length
        current.append(index)
        used = cost
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def collate(examples: list[TokenizedExample], *, packing: bool, pad_id: int = 0) -> Batch:
    """Build the tensors of one batch from tokenized examples."""
    n_tokens = sum(len(ex.input_ids) for ex in examples)
    if packing:
        input_ids, labels, positions = [], [], []
        for ex in examples:
            input_ids += ex.input_ids
            # The first token of an example is never a target: its "previous token" belongs to
            # another example.
            labels += [IGNORE_INDEX] + ex.labels[1:]
            positions += range(len(ex.input_ids))
        ids = torch.tensor([input_ids])
        label_tensor = torch.tensor([labels])
        position_tensor = torch.tensor([positions])
        mask = None
    else:
        longest = max(len(ex.input_ids) for ex in examples)
        ids = torch.full((len(examples), longest), pad_id)
        label_tensor = torch.full((len(examples), longest), IGNORE_INDEX)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex.input_ids)
            ids[row, :n] = torch.tensor(ex.input_ids)
            label_tensor[row, :n] = torch.tensor(ex.labels)
            mask[row, :n] = 1
        position_tensor = torch.arange(longest).expand(len(examples), -1).clone()
    n_target = int((label_tensor[:, 1:] != IGNORE_INDEX).sum())
    return Batch(ids, label_tensor, position_tensor, mask, len(examples), n_tokens, n_target)
