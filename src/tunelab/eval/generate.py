"""Batched generation with the KV cache and left padding; greedy by default."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str] | list[list[int]], *,
                   max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 16, stop: list[str] | None = None,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """Complete each prompt; returns only the new text, cut at the first stop string.

    ``temperature`` 0 is greedy decoding; above 0 samples (seeded) with nucleus ``top_p``.
    Prompts are texts or token ids (``data.tokenize.eval_prompts``: the ids training used).
    ``progress(n)`` is called after each batch with the number of prompts it completed.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the new tokens of every row start at the same column
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            encoded = _left_padded(chunk, tokenizer, device)
            sampling = temperature > 0
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=sampling,
                temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                top_k=None, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                # stop as soon as every row has written a stop string: a model that has not
                # learned EOS yet otherwise runs to max_new_tokens on every batch
                stop_strings=stop or None, tokenizer=tokenizer if stop else None,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs += [_cut(text, stop) for text in
                        tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = side
        torch.set_rng_state(generator_state)
        model.train(was_training)
    return outputs


def _left_padded(prompts: list[str] | list[list[int]], tokenizer, device) -> dict:
    """A batch of prompts as left-padded ids and attention mask."""
    if prompts and isinstance(prompts[0], str):
        return dict(tokenizer([encode_ready(p, tokenizer) for p in prompts], return_tensors="pt",
                              padding=True, add_special_tokens=False).to(device))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(ids) for ids in prompts)
    ids = [[pad] * (width - len(row)) + list(row) for row in prompts]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in prompts]
    return {"input_ids": torch.tensor(ids, device=device),
            "attention_mask": torch.tensor(mask, device=device)}


def encode_ready(prompt: str, tokenizer) -> str:
    """The prompt with the BOS token prepended when the tokenizer's models expect one."""
    bos = tokenizer.bos_token
    if bos and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        return prompt if prompt.startswith(bos) else bos + prompt
    return prompt


def _cut(text: str, stop: list[str] | None) -> str:
    for marker in stop or []:
        index = text.find(marker)
        if index >= 0:
            text = text[:index]
    return text


@torch.no_grad()
def score_continuations(model: nn.Module, tokenizer, prompts: list[str] | list[list[int]],
                        options: list[str], *, batch_tokens: int = 4096, add_eos: bool = True,
                        progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Log-likelihood of each option after each prompt: a ``[prompts, options]`` tensor.

    Each prompt is computed once: its row holds the prompt followed by every option, each
    option attending to the prompt and to itself only (a tree mask, through the per-example
    attention of model/varlen.py), and rows are packed without padding. The option's tokens
    (and EOS, which stops a label that is a prefix of another from winning) are summed. Prompt
    and option are tokenized separately, as in training. ``progress(n)``: after each packed
    batch, with the number of prompts it scored.
    """
    from tunelab.data.packing import plan_batches
    from tunelab.model import varlen
    from tunelab.model.adapters import model_parts

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = ([list(ids) for ids in prompts] if prompts and not isinstance(prompts[0], str)
                  else tokenizer([encode_ready(p, tokenizer) for p in prompts],
                                 add_special_tokens=False)["input_ids"])
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    option_ids = [ids + eos for ids in tokenizer(options, add_special_tokens=False)["input_ids"]]
    row_length = lambda ids: len(ids) + sum(len(o) for o in option_ids)  # noqa: E731
    body, output_layer, softcap = model_parts(model)
    previous = getattr(model.config, "_attn_implementation", None)
    switched = varlen.enable(model)
    scores = torch.empty(len(prompts), len(options))
    try:
        for indices in plan_batches([row_length(prompt_ids[i]) for i in range(len(prompts))],
                                    batch_tokens=batch_tokens, packing=True):
            rows = [_tree_row(prompt_ids[i], option_ids) for i in indices]
            ids = torch.tensor([[t for row in rows for t in row["ids"]]], device=device)
            positions = torch.tensor([[p for row in rows for p in row["positions"]]],
                                     device=device)
            bounds = torch.tensor([0] + list(itertools.accumulate(len(r["ids"]) for r in rows)),
                                  device=device, dtype=torch.int32)
            hidden = body(input_ids=ids, position_ids=positions, use_cache=False,
                          cu_seq_lens_q=bounds,
                          segment_masks=[row["mask"].to(device) for row in rows],
                          segment_positions=[torch.tensor(row["positions"], device=device)
                                             for row in rows]).last_hidden_state[0]
            offsets = bounds[:-1].tolist()
            sources = torch.tensor([offsets[r] + s for r, row in enumerate(rows)
                                    for s in row["sources"]], device=device)
            targets = torch.tensor([t for row in rows for t in row["targets"]], device=device)
            logits = output_layer(hidden[sources]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            token_logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            owners = torch.tensor([r * len(options) + j for r, row in enumerate(rows)
                                   for j in row["owners"]], device=device)
            sums = torch.zeros(len(rows) * len(options), device=device).index_add_(
                0, owners, token_logp)
            scores[indices] = sums.view(len(rows), len(options)).cpu()
            if progress is not None:
                progress(len(indices))
    finally:
        if switched:
            model.set_attn_implementation(previous)
        model.train(was_training)
    return scores


def _tree_row(prompt: list[int], options: list[list[int]]) -> dict:
    """One prompt and all its options in one row, with the mask and the scored positions."""
    length = len(prompt) + sum(len(o) for o in options)
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:len(prompt), :len(prompt)] = torch.ones(len(prompt), len(prompt)).tril().bool()
    ids, positions = list(prompt), list(range(len(prompt)))
    sources, targets, owners = [], [], []
    for number, option in enumerate(options):
        start = len(ids)
        mask[start:start + len(option), :len(prompt)] = True
        mask[start:start + len(option), start:start + len(option)] = torch.ones(
            len(option), len(option)).tril().bool()
        # Option token k is predicted from the prompt's last token (k = 0) or option token k-1.
        sources += [len(prompt) - 1] + list(range(start, start + len(option) - 1))
        targets += option
        owners += [number] * len(option)
        ids += option
        positions += range(len(prompt), len(prompt) + len(option))
    return {"ids": ids, "positions": positions, "mask": mask, "sources": sources,
            "targets": targets, "owners": owners}
