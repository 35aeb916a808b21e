"""Tiny random-weight models of every family users fine-tune, built from their configs.

Hidden 64, 2 decoder layers (Gemma 3: its pattern of 6), 4 query heads over 2 key/value heads,
each family's own features switched on where tunelab must honour them: sliding windows set small
(8) so a packed row is longer than the window, Llama 3's ``rope_type: llama3``, Qwen2's
attention biases, Qwen3's q/k norms, Qwen3-MoE's fused experts, Gemma 3's GELU MLP, local/global
layers, soft-capped logits and ``query_pre_attn_scalar``, Phi-3's fused ``qkv_proj`` and
``gate_up_proj``, and Gemma 3's multimodal class with a (tiny) SigLIP vision tower that text
data never reaches.

``build(name)`` returns a model in eval mode; ``save(name, folder, tokenizer)`` writes it with a
tokenizer through ``save_pretrained``, so code under test loads it the way a user's model loads.
tests/ is on sys.path (rootdir conftest), so test modules ``import architectures``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

WINDOW = 8  # smaller than the packed rows the tests build

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=256, tie_word_embeddings=False)


def _text_configs(vocab_size: int) -> dict[str, transformers.PretrainedConfig]:
    common = dict(_COMMON, vocab_size=vocab_size)
    return {
        "llama": transformers.LlamaConfig(**common),
        "llama3": transformers.LlamaConfig(
            **common, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}),
        "qwen2": transformers.Qwen2Config(**common),
        "qwen3": transformers.Qwen3Config(**common),
        "qwen3_moe": transformers.Qwen3MoeConfig(**dict(common, intermediate_size=96),
                                                 moe_intermediate_size=32, num_experts=4,
                                                 num_experts_per_tok=2, decoder_sparse_step=1,
                                                 mlp_only_layers=[]),
        # Gemma 3's own layer pattern (five local layers, then a global one), which llama.cpp
        # hard-codes: six layers here, not two
        "gemma3_text": transformers.Gemma3TextConfig(
            **dict(common, num_hidden_layers=6, tie_word_embeddings=True), sliding_window=WINDOW,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            query_pre_attn_scalar=16, final_logit_softcapping=30.0),
        "mistral": transformers.MistralConfig(**common, sliding_window=WINDOW),
        "phi3": transformers.Phi3Config(**common, sliding_window=WINDOW,
                                        bos_token_id=1, eos_token_id=2,
                                        pad_token_id=None),
    }


#: every family of the matrix, in the order the README lists them
NAMES = ("llama", "llama3", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "gemma3", "mistral",
         "phi3")
#: how the README's matrix names each family
LABELS = {"llama": "Llama (default RoPE)", "llama3": "Llama 3.1+ (`llama3` RoPE)",
          "qwen2": "Qwen2 / Qwen2.5", "qwen3": "Qwen3", "qwen3_moe": "Qwen3-MoE",
          "gemma3_text": "Gemma 3 (text)", "gemma3": "Gemma 3 (multimodal class, text data)",
          "mistral": "Mistral (sliding window)", "phi3": "Phi-3 (sliding window)"}
#: families whose attention has a sliding window (packed attention must band it)
WINDOWED = ("gemma3_text", "gemma3", "mistral", "phi3")


def config(name: str, vocab_size: int = 512) -> transformers.PretrainedConfig:
    """The tiny config of family ``name`` (one of ``NAMES``)."""
    if name != "gemma3":
        return _text_configs(vocab_size)[name]
    text = _text_configs(vocab_size)["gemma3_text"]
    # transformers' multimodal Gemma 3 class applies no final soft-cap (its causal LM does);
    # real Gemma 3 configs have none, so the multimodal tiny model has none either
    text.final_logit_softcapping = None
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                     mm_tokens_per_image=4, image_token_index=vocab_size - 1,
                                     boi_token_index=vocab_size - 3,
                                     eoi_token_index=vocab_size - 2)


def model_class(name: str):
    """The class a user would load the family with for causal LM training."""
    if name == "gemma3":
        return transformers.Gemma3ForConditionalGeneration
    return transformers.AutoModelForCausalLM._model_mapping[type(config(name))]


def build(name: str, vocab_size: int = 512, seed: int = 0) -> torch.nn.Module:
    """A random-weight model of family ``name`` in float32, eval mode, SDPA attention."""
    hf_config = config(name, vocab_size)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_class(name)(hf_config)
    # a wider init than 0.02 so that attention patterns (and windows) change hidden states
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0, 0.1)
    return model.eval()


def save(name: str, folder: Path, tokenizer) -> Path:
    """``build(name)`` with ``tokenizer``'s vocabulary, saved with it to ``folder``."""
    hf_config_vocab = len(tokenizer)
    model = build(name, vocab_size=hf_config_vocab)
    for key in ("bos_token_id", "eos_token_id"):
        for target in (model.config, getattr(model.config, "text_config", None)):
            if target is not None:
                setattr(target, key, getattr(tokenizer, key))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
