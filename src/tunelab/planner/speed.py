"""Tokens/s and wall time: training FLOPs over the device's measured matmul FLOP/s.

Frozen weights cost forward + input gradient, trainable ones also their weight gradient; the
matmul benchmark's rate is scaled by the fraction of it a training step reaches
(``TRAINING_EFFICIENCY``), and the costs that are not matmuls are added per logit, layer,
example and step.
"""

from __future__ import annotations

import functools
import time

from tunelab.config import Config
from tunelab.model.adapters import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.planner.setting import Setting
from tunelab.planner.shape import ModelShape, adapter_params
from tunelab.planner.workload import DataLayout

# Fraction of the matmul benchmark's FLOP/s that a training step's FLOPs reach, and costs that
# are not matmuls: the log-softmax over the vocabulary per loss target (memory-bound), and per
# micro-batch, per layer, per example and per step overheads (Python, kernel launches,
# optimizer) that dominate small models. CPU: the median that benchmarks/training_efficiency.py
# fits on the examples' recorded runs (SmolLM2-135M LoRA under jemalloc; results/
# training-efficiency-cpu.json). CUDA: not fitted (one GPU run so far, a 0.9B model at 13% of
# the bf16 peak in benchmarks/results/throughput-gpu.json, with no prediction beside it).
TRAINING_EFFICIENCY = {"cpu": 0.68, "cuda": 0.45}
SECONDS_PER_LOGIT = {"cpu": 4e-9, "cuda": 2e-11}
SECONDS_PER_LAYER = {"cpu": 5e-3, "cuda": 5e-4}
SECONDS_PER_EXAMPLE_LAYER = {"cpu": 2e-4, "cuda": 5e-5}
SECONDS_PER_STEP = {"cpu": 6e-3, "cuda": 5e-3}
# Frozen weights: forward + input gradient. Trainable: + weight gradient.
FROZEN_PASSES, TRAINABLE_PASSES = 2, 3


def training_flops(shape: ModelShape, lengths: list[int], *, n_target_tokens: int, kind: str,
                   r: int, checkpointing: bool, targets: str | list[str] = "all-linear",
                   padded_length: int | None = None, chunk_tokens: int | None = None) -> float:
    """FLOPs of one forward + backward over examples of ``lengths`` (one micro-batch).

    Frozen weights cost 2 FLOPs per parameter and token forward and 2 more for the input gradient;
    trainable ones 2 more for their weight gradient. The output layer runs only at the
    ``n_target_tokens`` loss positions. Padded batches (``padded_length``) pay for padding.
    """
    positions = len(lengths) * padded_length if padded_length else sum(lengths)
    full = not METHODS[kind].adapter
    body = shape.num_layers * shape.active_layer_weights
    lora = adapter_params(shape, kind=kind, r=r, targets=targets)
    linear = 2 * positions * body * (TRAINABLE_PASSES if full else FROZEN_PASSES)
    linear += 2 * positions * lora * TRAINABLE_PASSES
    # causal attention: QKᵀ and AV, 2 FLOPs per multiply-add, Σ (p+1) keys per example;
    # the backward pass costs twice the forward.
    keys = sum((padded_length if padded_length else n) * ((padded_length or n) + 1) // 2
               for n in lengths)
    attention = 3 * 4 * shape.num_layers * shape.num_heads * shape.head_dim * keys
    head_trainable = full
    head_passes = TRAINABLE_PASSES if head_trainable else FROZEN_PASSES
    if head_trainable and chunk_tokens is not None and n_target_tokens > chunk_tokens:
        head_passes += 1  # each chunk's logits are recomputed in the backward pass
    head = 2 * n_target_tokens * shape.hidden_size * shape.vocab_size * head_passes
    recompute = 2 * positions * (body + lora) + attention / 3 if checkpointing else 0
    return float(linear + attention + head + recompute)


