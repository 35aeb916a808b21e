"""Memory and time prediction for a config on a given device, before any weight is loaded.

``plan(config)`` reads the model's dimensions from its ``config.json`` (``AutoConfig``), tokenizes
the training data exactly as ``train()`` will, lays out every micro-batch of the run, and predicts:

- peak memory, broken down: framework runtime, tokenized data, base weights (by dtype), adapter,
  gradients, AdamW state, activations saved for the backward pass, the chunked-loss logits and
  a backward workspace. Peak RSS on CPU; ``torch.cuda.max_memory_allocated`` plus the CUDA
  context on GPU.
- tokens/s and wall time: training FLOPs per token (frozen weights cost forward + input
  gradient; trainable ones also their weight gradient), divided by the device's measured matmul
  FLOP/s times the fraction of it a training step reaches. A calibration (``calibrate_run`` in
  ``train/calibrate.py``) instead runs a few real steps in a subprocess; ``plan`` scales by it.

Activations follow the Llama decoder block (RMSNorm → q/k/v → RoPE → SDPA → o → RMSNorm →
gate/up → SiLU·up → down). Per token and layer autograd keeps, in elements:

- RMSNorm: its input (fp32) and the inverse RMS (1); with a trainable weight also the normalised
  input.
- a frozen projection keeps nothing of its own; a trainable one keeps its input. Inputs are shared
  (q/k/v read the same normed hidden state, gate/up another), so each is counted once.
- a LoRA projection keeps lora_B's input (r); with dropout > 0 also the dropout mask (a float
  tensor on CPU, bool on CUDA) and the dropped input that lora_A reads, per projection.
- SDPA keeps q, k, v, its output and the log-sum-exp (heads); SiLU keeps its input, SiLU·up both
  factors.

The same counts are checked against ``torch.autograd.graph.saved_tensors_hooks`` in
tests/model/test_plan.py. Activation checkpointing (per decoder layer) keeps only each layer's
input, and re-creates one layer's activations at a time during the backward pass.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from tunelab.allocator import choose as choose_allocator
from tunelab.config import Config
from tunelab.data.prepare import prepare_data, schedule_micro_batches
from tunelab.errors import ConfigError
from tunelab.model.adapters import METHODS
from tunelab.model.architecture import (
    SILU_NAMES,
    SPECS,
    ArchitectureSpec,
    activation,
    model_layout,
    spec_of_type,
    text_config,
)

GIB = 2**30

# Measured on CPU (torch 2.13, transformers 5.24, peft 0.21, Python 3.11), see
# benchmarks/README.md: RSS of a process that has imported the training stack and run a
# training step of a model with negligible weights (the tiny test model), minus that model.
CPU_RUNTIME_BYTES = 470 * 2**20
# The tokenizer in memory per byte of its tokenizer.json (49k-token BPE: 3.5 MB file -> ~45 MB).
TOKENIZER_BYTES_PER_FILE_BYTE = 13.0
# CUDA context and allocator slack outside max_memory_allocated; cuBLAS/cuDNN workspaces.
GPU_RUNTIME_BYTES = 600 * 2**20
# Tokenized data (Python lists of ids and labels, example text, tokenizer output kept by the
# allocator), per train + validation token: 167 B measured on 4.5M tokens.
DATA_BYTES_PER_TOKEN = 170
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
# glibc's malloc strands freed forward temporaries between live tensors (its mmap threshold
# adapts upwards to 32 MB), so peak RSS exceeds the live tensors by about this fraction of one
# forward pass's activations (all layers, not checkpointed) — measured on SmolLM2-135M and the
# 113M benchmark model, see benchmarks/README.md. With activation checkpointing the recomputed
# forward passes strand more and the amount varies from run to run (±20% of the peak over 7
# runs of one config); 0.68 is their mean. Zero when MALLOC_MMAP_THRESHOLD_ fixes the threshold.
# Measured with LoRA (it stands for every adapter method) and full fine-tuning (every weight
# trains), keyed by ``Method.adapter``.
GLIBC_FRAGMENTATION = {True: 0.55, False: 0.2}
GLIBC_FRAGMENTATION_CHECKPOINTED = {True: 0.68, False: 0.2}
# With shared LoRA dropout the live activations shrink but the holes do not, as much: the
# forward pass's temporaries are the same. SmolLM2-135M sentiment (3 steps, glibc defaults):
# 6.15 GiB peak, of which 2.32 GiB beyond the planner's live tensors, 0.88 of its activations.
GLIBC_FRAGMENTATION_SHARED_DROPOUT = 0.88
# jemalloc (dirty pages kept, train.allocator auto) reuses freed activations when every step
# allocates the same sizes, as packed rows of one token budget do. Padded batches change shape
# every step and it keeps extents of earlier shapes: the plan check's padded configuration
# (113M model, 4,096-token batches) held 0.14, 0.53 and 1.09 GiB beyond the live tensors of its
# peak batch after 1, 3 and 10 steps, flat from step 7 to 10 — 0.41 of that batch's
# activations (benchmarks/padded_growth.py, results/padded-growth-cpu.json).
JEMALLOC_PADDED_RETENTION = 0.41
# QLoRA's NF4 base: 4-bit codes, an absmax per 64 weights stored in 8 bits (double
# quantisation), and a float32 scale per 256 of those.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
# Frozen weights: forward + input gradient. Trainable: + weight gradient.
FROZEN_PASSES, TRAINABLE_PASSES = 2, 3

@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder that cost memory and time.

    Which projections a layer has, and which of them read one input, come from the family's
    ``ArchitectureSpec`` (``model/architecture.py``); ``from_config`` counts the parameters on
    the model itself, built on the meta device, so experts, q/k norms, biases and a vision
    tower are all counted.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    model_type: str = "llama"
    activation: str = "silu"
    counted_params: int = 0  # every parameter, counted on the meta device (0: from the sizes)
    vision_params: int = 0  # outside the language model (a multimodal model's vision tower)
    num_experts: int = 0  # routed experts per MoE layer (0: a dense MLP)
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    sliding_window: int = 0  # a local layer's window (0: none)
    windowed_layers: int = 0  # how many layers attend within it

    @classmethod
    def from_config(cls, hf_config: Any) -> ModelShape:
        """From a transformers ``PretrainedConfig`` (``AutoConfig.from_pretrained``)."""
        text = text_config(hf_config)
        heads = text.num_attention_heads
        layout = model_layout(hf_config)
        experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", 0)
        return cls(hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                   num_layers=text.num_hidden_layers, num_heads=heads,
                   num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
                   vocab_size=text.vocab_size,
                   tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
                   model_type=getattr(text, "model_type", "llama"),
                   activation=activation(hf_config), counted_params=layout.params,
                   vision_params=layout.vision_params,
                   num_experts=experts if layout.expert_params else 0,
                   experts_per_token=getattr(text, "num_experts_per_tok", 0) or 0,
                   expert_intermediate_size=getattr(text, "moe_intermediate_size", 0) or 0,
                   **_window(text))

    @property
    def spec(self) -> ArchitectureSpec:
        return spec_of_type(self.model_type)

    @property
    def gated_silu(self) -> bool:
        """A silu(gate) * up MLP that ``model/swiglu.py`` fuses."""
        return self.spec.mlp_kind != "moe" and self.activation in SILU_NAMES

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear projection of one decoder layer, by
        leaf name (``q_proj``), as the family's spec lays them out."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                 "qkv_proj": (h, q + 2 * kv), "gate_proj": (h, i), "up_proj": (h, i),
                 "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {_leaf(name): sizes[_leaf(name)] for name in self.spec.projections}

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each expert weight (one expert), MoE only."""
        if not self.num_experts:
            return {}
        h, m = self.hidden_size, self.expert_intermediate_size
        return {"gate_up_proj": (h, 2 * m), "down_proj": (m, h)}

    @property
    def expert_params_per_layer(self) -> int:
        """Every expert's weights and the router of one layer (0 for a dense MLP)."""
        if not self.num_experts:
            return 0
        per_expert = sum(a * b for a, b in self.expert_shapes().values())
        return self.num_experts * (per_expert + self.hidden_size)

    @property
    def active_layer_weights(self) -> int:
        """Weights one token is multiplied by in a layer: the projections, its routed experts
        and the router (what FLOPs count; a MoE token skips the other experts)."""
        dense = sum(a * b for a, b in self.linears().values())
        if not self.num_experts:
            return dense
        per_expert = sum(a * b for a, b in self.expert_shapes().values())
        return dense + self.experts_per_token * per_expert + self.num_experts * self.hidden_size

    @property
    def layer_params(self) -> int:
        return (sum(a * b for a, b in self.linears().values()) + self.expert_params_per_layer
                + 2 * self.hidden_size)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def params(self) -> int:
        if self.counted_params:
            return self.counted_params
        head = 0 if self.tied_embeddings else self.embedding_params
        return (self.num_layers * self.layer_params + self.embedding_params + head
                + self.hidden_size)

    @property
    def active_params(self) -> int:
        """Parameters a text token passes through: not the vision tower, not idle experts."""
        per_expert = sum(a * b for a, b in self.expert_shapes().values())
        idle = self.num_layers * (self.num_experts - self.experts_per_token) * per_expert
        return self.params - self.vision_params - idle


