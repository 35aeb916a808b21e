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


@torch.no_grad()
def score_continuations(model: nn.Module, tokenizer, prompts: list[str], options: list[str], *,
                        batch_tokens: int = 4096, add_eos: bool = True) -> torch.Tensor:
    """Log-likelihood of each option after each prompt: a ``[prompts, options]`` tensor.

    Every (prompt, option) pair is one example of a padding-free packed batch, so no compute goes
    to padding; the option's tokens (and EOS, which stops a label that is a prefix of another
    from winning) are summed. Prompt and option are tokenized separately, as in training.
    """
    from tunelab.data.packing import collate, plan_batches
    from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
    from tunelab.train.loss import hidden_states, model_parts

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = tokenizer([encode_ready(p, tokenizer) for p in prompts],
                           add_special_tokens=False)["input_ids"]
    option_ids = tokenizer(options, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    pairs = [TokenizedExample(p + o + eos, [IGNORE_INDEX] * len(p) + o + eos, "", 0)
             for p in prompt_ids for o in option_ids]
    _, output_layer, softcap = model_parts(model)
    scores = torch.empty(len(pairs))
    for indices in plan_batches([len(p.input_ids) for p in pairs], batch_tokens=batch_tokens,
                                packing=True):
        batch = collate([pairs[i] for i in indices], packing=True).to(device)
        hidden = hidden_states(model, batch)[0, :-1]
        targets = batch.labels[0, 1:]
        selected = targets != IGNORE_INDEX
        logits = output_layer(hidden[selected]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        token_logp = torch.log_softmax(logits, -1).gather(1, targets[selected, None])[:, 0]
        lengths = torch.tensor([len(pairs[i].input_ids) for i in indices], device=device)
        owner = torch.repeat_interleave(torch.arange(len(indices), device=device), lengths)[1:]
        sums = torch.zeros(len(indices), device=device).index_add_(0, owner[selected],
                                                                    token_logp)
        scores[indices] = sums.cpu()
    model.train(was_training)
    return scores.view(len(prompts), len(options))
