"""Batched generation with the KV cache and left padding; greedy by default."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str], *, max_new_tokens: int = 64,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                   batch_size: int = 16, stop: list[str] | None = None) -> list[str]:
    """Complete each prompt; returns only the new text, cut at the first stop string.

    ``temperature`` 0 is greedy decoding; above 0 samples (seeded) with nucleus ``top_p``.
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
            encoded = tokenizer([encode_ready(p, tokenizer) for p in chunk], return_tensors="pt",
                                padding=True, add_special_tokens=False).to(device)
            sampling = temperature > 0
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=sampling,
                temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                top_k=None, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = generated[:, encoded["input_ids"].shape[1]:]
            outputs += [_cut(text, stop) for text in
                        tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        torch.set_rng_state(generator_state)
        model.train(was_training)
    return outputs


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
