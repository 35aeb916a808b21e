"""Write a Llama-architecture model and its byte-level BPE tokenizer as one GGUF file.

llama.cpp's converter script (convert_hf_to_gguf.py) is not on PyPI, only its ``gguf`` library
is, so the part of the conversion our models need is written here, following that script for
``LlamaModel``: llama.cpp tensor names, the q/k row permutation (llama.cpp's rotary embedding
pairs neighbouring dimensions, transformers pairs the two halves of a head), the vocabulary with
token types, merges, the pre-tokenizer name, special token ids and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import ModelError

#: --quant name -> (tensor type of 2-D weights, general.file_type)
QUANTS = {"f16": ("F16", "MOSTLY_F16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}

_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def write_gguf(model: Any, tokenizer: Any, path: Path, *, quant: str, name: str,
               chat_template: str | None) -> dict[str, list[int]]:
    """Write ``model`` (a transformers Llama) + ``tokenizer`` to ``path``; return tensor shapes.

    The shapes are GGUF's (innermost dimension first), for checking the file read back.
    """
    import gguf

    config = model.config
    check_llama(config)
    tensor_type, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_architecture(writer, config)
    _add_tokenizer(writer, tokenizer, config.vocab_size, chat_template)
    shapes = {}
    for gguf_name, weights in _llama_tensors(model):
        data, raw_type = _encode(weights, gguf.GGMLQuantizationType[tensor_type])
        writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        shapes[gguf_name] = list(reversed(weights.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return shapes


def quantised_copy(model: Any, quant: str) -> Any:
    """A copy of ``model`` whose weights went through ``write_gguf``'s tensor types and back.

    A correct GGUF, read by any loader, reproduces this copy's outputs (up to float rounding);
    comparing with it separates layout bugs from the quantisation error itself.
    """
    import copy

    import gguf

    tensor_type = gguf.GGMLQuantizationType[QUANTS[quant][0]]
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.parameters():
            if parameter.ndim != 2:
                continue
            weights = parameter.detach().to(torch.float32).cpu().numpy()
            data, raw_type = _encode(weights, tensor_type)
            restored = gguf.quants.dequantize(data, raw_type).reshape(weights.shape)
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(restored)))
    return copied


def check_llama(config: Any) -> None:
    """Refuse, with the reason, a model this converter would write wrongly."""
    problems = []
    if getattr(config, "model_type", None) != "llama":
        problems.append(f"its architecture is {getattr(config, 'model_type', None)!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("it has attention or MLP biases")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"it uses {rope.get('rope_type')!r} rope scaling")
    if problems:
        raise ModelError(
            f"GGUF export supports plain Llama-architecture models (such as the embedded "
            f"SmolLM2), but {' and '.join(problems)}",
            where="--to gguf",
            fix="export --to merged and convert that folder with llama.cpp's "
            "convert_hf_to_gguf.py, which knows every architecture",
        )


def _add_architecture(writer: Any, config: Any) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _llama_tensors(model: Any):
    """(llama.cpp name, float32 numpy array) per tensor, q and k rows permuted as llama.cpp's."""
    config = model.config
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        weights = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            weights = _permute(weights, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weights = _permute(weights, config.num_key_value_heads)
        yield _gguf_name(hf_name), weights


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    prefix, _, rest = hf_name.partition("model.layers.")
    layer, _, suffix = rest.partition(".")
    if prefix or not layer.isdigit() or suffix not in _LAYER_TENSORS:
        raise ModelError(f"the model has a tensor {hf_name!r} that a Llama GGUF has no place for",
                         where="--to gguf", fix="export --to merged instead")
    return f"blk.{layer}.{_LAYER_TENSORS[suffix]}"


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half (transformers) to interleaved (llama.cpp)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _encode(weights: np.ndarray, tensor_type: Any) -> tuple[np.ndarray, Any]:
    """Norms stay F32; 2-D weights become ``tensor_type`` (Q8_0 falls back to F16 per tensor
    when a row is not a whole number of 32-value blocks, as llama.cpp's converter does)."""
    import gguf

    if weights.ndim == 1:
        return weights, gguf.GGMLQuantizationType.F32
    if tensor_type == gguf.GGMLQuantizationType.Q8_0:
        try:
            return gguf.quants.quantize(weights, tensor_type), tensor_type
        except gguf.QuantError:
            pass
    return weights.astype(np.float16), gguf.GGMLQuantizationType.F16


# --- tokenizer ------------------------------------------------------------------------------


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int,
                   chat_template: str | None) -> None:
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    if model.get("type") != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError(
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 "
            f"use), but this tokenizer is {model.get('type')} with a "
            f"{(backend.get('decoder') or {}).get('type')} decoder",
            where="--to gguf",
            fix="export --to merged and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    tokens, token_types = _vocabulary(model["vocab"], backend.get("added_tokens", []), vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(backend.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id)
    writer.add_add_space_prefix(False)
    if chat_template:
        writer.add_chat_template(chat_template)
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in chat_template and isinstance(end_of_turn, int) and end_of_turn >= 0:
            writer.add_eot_token_id(end_of_turn)


def _vocabulary(vocab: dict[str, int], added: list[dict], vocab_size: int
                ) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types; ids the tokenizer lacks become [PADn] (unused)."""
    from gguf import TokenType

    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        if index < vocab_size:
            tokens[index], types[index] = token, int(TokenType.NORMAL)
    for entry in added:
        if entry["id"] < vocab_size:
            tokens[entry["id"]] = entry["content"]
            types[entry["id"]] = int(TokenType.CONTROL if entry.get("special")
                                     else TokenType.USER_DEFINED)
    return tokens, types


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a tokenizers pre-tokenizer (``tokenizer.ggml.pre``).

    llama.cpp's converter recognises a tokenizer by hashing its output on a test text; reading
    the pre-tokenizer's structure gives the same answer for the shapes our models use.
    """
    steps = (pre_tokenizer or {}).get("pretokenizers") or ([pre_tokenizer] if pre_tokenizer
                                                           else [])
    kinds = [step.get("type") for step in steps]
    last = steps[-1] if steps else {}
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") \
            and last.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True) \
            and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    raise ModelError(
        f"GGUF export does not know llama.cpp's name for this tokenizer's pre-tokenizer "
        f"({json.dumps(pre_tokenizer)[:200]}); llama.cpp would split text differently",
        where="--to gguf",
        fix="export --to merged and convert with llama.cpp's convert_hf_to_gguf.py",
    )