def _window(text: Any) -> dict:
    """The sliding window and the layers that use it: the config's layer types where it lists
    them (Gemma 3, Qwen2), else every layer (Mistral, Phi-3)."""
    window = getattr(text, "sliding_window", None) or 0
    types = getattr(text, "layer_types", None)
    layers = (sum(kind == "sliding_attention" for kind in types) if types
              else text.num_hidden_layers if window else 0)
    return {"sliding_window": window if layers else 0, "windowed_layers": layers}


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def target_modules(targets: str | list[str], shape: ModelShape | None = None) -> list[str]:
    """Which projections of one decoder layer (leaf names) peft adapts for ``method.targets``."""
    spec = shape.spec if shape is not None else SPECS["llama"]
    if targets == "all-linear":
        return [_leaf(name) for name in spec.projections]
    if isinstance(targets, str):
        return [_leaf(name) for name in spec.projections
                if re.fullmatch(targets, f"model.layers.0.{name}")]
    return [_leaf(name) for name in spec.projections if _leaf(name) in targets]


def adapter_params(shape: ModelShape, *, kind: str, r: int, targets: str | list[str]) -> int:
    """Trainable adapter parameters: r·(in + out) per adapted projection (+ out for DoRA); a
    MoE layer's experts under ``all-linear`` (peft's ``target_parameters``) r·(in + out) per
    expert and weight."""
    method = METHODS[kind]
    if not method.adapter:
        return 0
    linears = shape.linears()
    magnitude = method.magnitude_vector
    per_layer = sum(r * (linears[n][0] + linears[n][1]) + (linears[n][1] if magnitude else 0)
                    for n in target_modules(targets, shape))
    if targets == "all-linear":
        per_layer += sum(r * shape.num_experts * (a + b)
                         for a, b in shape.expert_shapes().values())
    return per_layer * shape.num_layers


