"""What to change when a run will not fit, each change with its predicted peak; waste."""

from __future__ import annotations

from tunelab.config import Config
from tunelab.model.adapters import METHODS
from tunelab.planner.memory import gib, predict_memory
from tunelab.planner.setting import Setting, replace_setting
from tunelab.planner.shape import ModelShape
from tunelab.planner.workload import DataLayout, TokenCounts, micro_batches


def advise(memory: dict, budget: int, shape: ModelShape, counts: TokenCounts, setting: Setting,
           config: Config, layout: DataLayout) -> list[str]:
    """What to change when the run will not fit in ``budget`` bytes (each with its predicted
    effect), and waste; ``memory`` is the prediction (``memory.predict_memory``)."""
    peak = memory["predicted_peak_bytes"]
    advice = []
    if peak > budget:
        advice.append(f"The predicted peak ({gib(peak)}) exceeds the memory budget "
                      f"({gib(budget)}).")
        alternatives = []
        if not METHODS[setting.kind].adapter:
            alternatives.append(("method.kind: lora (gradients and AdamW state only for the "
                                 "adapter)", replace_setting(setting, kind="lora"), config))
        if not setting.checkpointing:
            alternatives.append(("train.memory: low (activation checkpointing: one hidden "
                                 "state kept per layer, ~40% slower)",
                                 replace_setting(setting, checkpointing=True), config))
        chunk = min(setting.chunk_tokens, 256)
        if chunk < setting.chunk_tokens:
            alternatives.append((f"train.loss_chunk_tokens: {chunk}",
                                 replace_setting(setting, chunk_tokens=chunk), config))
        for text, alternative, alt_config in alternatives:
            batches = micro_batches(counts, alt_config)
            new_peak = predict_memory(shape, batches, alternative, layout)["predicted_peak_bytes"]
            advice.append(f"{text}: peak {gib(new_peak)}"
                          + (" — fits" if new_peak <= budget else ""))
        advice += _smaller_batch_advice(shape, counts, setting, config, layout, budget)
        if setting.device == "cuda":
            quantised = shape.params * 0.56
            advice.append(f"a 4-bit (NF4) quantised base model on the GPU (QLoRA) would hold "
                          f"the weights in ~{gib(quantised)} instead of "
                          f"{gib(memory['breakdown_bytes']['weights'])}")
    elif peak > 0.9 * budget:
        advice.append(f"The predicted peak ({gib(peak)}) is within 10% of the memory budget "
                      f"({gib(budget)}); other processes may push it over.")
    if layout.processed_tokens > 1.1 * layout.run_tokens:
        waste = 1 - layout.run_tokens / layout.processed_tokens
        advice.append(f"{waste:.0%} of the positions are padding: train.packing: true removes "
                      "them.")
    return advice


def _smaller_batch_advice(shape: ModelShape, counts: TokenCounts, setting: Setting,
                          config: Config, layout: DataLayout, budget: int) -> list[str]:
    """Halve ``train.batch_tokens`` (doubling ``grad_accum``) until the peak fits, if it can."""
    batch_tokens = config.train.batch_tokens
    floor = config.train.max_seq_len if not config.train.packing else 256
    while batch_tokens // 2 >= floor:
        batch_tokens //= 2
        smaller = config.model_copy(update={"train": config.train.model_copy(
            update={"batch_tokens": batch_tokens,
                    "grad_accum": config.train.grad_accum * config.train.batch_tokens
                    // batch_tokens})})
        peak = predict_memory(shape, micro_batches(counts, smaller), setting,
                              layout)["predicted_peak_bytes"]
        if peak <= budget:
            return [f"train.batch_tokens: {batch_tokens} with train.grad_accum: "
                    f"{smaller.train.grad_accum} (same tokens per step): peak {gib(peak)} — fits"]
    return []
