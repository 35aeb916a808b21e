"""What an architecture is, in one place: one ``ArchitectureSpec`` per model type.

The planner (which projections read one input, the MLP's kind), the fused MLP (``swiglu.py``:
which MLPs it can fuse), LoRA targeting (where the language model's projections are, and a
mixture of experts' expert weights) and the GGUF writer (llama.cpp's architecture name) all
read these entries, so adding a family is one entry plus its tests
(``tests/model/test_architectures.py``). Sizes are never written here: ``model_layout`` reads
them from the model itself, built on the ``meta`` device from its config (no weights, no
memory), so what the planner counts is what the model has — experts, vision tower and all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: the gated MLP's activation names in configs (``hidden_act`` / ``hidden_activation``)
SILU_NAMES = ("silu", "swish")


@dataclass(frozen=True)
class ArchitectureSpec:
    """The parts of a decoder family that tunelab's fast paths and planner depend on."""

    model_type: str
    # projections of one decoder layer, grouped by the input tensor they read (an input read
    # by several is saved once for the backward pass); each name relative to the layer
    attention: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
    mlp: tuple[tuple[str, ...], ...] = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    # gated: act(gate(x)) * up(x) with separate projections; fused_gate_up: one gate_up_proj
    # whose output halves are gate and up (Phi-3); moe: routed experts kept as 3-D parameters
    mlp_kind: Literal["gated", "fused_gate_up", "moe"] = "gated"
    # the experts' 3-D weights, relative to the layer (peft's target_parameters adapts them)
    expert_parameters: tuple[str, ...] = ()
    qk_norm: bool = False  # RMSNorm on each head's query and key (Qwen3, Gemma 3)
    norms_per_layer: int = 2  # Gemma 2/3 also normalise each block's output: 4
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by 1 + weight (formed every forward)
    gguf_arch: str | None = None  # llama.cpp's name for it, where tunelab writes GGUF

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(name for group in self.attention + self.mlp for name in group)


_PHI3_ATTENTION = (("self_attn.qkv_proj",), ("self_attn.o_proj",))
_MOE_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

SPECS: dict[str, ArchitectureSpec] = {spec.model_type: spec for spec in (
    ArchitectureSpec("llama", gguf_arch="llama"),
    ArchitectureSpec("mistral", gguf_arch="llama"),
    ArchitectureSpec("qwen2", gguf_arch="qwen2"),
    ArchitectureSpec("qwen3", qk_norm=True, gguf_arch="qwen3"),
    ArchitectureSpec("qwen3_moe", mlp=((), ()), mlp_kind="moe",
                     expert_parameters=_MOE_EXPERTS, qk_norm=True, gguf_arch="qwen3moe"),
    ArchitectureSpec("gemma", norm_plus_one=True, gguf_arch="gemma"),
    ArchitectureSpec("gemma2", norms_per_layer=4, norm_plus_one=True,
                     gguf_arch="gemma2"),
    ArchitectureSpec("gemma3_text", qk_norm=True, norms_per_layer=4,
                     norm_plus_one=True, gguf_arch="gemma3"),
    ArchitectureSpec("phi3", attention=_PHI3_ATTENTION,
                     mlp=(("mlp.gate_up_proj",), ("mlp.down_proj",)), mlp_kind="fused_gate_up",
                     gguf_arch="phi3"),
)}


def text_config(hf_config: Any) -> Any:
    """The language model's config (a multimodal config's ``text_config``, else itself)."""
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def spec_of_type(model_type: str) -> ArchitectureSpec:
    """The entry of ``model_type``; Llama's layout for a type not listed."""
    return SPECS.get(model_type) or ArchitectureSpec(model_type)


def spec_for(hf_config: Any) -> ArchitectureSpec:
    """The entry of a model's (text) model type."""
    return spec_of_type(getattr(text_config(hf_config), "model_type", "llama"))


def activation(hf_config: Any) -> str:
    """The MLP's activation as the config names it (Gemma spells the key differently)."""
    text = text_config(hf_config)
    return (getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None)
            or "silu")


@dataclass(frozen=True)
class ModelLayout:
    """What a model has, counted on the meta device: every parameter, the language model's
    share, one decoder layer's projections and experts."""

    params: int
    vision_params: int  # parameters outside the language model and its output layer
    linears: dict[str, tuple[int, int]]  # layer-relative name -> (in_features, out_features)
    expert_params: dict[str, tuple[int, ...]]  # layer-relative name -> 3-D shape
    decoder_prefix: str  # where the decoder layers live, e.g. model.layers


def meta_model(hf_config: Any):
    """The causal LM of ``hf_config`` built on the meta device: shapes, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def model_layout(hf_config: Any) -> ModelLayout:
    """Count ``hf_config``'s model as transformers builds it (``meta_model``)."""
    model = meta_model(hf_config)
    return layout_of(model)


def layout_of(model: Any) -> ModelLayout:
    """``ModelLayout`` of a built model (on any device)."""
    from torch import nn

    decoder = model.get_decoder()
    names = {module: name for name, module in model.named_modules()}
    layer = decoder.layers[0]
    linears = {name: (module.in_features, module.out_features)
               for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    spec = spec_for(model.config)
    experts = {name: tuple(parameter.shape) for name, parameter in layer.named_parameters()
               if name in spec.expert_parameters}
    language = {id(p) for p in decoder.parameters()}
    head = model.get_output_embeddings()
    language |= {id(p) for p in head.parameters()} if head is not None else set()
    unique = {id(p): p.numel() for p in model.parameters()}
    vision = sum(count for key, count in unique.items() if key not in language)
    return ModelLayout(params=sum(unique.values()), vision_params=vision, linears=linears,
                       expert_params=experts, decoder_prefix=f"{names[decoder.layers]}")


def language_model_targets(model: Any, targets: str | list[str]) -> str | list[str]:
    """``method.targets`` for peft, kept to the language model.

    peft's ``all-linear`` adapts every linear layer but the output layer, a multimodal model's
    vision tower and projector included; text data never reaches them, so their adapters would
    train nothing and change the image path. For such a model ``all-linear`` becomes a regex
    over the decoder layers' linear layers (what it means for a text-only model). A mixture of
    experts gets the same regex, which leaves its router alone (peft's ``all-linear`` adapts
    it too; routing is what a small adapter should not retrain); its experts are adapted
    through ``expert_targets``.
    """
    import re

    if targets != "all-linear":
        return targets
    layout = layout_of(model)
    if layout.vision_params == 0 and not layout.expert_params:
        return targets
    leaves = sorted({name.rsplit(".", 1)[-1] for name in layout.linears})
    return rf"{re.escape(layout.decoder_prefix)}\.\d+\..*\b(?:{'|'.join(leaves)})"


def expert_targets(model: Any, targets: str | list[str]) -> list[str]:
    """peft ``target_parameters`` for a mixture of experts under ``all-linear``: transformers
    keeps each layer's experts as fused 3-D parameters, not linear layers, so without these
    ``all-linear`` would adapt attention only."""
    spec = spec_for(model.config)
    if targets != "all-linear" or not spec.expert_parameters:
        return []
    return list(spec.expert_parameters)