def reference_flops(shape: ModelShape, batches: list[dict], config: Config) -> float:
    """What a preference objective's reference model costs: a forward pass without gradients
    over every micro-batch (the adapter switched off), or, for full fine-tuning, one pass over
    the training data before the first step (the log-probabilities are kept)."""
    if not OBJECTIVES[config.method.objective].reference:
        return 0.0
    if METHODS[config.method.kind].adapter:
        counted = batches
    else:  # once over the data: the first epoch's batches
        epoch_tokens = sum(sum(b["lengths"]) for b in batches) / max(config.train.epochs, 1.0)
        counted, seen = [], 0
        for batch in batches:
            if seen >= epoch_tokens:
                break
            counted.append(batch)
            seen += sum(batch["lengths"])
    body = shape.num_layers * shape.active_layer_weights
    total = 0.0
    for batch in counted:
        keys = sum(n * (n + 1) // 2 for n in batch["lengths"])
        total += 2 * sum(batch["lengths"]) * body
        total += 4 * shape.num_layers * shape.num_heads * shape.head_dim * keys
        total += 2 * batch["targets"] * shape.hidden_size * shape.vocab_size
    return float(total)


@functools.cache
def measure_matmul_flops(device: str = "cpu", *, dtype: str = "float32",
                         seconds: float = 1.0, size: tuple[int, int, int] = (1024, 1024, 2048),
                         trials: int = 10) -> float:
    """FLOP/s of a dense matmul of a training-like shape on ``device`` (a quick benchmark).

    Measured once per process and setting: a sweep's trials, assess's learning-curve runs and
    every ``train()`` that records its prediction would otherwise each pay its second.

    The best of ``trials`` short timings over ``seconds``, to skip short slow spells. Longer
    ones remain: on the 2-core machine of benchmarks/README.md it still gave 93 to 184 GFLOP/s
    from one call to the next (results/training-efficiency-cpu.json), and a predicted time
    inherits that.
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    m, k, n = size
    a = torch.randn(m, k, device=device, dtype=torch_dtype)
    b = torch.randn(k, n, device=device, dtype=torch_dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    for _ in range(trials):
        count, started = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - started < seconds / trials:
            a @ b
            count += 1
        sync()
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - started))
    return best


def predict_time(shape: ModelShape, layout: DataLayout, batches: list[dict],
                 setting: Setting, config: Config) -> dict:
    """Training FLOPs over the measured matmul FLOP/s × efficiency, plus non-matmul costs."""
    device = "cuda" if setting.device == "cuda" else "cpu"
    run_flops = sum(training_flops(
        shape, batch["lengths"], n_target_tokens=batch["targets"], kind=setting.kind,
        r=setting.r, checkpointing=setting.checkpointing, targets=setting.targets,
        padded_length=batch["padded_length"], chunk_tokens=setting.chunk_tokens)
        for batch in batches)
    run_flops += reference_flops(shape, batches, config)
    matmul = measure_matmul_flops(
        device, dtype="float32" if setting.element_bytes == 4 else "bfloat16",
        size=(1024, 1024, 2048) if device == "cpu" else (8192, 8192, 8192))
    effective = matmul * TRAINING_EFFICIENCY[device]
    overhead_s = (layout.run_target_tokens * shape.vocab_size * SECONDS_PER_LOGIT[device]
                  + len(batches) * shape.num_layers * SECONDS_PER_LAYER[device]
                  + sum(len(b["lengths"]) for b in batches) * shape.num_layers
                  * SECONDS_PER_EXAMPLE_LAYER[device] + layout.steps * SECONDS_PER_STEP[device])
    train_s = run_flops / effective + overhead_s
    train_cfg = config.train
    evals = 2 + (layout.steps // train_cfg.eval_every if train_cfg.eval_every else 0)
    target_fraction = layout.target_tokens / max(1, layout.train_tokens)
    forward_per_token = 2 * (shape.active_params - shape.embedding_params
                             + target_fraction * shape.embedding_params)
    eval_s = evals * layout.validation_tokens * forward_per_token / effective
    load_s = 2.0 + shape.params * 4 / 1e9
    return {
        "run_flops": run_flops,
        "flops_per_token": run_flops / max(1, layout.run_tokens),
        "device_matmul_flops_per_s": matmul,
        "training_efficiency": TRAINING_EFFICIENCY[device],
        "non_matmul_s": overhead_s,
        "predicted_tokens_per_second": layout.run_tokens / train_s,
        "train_s": train_s, "eval_s": eval_s, "load_s": load_s,
        "predicted_wall_s": train_s + eval_s + load_s,
        "source": "matmul benchmark",
    }
