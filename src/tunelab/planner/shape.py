"""A decoder's dimensions as the planner counts them, and the adapter's size on it.

Which projections a layer has, and which of them read one input, come from the family's
``ArchitectureSpec`` (``model/architecture.py``); the parameters are counted on the model
built on the meta device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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
        return {leaf_name(name): sizes[leaf_name(name)] for name in self.spec.projections}

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


def leaf_name(name: str) -> str:
    """``self_attn.q_proj`` → ``q_proj``."""
    return name.rsplit(".", 1)[-1]


def target_modules(targets: str | list[str], shape: ModelShape | None = None) -> list[str]:
    """Which projections of one decoder layer (leaf names) peft adapts for ``method.targets``."""
    spec = shape.spec if shape is not None else SPECS["llama"]
    if targets == "all-linear":
        return [leaf_name(name) for name in spec.projections]
    if isinstance(targets, str):
        return [leaf_name(name) for name in spec.projections
                if re.fullmatch(targets, f"model.layers.0.{name}")]
    return [leaf_name(name) for name in spec.projections if leaf_name(name) in targets]


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


# QLoRA's NF4 base: 4-bit codes, an absmax per 64 weights stored in 8 bits (double
# quantisation), and a float32 scale per 256 of those.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)


def nf4_weight_bytes(shape: ModelShape) -> int:
    """QLoRA's base: the decoder's linear weights in NF4; embeddings and norms stay in float32
    (peft's prepare_model_for_kbit_training upcasts them)."""
    linear = shape.num_layers * sum(i * o for i, o in shape.linears().values())
    return int(linear * NF4_BYTES_PER_WEIGHT) + (shape.params - linear) * 4
