"""Peak memory of a training step, broken down, on the run's heaviest micro-batch.

Framework runtime, tokenized data, base weights (by dtype), adapter, gradients, AdamW state,
activations saved for the backward pass, the chunked-loss logits, a backward workspace and what
the allocator holds beyond the live tensors. Peak RSS on CPU; ``torch.cuda.max_memory_allocated``
plus the CUDA context on GPU (``peak_memory.py`` measures both the same way).

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
tests/planner/test_memory.py. Activation checkpointing (per decoder layer) keeps only each layer's
input, and re-creates one layer's activations at a time during the backward pass.
"""

from __future__ import annotations

import os
import sys

from tunelab.allocator import choose as choose_allocator
from tunelab.model.adapters import METHODS
from tunelab.peak_memory import GPU_RUNTIME_BYTES
from tunelab.planner.setting import Setting, replace_setting, trainable_params
from tunelab.planner.shape import ModelShape, leaf_name, nf4_weight_bytes, target_modules
from tunelab.planner.workload import DataLayout

# Measured on CPU (torch 2.13, transformers 5.24, peft 0.21, Python 3.11), see
# benchmarks/README.md: RSS of a process that has imported the training stack and run a
# training step of a model with negligible weights (the tiny test model), minus that model.
CPU_RUNTIME_BYTES = 470 * 2**20
# The tokenizer in memory per byte of its tokenizer.json (49k-token BPE: 3.5 MB file -> ~45 MB).
TOKENIZER_BYTES_PER_FILE_BYTE = 13.0
# Tokenized data (Python lists of ids and labels, example text, tokenizer output kept by the
# allocator), per train + validation token: 167 B measured on 4.5M tokens.
DATA_BYTES_PER_TOKEN = 170
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
GIB = 2**30


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
    groups = [tuple(leaf_name(name) for name in group)
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


def predict_memory(shape: ModelShape, batches: list[dict], setting: Setting,
                   layout: DataLayout) -> dict:
    """The peak-memory breakdown of a training step on the run's heaviest micro-batch."""
    weight_bytes = 4 if setting.weight_dtype == "float32" else 2
    trainable = trainable_params(shape, setting)
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
    """One micro-batch's transient memory: saved activations, loss logits, workspace."""
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


def gib(value: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{value / GIB:.2f} GiB"