def layer_activation_bytes(shape: ModelShape, *, kind: str, r: int, dropout: float,
                           targets: str | list[str], element_bytes: int, mask_bytes: int,
                           shared_dropout: bool = False, fused_swiglu: bool = False,
                           kv_expanded: bool = False) -> dict:
    """Bytes per token that one decoder layer keeps for the backward pass, by part.

    ``shared_dropout``: one LoRA dropout per input tensor (``model/dropout.py``), its dropped
    copy and mask kept once for all the projections that read the input. ``fused_swiglu``: the
    MLP keeps gate and up, not silu(gate) as well (``model/swiglu.py``; SiLU MLPs only).
    ``kv_expanded``: attention gets keys and values copied out to every query head (transformers
    does so for eager attention, and for SDPA whenever a padding mask is passed), and keeps them.
    """
    e, fp32 = element_bytes, 4
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    method = METHODS[kind]
    full = not method.adapter
    groups = [tuple(_leaf(name) for name in group)
              for group in shape.spec.attention + shape.spec.mlp if group]
    adapted = set(shape.linears()) if full else set(target_modules(targets, shape))
    linears = shape.linears()
    spec = shape.spec
    # each RMSNorm keeps its fp32 input and inverse RMS (and, trainable, the normed input);
    # q/k norms do so per head
    norms = spec.norms_per_layer * (h * fp32 + fp32 + (h * e if full else 0))
    if spec.qk_norm:
        heads = shape.num_heads + shape.num_kv_heads
        norms += heads * (shape.head_dim * fp32 + fp32 + (shape.head_dim * e if full else 0))
    projections = 0
    for group in groups:
        inputs_needed = dropped_needed = False
        for name in group:
            if name not in adapted:
                continue
            in_features = linears[name][0]
            if full:
                inputs_needed = True
            elif dropout > 0 and shared_dropout:
                dropped_needed = True
                projections += r * e
            elif dropout > 0:
                projections += in_features * (e + mask_bytes) + r * e
            else:
                inputs_needed = True
                projections += r * e
            if method.magnitude_vector:
                projections += 2 * linears[name][1] * e
        if inputs_needed:
            projections += linears[group[0]][0] * e
        if dropped_needed:
            projections += linears[group[0]][0] * (e + mask_bytes)
    # query, output, keys and values (copied out to the query heads when expanded; then one
    # [tokens × kv] tensor more stays referenced: measured, tests/model/test_plan.py)
    attention = (2 * q + (2 * q + kv if kv_expanded else 2 * kv)) * e
    if len(spec.attention[0]) == 1:  # one fused qkv_proj: values stay a view of its output
        attention += (q + kv) * e
    attention += shape.num_heads * fp32
    if shape.num_experts:
        # each routed copy of a token keeps its expert's input, gate/up output, SiLU(gate),
        # the product and the expert's output (scaled by its routing weight), and the router
        # its probabilities: measured with saved-tensor hooks (tests/model/test_plan.py)
        m = shape.expert_intermediate_size
        # (and the routing's index tensors: E + 9k floats, fitted on 4 experts, top 2)
        mlp = (shape.experts_per_token * (2 * h + 4 * m) * e
               + (shape.num_experts + 9 * shape.experts_per_token) * fp32)
    else:
        mlp = (2 if fused_swiglu and shape.gated_silu else 3) * i * e
    return {"norms": norms, "projections": projections, "attention": attention, "mlp": mlp,
            "total": norms + projections + attention + mlp}


def activation_bytes(shape: ModelShape, *, tokens: int, kind: str, r: int, dropout: float,
                     targets: str | list[str], checkpointing: bool, element_bytes: int,
                     mask_bytes: int, eager_attention_elements: int = 0,
                     window_mask_elements: int = 0,
                     shared_dropout: bool = False, fused_swiglu: bool = False,
                     kv_expanded: bool = False) -> dict:
    """Saved activations of one micro-batch of ``tokens`` positions (padding included).

    ``eager_attention_elements`` is Σ heads·rowlength² for eager attention (it keeps the
    probabilities); SDPA keeps none. ``window_mask_elements`` is Σ length² over the packed
    examples longer than the sliding window: each windowed layer keeps their banded masks, in
    float32 (the per-example path on CPU; CUDA's varlen kernel takes the window without one).
    """
    per_layer = layer_activation_bytes(shape, kind=kind, r=r, dropout=dropout, targets=targets,
                                       element_bytes=element_bytes, mask_bytes=mask_bytes,
                                       shared_dropout=shared_dropout,
                                       fused_swiglu=fused_swiglu, kv_expanded=kv_expanded)
    layer = tokens * per_layer["total"] + eager_attention_elements * element_bytes
    if shape.spec.norm_plus_one:  # each norm's 1 + weight, kept once per forward
        norm_widths = shape.spec.norms_per_layer * shape.hidden_size
        layer += (norm_widths + (2 * shape.head_dim if shape.spec.qk_norm else 0)) * 4
    if METHODS[kind].adapter and targets == "all-linear" and shape.num_experts:
        # peft's LoRA on the experts' 3-D weights forms W + BA in every forward and keeps it
        # for the backward pass: a weight-sized tensor per layer, whatever the batch
        layer += (shape.expert_params_per_layer - shape.num_experts * shape.hidden_size) \
            * element_bytes
    windowed = window_mask_elements * 4
    # final RMSNorm; RoPE cos/sin shared by all layers
    outside = tokens * (shape.hidden_size * 4 + 4 + 2 * shape.head_dim * element_bytes)
    if checkpointing:
        kept = shape.num_layers * tokens * shape.hidden_size * element_bytes
        return {"per_token_per_layer": per_layer, "layers": kept,
                "recomputed_layer": layer + windowed, "outside_layers": outside,
                "total": kept + layer + windowed + outside}
    kept = shape.num_layers * layer + shape.windowed_layers * windowed
    return {"per_token_per_layer": per_layer, "layers": kept, "recomputed_layer": 0,
            "outside_layers": outside, "total": kept + outside}


def logits_bytes(shape: ModelShape, *, target_tokens: int, chunk_tokens: int,
                 element_bytes: int) -> int:
    """Peak of the chunked loss: one chunk's fp32 log-probabilities, their gradient and the
    gradient of the logits (plus the low-precision logits when the model is not fp32)."""
    rows = min(target_tokens, chunk_tokens)
    per_element = 12 + (element_bytes if element_bytes != 4 else 0)
    return rows * shape.vocab_size * per_element


def workspace_bytes(shape: ModelShape, *, tokens: int, element_bytes: int) -> int:
    """Transient gradients of the layer being back-propagated (a few [tokens × width] tensors)."""
    return 4 * tokens * max(shape.intermediate_size, shape.hidden_size) * element_bytes


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


def measure_matmul_flops(device: str = "cpu", *, dtype: str = "float32",
                         seconds: float = 1.0, size: tuple[int, int, int] = (1024, 1024, 2048),
                         trials: int = 10) -> float:
    """FLOP/s of a dense matmul of a training-like shape on ``device`` (a quick benchmark).

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


# --- the data as train() will see it ------------------------------------------------------------


@dataclass
class DataLayout:
    """Token counts of the training data and of the run's micro-batches."""

    train_examples: int
    train_tokens: int
    target_tokens: int
    validation_tokens: int
    steps: int
    micro_batches: int
    run_tokens: int  # non-padding tokens over all epochs (or max_steps)
    run_target_tokens: int
    processed_tokens: int  # positions the model runs over, padding included
    tokenizer_file_bytes: int


@dataclass
class TokenCounts:
    """Per training example: its length and its target tokens (as ``train()`` keeps them)."""

    lengths: list[int]
    targets: list[int]
    validation_tokens: int

    @classmethod
    def from_tokenized(cls, train: list, validation: list) -> TokenCounts:
        """From ``TokenizedExample`` lists, e.g. ``train/loop.py``'s ``Prepared.train``."""
        return cls([len(ex.input_ids) for ex in train], [ex.n_target_tokens for ex in train],
                   sum(len(ex.input_ids) for ex in validation))


def count_tokens(config: Config, tokenizer) -> TokenCounts:
    """Read, split and tokenize the data with ``prepare_data``, the function ``train()`` uses."""
    data = prepare_data(config.data, tokenizer, max_seq_len=config.train.max_seq_len,
                        seed=config.train.seed)
    return TokenCounts.from_tokenized(data.train, data.validation)


def micro_batches(counts: TokenCounts, config: Config) -> list[dict]:
    """Every micro-batch of the run (``train()``'s schedule): lengths, positions, targets."""
    train_cfg = config.train
    packing = train_cfg.packing
    batches = []
    for indices in schedule_micro_batches(
            counts.lengths, batch_tokens=train_cfg.batch_tokens, packing=packing,
            seed=train_cfg.seed, epochs=train_cfg.epochs, max_steps=train_cfg.max_steps,
            grad_accum=train_cfg.grad_accum):
        sizes = [counts.lengths[i] for i in indices]
        padded = None if packing else max(sizes)
        batches.append({"lengths": sizes, "padded_length": padded,
                        "positions": len(sizes) * padded if padded else sum(sizes),
                        "targets": sum(counts.targets[i] for i in indices)})
    return batches


def describe_data(counts: TokenCounts, batches: list[dict], config: Config,
                  model_folder: str) -> DataLayout:
    tokenizer_file = os.path.join(model_folder, "tokenizer.json")
    return DataLayout(
        train_examples=len(counts.lengths), train_tokens=sum(counts.lengths),
        target_tokens=sum(counts.targets), validation_tokens=counts.validation_tokens,
        steps=len(batches) // config.train.grad_accum, micro_batches=len(batches),
        run_tokens=sum(sum(b["lengths"]) for b in batches),
        run_target_tokens=sum(b["targets"] for b in batches),
        processed_tokens=sum(b["positions"] for b in batches),
        tokenizer_file_bytes=os.path.getsize(tokenizer_file)
        if os.path.isfile(tokenizer_file) else 0)


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class Setting:
    """What the prediction depends on, resolved from the config and the device."""

    device: str
    weight_dtype: str
    element_bytes: int
    mask_bytes: int
    kind: str
    r: int
    dropout: float
    targets: str | list[str]
    checkpointing: bool
    chunk_tokens: int
    eager: bool
    shared_dropout: bool = False  # method.shared_dropout
    fused_swiglu: bool = False  # train.fused_swiglu
    allocator: str = "system"  # jemalloc | tuned | system (tunelab/allocator.py: choose)


def plan(config: Config, *, calibration: dict | None = None,
         memory_budget_bytes: int | None = None, nproc: int = 1,
         strategy: str = "ddp", allocator: str | None = None) -> dict:
    """Predict peak memory (broken down), tokens/s and wall time of ``train(config)``.

    Tokenizes the data as ``train()`` will; reads the model's ``config.json`` only.
    ``memory_budget_bytes`` replaces the device's available memory when judging the fit.
    ``calibration`` is what a few real steps of the config measured
    (``tunelab.train.calibrate.calibrate_run``): its tokens/s replaces the predicted rate, its
    peak memory is reported beside the prediction. ``nproc`` ranks (torchrun) under
    ``strategy`` (ddp or fsdp) add each rank's memory (``per_rank_memory``). ``allocator``
    (jemalloc, tuned, system): the malloc the run gets; by default the one the ``tunelab``
    command would give it (``allocator.choose``). Returns a JSON-serialisable dict (see
    ``render_plan``).
    """
    from tunelab.model.load import load_tokenizer

    counts = count_tokens(config, load_tokenizer(config.model.path, config.model.gguf_file))
    return plan_counts(config, counts, calibration=calibration,
                       memory_budget_bytes=memory_budget_bytes, nproc=nproc, strategy=strategy,
                       allocator=allocator)


def plan_counts(config: Config, counts: TokenCounts, *, calibration: dict | None = None,
                memory_budget_bytes: int | None = None, nproc: int = 1,
                strategy: str = "ddp", allocator: str | None = None) -> dict:
    """``plan`` for data already tokenized (``TokenCounts.from_tokenized``), as in ``train()``."""
    from transformers import AutoConfig

    from tunelab.model.load import resolve_device, resolve_dtype, resolve_model_path

    resolved = resolve_model_path(config.model.path, config.model.gguf_file)
    try:
        shape = ModelShape.from_config(AutoConfig.from_pretrained(resolved))
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"cannot read the model's dimensions from {resolved}: {error}",
                          where="model.path",
                          fix="point model.path at a causal LM folder with a config.json") from None
    batches = micro_batches(counts, config)
    layout = describe_data(counts, batches, config, resolved)
    device = resolve_device(config.model.device)
    dtype = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")
    setting = _setting(config, device.type, dtype, allocator)
    result = {
        "config": config.name,
        "model": {"path": config.model.path, "resolved": resolved, **asdict(shape),
                  "params": shape.params, "trainable_params": _trainable(shape, setting)},
        "device": _describe_device(device.type, memory_budget_bytes),
        "setting": asdict(setting),
        "data": asdict(layout),
        "memory": predict_memory(shape, batches, setting, layout),
        "time": predict_time(shape, layout, batches, setting, config),
        "calibration": None,
    }
    if calibration is not None:
        result["calibration"] = calibration
        _apply_calibration(result)
    peak = max(result["memory"]["predicted_peak_bytes"],
               result["memory"].get("measured_peak_bytes", 0))
    result["fits"] = peak <= result["device"]["budget_bytes"]
    result["memory_settings"] = memory_settings(
        shape, batches, setting, layout, result["device"]["budget_bytes"],
        allocator_follows_memory=config.train.allocator == "auto")
    result["advice"] = advise(result, shape, counts, setting, config)
    if nproc > 1:
        result["memory_per_rank"] = per_rank_memory(
            result["memory"]["breakdown_bytes"], nproc=nproc, strategy=strategy,
            full=not METHODS[setting.kind].adapter,
            block_bytes=shape.layer_params * setting.element_bytes,
            root_bytes=(shape.params - shape.num_layers * shape.layer_params)
            * setting.element_bytes)
    return result


def per_rank_memory(breakdown: dict[str, int], *, nproc: int, strategy: str, full: bool,
                    block_bytes: int, root_bytes: int) -> dict:
    """One rank's peak memory under torchrun, from the one-process ``breakdown``.

    Each rank runs micro-batches of at most the same ``batch_tokens``, so activations, logits
    and workspace stay as they are. DDP: every rank holds the model, its gradients and optimizer
    state, plus DDP's buckets (a second copy of the trainable gradients). FSDP: weights,
    gradients and optimizer state are split over the ranks, plus what is gathered whole during
    a step: the root (embeddings, output layer) and two decoder blocks (the one computing and
    the one prefetched), with one block's gradients before their reduce-scatter.
    """
    share = dict(breakdown)
    if strategy == "ddp":
        share["ddp_buckets"] = breakdown["gradients"]
    else:
        for part in ("weights", "adapter", "gradients", "optimizer"):
            share[part] = -(-breakdown[part] // nproc)
        share["gathered"] = root_bytes + 2 * block_bytes + (block_bytes if full else 0)
    return {"nproc": nproc, "strategy": strategy, "breakdown_bytes": share,
            "predicted_peak_bytes": sum(share.values())}


def nf4_weight_bytes(shape: ModelShape) -> int:
    """QLoRA's base: the decoder's linear weights in NF4; embeddings and norms stay in float32
    (peft's prepare_model_for_kbit_training upcasts them)."""
    linear = shape.num_layers * sum(i * o for i, o in shape.linears().values())
    return int(linear * NF4_BYTES_PER_WEIGHT) + (shape.params - linear) * 4


def plan_summary(plan: dict) -> dict:
    """The few numbers a run manifest keeps, to compare with what the run measured."""
    memory, timing = plan["memory"], plan["time"]
    return {"predicted_peak_bytes": memory["predicted_peak_bytes"],
            "breakdown_bytes": memory["breakdown_bytes"],
            "predicted_tokens_per_second": round(timing["predicted_tokens_per_second"], 1),
            "predicted_wall_s": round(timing["predicted_wall_s"], 1), "fits": plan["fits"]}


def measured_peak_bytes(device_type: str) -> int:
    """This process's peak memory as the plan predicts it: on CPU the peak RSS of this process
    image (VmHWM; ``ru_maxrss`` is no good after fork+exec on Linux, where it starts at the
    parent's RSS), on GPU the allocator's peak plus the CUDA context allowance."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() + GPU_RUNTIME_BYTES
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image: /proc's VmHWM, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _setting(config: Config, device: str, weight_dtype: str,
             allocator: str | None = None) -> Setting:
    element = 4 if weight_dtype == "float32" else 2
    method, train_cfg = config.method, config.train
    return Setting(device=device, weight_dtype=weight_dtype, element_bytes=element,
                   mask_bytes=1 if device == "cuda" or method.shared_dropout else element,
                   kind=method.kind, r=method.r,
                   dropout=method.dropout, targets=method.targets,
                   checkpointing=train_cfg.checkpointing,
                   chunk_tokens=train_cfg.loss_chunk_tokens,
                   eager=config.model.attn_implementation == "eager",
                   shared_dropout=method.shared_dropout,
                   fused_swiglu=train_cfg.fused_swiglu,
                   allocator=allocator or choose_allocator(train_cfg.allocator,
                                                           train_cfg.memory))


def _trainable(shape: ModelShape, setting: Setting) -> int:
    if not METHODS[setting.kind].adapter:
        return shape.params
    return adapter_params(shape, kind=setting.kind, r=setting.r, targets=setting.targets)


def predict_memory(shape: ModelShape, batches: list[dict], setting: Setting,
                   layout: DataLayout) -> dict:
    """The peak-memory breakdown of a training step on the run's heaviest micro-batch."""
    weight_bytes = 4 if setting.weight_dtype == "float32" else 2
    trainable = _trainable(shape, setting)
    method = METHODS[setting.kind]
    full = not method.adapter
    # peft keeps adapters in fp32 (autocast_adapter_dtype); AdamW state has the param's dtype
    trainable_bytes = weight_bytes if full else 4
    heaviest = max(batches, key=lambda batch: _batch_bytes(shape, batch, setting)["total"])
    transient = _batch_bytes(shape, heaviest, setting)
    cpu = setting.device != "cuda"
    tokenizer_bytes = int(layout.tokenizer_file_bytes * TOKENIZER_BYTES_PER_FILE_BYTE)
    breakdown = {
        "framework": CPU_RUNTIME_BYTES + tokenizer_bytes if cpu else GPU_RUNTIME_BYTES,
        "data": (layout.train_tokens + layout.validation_tokens) * DATA_BYTES_PER_TOKEN
        if cpu else 0,
        "weights": nf4_weight_bytes(shape) if method.load_in_4bit
        else shape.params * weight_bytes,
        "adapter": 0 if full else trainable * trainable_bytes,
        "gradients": trainable * trainable_bytes,
        "optimizer": 2 * trainable * trainable_bytes,
        "activations": transient["activations"]["total"],
        "logits": transient["logits"],
        "workspace": transient["workspace"],
        "allocator": _fragmentation_bytes(shape, heaviest, setting,
                                          transient["activations"]["total"]) if cpu else 0,
    }
    by_dtype = {"nf4 (4-bit base)" if method.load_in_4bit else setting.weight_dtype:
                breakdown["weights"]}
    if not full:
        by_dtype["float32 (adapter)"] = breakdown["adapter"]
    return {
        "breakdown_bytes": breakdown,
        "predicted_peak_bytes": sum(breakdown.values()),
        "weights_by_dtype": by_dtype,
        "activations_detail": transient["activations"],
        "peak_batch": {"positions": heaviest["positions"], "targets": heaviest["targets"],
                       "examples": len(heaviest["lengths"])},
    }


def _fragmentation_bytes(shape: ModelShape, batch: dict, setting: Setting,
                         activations: int) -> int:
    """RSS that the allocator holds beyond the live tensors (GLIBC_FRAGMENTATION,
    JEMALLOC_PADDED_RETENTION); ``activations``: the batch's saved activations."""
    if setting.allocator == "jemalloc" and batch["padded_length"] and not setting.checkpointing:
        return int(JEMALLOC_PADDED_RETENTION * activations)
    if (setting.allocator != "system" or os.environ.get("MALLOC_MMAP_THRESHOLD_")
            or not sys.platform.startswith("linux")):
        return 0
    per_layer = layer_activation_bytes(shape, kind=setting.kind, r=setting.r,
                                       dropout=setting.dropout, targets=setting.targets,
                                       element_bytes=setting.element_bytes,
                                       mask_bytes=setting.mask_bytes,
                                       shared_dropout=setting.shared_dropout,
                                       fused_swiglu=setting.fused_swiglu)["total"]
    factor = (GLIBC_FRAGMENTATION_CHECKPOINTED if setting.checkpointing
              else GLIBC_FRAGMENTATION)[METHODS[setting.kind].adapter]
    if setting.shared_dropout and setting.dropout > 0 and not setting.checkpointing:
        factor = GLIBC_FRAGMENTATION_SHARED_DROPOUT
    return int(factor * shape.num_layers * batch["positions"] * per_layer)


def _batch_bytes(shape: ModelShape, batch: dict, setting: Setting) -> dict:
    eager = 0
    if setting.eager:
        rows = ([batch["padded_length"]] * len(batch["lengths"]) if batch["padded_length"]
                else [sum(batch["lengths"])])  # a packed row without varlen: T×T per head
        eager = shape.num_heads * sum(n * n for n in rows)
    window = shape.sliding_window
    banded = (sum(n * n for n in batch["lengths"] if n > window)
              if window and not batch["padded_length"] and not setting.eager
              and setting.device != "cuda" else 0)
    activations = activation_bytes(
        shape, tokens=batch["positions"], kind=setting.kind, r=setting.r,
        dropout=setting.dropout, targets=setting.targets, checkpointing=setting.checkpointing,
        element_bytes=setting.element_bytes, mask_bytes=setting.mask_bytes,
        eager_attention_elements=eager, window_mask_elements=banded,
        shared_dropout=setting.shared_dropout,
        fused_swiglu=setting.fused_swiglu,
        kv_expanded=bool(setting.eager or batch["padded_length"]))
    logits = logits_bytes(shape, target_tokens=batch["targets"],
                          chunk_tokens=setting.chunk_tokens, element_bytes=setting.element_bytes)
    workspace = workspace_bytes(shape, tokens=batch["positions"],
                                element_bytes=setting.element_bytes)
    return {"activations": activations, "logits": logits, "workspace": workspace,
            "eager_attention_elements": eager,
            "total": activations["total"] + logits + workspace}


def predict_time(shape: ModelShape, layout: DataLayout, batches: list[dict],
                 setting: Setting, config: Config) -> dict:
    """Training FLOPs over the measured matmul FLOP/s × efficiency, plus non-matmul costs."""
    device = "cuda" if setting.device == "cuda" else "cpu"
    run_flops = sum(training_flops(
        shape, batch["lengths"], n_target_tokens=batch["targets"], kind=setting.kind,
        r=setting.r, checkpointing=setting.checkpointing, targets=setting.targets,
        padded_length=batch["padded_length"], chunk_tokens=setting.chunk_tokens)
        for batch in batches)
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


def _describe_device(device: str, budget: int | None) -> dict:
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        available = free
    else:
        name = _cpu_name()
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        available = _mem_available() or total
    return {"type": device, "name": name, "cpu_cores": os.cpu_count(), "memory_bytes": total,
            "available_bytes": available,
            "budget_bytes": budget if budget is not None else available}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --- calibration: what a few real steps measured ----------------------------------------------


def _apply_calibration(result: dict) -> None:
    calibration, timing = result["calibration"], result["time"]
    rate = calibration["tokens_per_second"]
    if rate <= 0:
        return
    scale = rate / timing["predicted_tokens_per_second"]
    timing.update(predicted_tokens_per_second=rate, train_s=timing["train_s"] / scale,
                  eval_s=timing["eval_s"] / scale, source="calibration run",
                  training_efficiency=timing["training_efficiency"] * scale)
    timing["predicted_wall_s"] = timing["train_s"] + timing["eval_s"] + timing["load_s"]
    memory = result["memory"]
    memory["measured_peak_bytes"] = calibration["measured_peak_bytes"]
    memory["prediction_error"] = (memory["predicted_peak_bytes"]
                                  / calibration["measured_peak_bytes"] - 1)


# --- advice and rendering -----------------------------------------------------------------------


def advise(result: dict, shape: ModelShape, counts: TokenCounts, setting: Setting,
           config: Config) -> list[str]:
    """What to change when the run will not fit (each with its predicted effect), and waste."""
    memory, budget = result["memory"], result["device"]["budget_bytes"]
    peak = memory["predicted_peak_bytes"]
    advice = []
    layout = DataLayout(**result["data"])
    if peak > budget:
        advice.append(f"The predicted peak ({_gib(peak)}) exceeds the memory budget "
                      f"({_gib(budget)}).")
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
            advice.append(f"{text}: peak {_gib(new_peak)}"
                          + (" — fits" if new_peak <= budget else ""))
        advice += _smaller_batch_advice(shape, counts, setting, config, layout, budget)
        if setting.device == "cuda":
            quantised = shape.params * 0.56
            advice.append(f"a 4-bit (NF4) quantised base model on the GPU (QLoRA) would hold "
                          f"the weights in ~{_gib(quantised)} instead of "
                          f"{_gib(memory['breakdown_bytes']['weights'])}")
    elif peak > 0.9 * budget:
        advice.append(f"The predicted peak ({_gib(peak)}) is within 10% of the memory budget "
                      f"({_gib(budget)}); other processes may push it over.")
    if layout.processed_tokens > 1.1 * layout.run_tokens:
        waste = 1 - layout.run_tokens / layout.processed_tokens
        advice.append(f"{waste:.0%} of the positions are padding: train.packing: true removes "
                      "them.")
    return advice


def memory_settings(shape: ModelShape, batches: list[dict], setting: Setting,
                    layout: DataLayout, budget_bytes: int, *,
                    allocator_follows_memory: bool = True) -> dict:
    """The predicted peak under each ``train.memory`` setting, and the one to use within
    ``budget_bytes``: default (faster) when it fits, else low (activation checkpointing; with
    ``train.allocator: auto``, each setting under the allocator it gets: ``allocator.choose``)."""
    def under(low: bool) -> Setting:
        if allocator_follows_memory:
            return replace_setting(setting, checkpointing=low, allocator=choose_allocator(
                "auto", "low" if low else "default"))
        return replace_setting(setting, checkpointing=low)

    peaks = {name: predict_memory(shape, batches, under(low), layout)["predicted_peak_bytes"]
             for name, low in (("default", False), ("low", True))}
    fitting = [name for name, peak in peaks.items() if peak <= budget_bytes]
    return {"predicted_peak_bytes": peaks, "budget_bytes": budget_bytes,
            "recommended": fitting[0] if fitting else None}


def replace_setting(setting: Setting, **changes: Any) -> Setting:
    return Setting(**{**asdict(setting), **changes})


def _smaller_batch_advice(shape: ModelShape, counts: TokenCounts, setting: Setting,
                          config: Config, layout: DataLayout, budget: int) -> list[str]:
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
                    f"{smaller.train.grad_accum} (same tokens per step): peak {_gib(peak)} — fits"]
    return []


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def render_plan(plan: dict, console) -> None:
    """Print a plan as tables: the memory breakdown against the budget, time, advice."""
    from rich.table import Table

    memory, timing, data = plan["memory"], plan["time"], plan["data"]
    model, device = plan["model"], plan["device"]
    console.print(f"[bold]{plan['config']}[/]: {model['model_type']} "
                  f"{model['params'] / 1e6:,.0f}M parameters, "
                  f"{model['trainable_params'] / 1e6:,.2f}M trainable "
                  f"({plan['setting']['kind']}) on {device['type']} ({device['name']})")
    table = Table(title="Predicted peak memory", show_footer=True)
    table.add_column("part", footer="total")
    table.add_column("GiB", justify="right", footer=f"{memory['predicted_peak_bytes'] / GIB:.2f}")
    for part, value in memory["breakdown_bytes"].items():
        table.add_row(part, f"{value / GIB:.2f}")
    console.print(table)
    verdict = "[green]fits[/]" if plan["fits"] else "[red]does not fit[/]"
    console.print(f"Budget {_gib(device['budget_bytes'])}: {verdict}.  Heaviest micro-batch: "
                  f"{memory['peak_batch']['positions']:,} positions, "
                  f"{memory['peak_batch']['targets']:,} loss targets.")
    settings = plan["memory_settings"]
    peaks = settings["predicted_peak_bytes"]
    choice = (f"use train.memory: {settings['recommended']}" if settings["recommended"]
              else "neither fits")
    console.print(f"train.memory: default {_gib(peaks['default'])}, low {_gib(peaks['low'])} "
                  f"(activation checkpointing, slower); for "
                  f"{_gib(settings['budget_bytes'])}: {choice}.")
    if "measured_peak_bytes" in memory:
        console.print(f"Calibration run peak: {_gib(memory['measured_peak_bytes'])} "
                      f"(prediction {memory['prediction_error']:+.0%}).")
    console.print(f"Data: {data['train_examples']:,} examples, {data['train_tokens']:,} tokens "
                  f"({data['target_tokens']:,} targets); {data['steps']:,} steps, "
                  f"{data['run_tokens']:,} tokens in the run.")
    console.print(f"Time ({timing['source']}): {timing['predicted_tokens_per_second']:,.0f} "
                  f"tokens/s, training {_duration(timing['train_s'])}, evaluation "
                  f"{_duration(timing['eval_s'])}, total ≈ {_duration(timing['predicted_wall_s'])}"
                  f" ({timing['flops_per_token'] / 1e9:.2f} GFLOP/token).")
    if "memory_per_rank" in plan:
        per_rank = plan["memory_per_rank"]
        parts = ", ".join(f"{part} {value / GIB:.2f}" for part, value in
                          per_rank["breakdown_bytes"].items() if value)
        console.print(f"Per rank ({per_rank['nproc']} ranks, {per_rank['strategy']}): "
                      f"{_gib(per_rank['predicted_peak_bytes'])} ({parts} GiB).")
    for line in plan["advice"]:
        console.print(f"[yellow]advice:[/] {line}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
