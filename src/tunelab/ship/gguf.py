"""Write a transformers causal LM and its tokenizer as one GGUF file that llama.cpp runs.

llama.cpp's converter script (convert_hf_to_gguf.py) is not on PyPI, only its ``gguf`` library
is, so the part of the conversion tunelab's families need is written here, following that
script's ``LlamaModel``, ``Qwen2Model``, ``Qwen3Model`` and ``Gemma3Model``: tensor names from
gguf-py's own tables (``gguf.get_tensor_name_map``), metadata keys through ``GGUFWriter``'s
``gguf.Keys``, special tokens through ``gguf.SpecialVocab``, plus what each family changes (the
q/k row permutation of llama, Llama 3.1's ``rope_freqs`` tensor, Gemma's norms stored as
weight + 1). ``FAMILIES`` is the one place a family is registered; ``check_gguf_support`` reads
only config.json and the tokenizer files, so an export that cannot be written stops before any
weight is loaded.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import ModelError
from tunelab.model.architecture import SPECS, text_config

#: --quant name -> (tensor type of 2-D weights, general.file_type). The types gguf-py quantises
#: in Python that transformers also reads back, so every export is checked (gguf-py also
#: quantises Q5_0/Q5_1, which transformers cannot read; the K-quants need llama-quantize).
QUANTS = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Gemma 3's local/global layout as llama.cpp hard-codes it (llama-model.cpp: set_swa_pattern(6),
#: local rope base 10000): every sixth layer attends globally.
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_ROPE_THETA = 10000.0

_CONVERT_FIX = ("export the merged model (tunelab export RUN --to merged) and convert that "
                "folder with llama.cpp: python convert_hf_to_gguf.py <merged folder> --outtype f16")


@dataclass(frozen=True)
class Family:
    """How one transformers ``model_type`` is written as one llama.cpp architecture (whose
    name is the family's ``ArchitectureSpec.gguf_arch``, model/architecture.py)."""

    model_type: str
    problems: Callable[[Any], list[str]]  #: what llama.cpp would run differently, from config
    notes: Callable[[Any], list[str]] = lambda config: []  #: differences worth a word
    extra_keys: Callable[[Any, Any], None] = lambda writer, config: None
    permute_qk: bool = False  #: llama.cpp's llama rope pairs neighbouring dimensions
    norm_shift: float = 0.0  #: Gemma's RMSNorm multiplies by 1 + weight; llama.cpp by weight
    trim_vocab: bool = False  #: embedding rows past the tokenizer's vocabulary are dropped

    @property
    def arch(self) -> str:
        """The gguf.MODEL_ARCH member name, e.g. LLAMA."""
        return SPECS[self.model_type].gguf_arch.upper()


def _rope(config: Any, layer_type: str = "full_attention") -> dict:
    """The rope parameters of ``layer_type`` layers (transformers 5 keys them per layer type)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
    rope = rope.get(layer_type, rope) if isinstance(rope.get(layer_type), dict) else rope
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return rope


def _rope_problem(config: Any, allowed: tuple[str, ...]) -> list[str]:
    kind = _rope(config).get("rope_type") or "default"
    return [] if kind in allowed else [f"it uses {kind!r} rope scaling"]


def _llama_problems(config: Any) -> list[str]:
    problems = _rope_problem(config, ("default", "llama3", "linear"))
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("it has attention or MLP biases")
    return problems


def _mistral_notes(config: Any) -> list[str]:
    window = getattr(config, "sliding_window", None)
    if not window or window >= config.max_position_embeddings:
        return []
    return [f"llama.cpp runs Mistral as arch llama and ignores its {window}-token sliding "
            f"window (as its converter does): prompts longer than {window} tokens attend to "
            "the whole context there, unlike in transformers"]


def _qwen_problems(config: Any) -> list[str]:
    problems = _rope_problem(config, ("default",))
    if getattr(config, "use_sliding_window", False):
        problems.append("it uses a sliding window, which llama.cpp's qwen2/qwen3 ignore")
    return problems


def _gemma3_problems(config: Any) -> list[str]:
    """llama.cpp fixes Gemma 3's layer pattern, local rope base and attention scale instead of
    reading them; a config that differs would run as another model there."""
    problems = _rope_problem(config, ("default", "linear"))
    layers = config.num_hidden_layers
    expected = ["sliding_attention" if (i + 1) % _GEMMA3_PATTERN else "full_attention"
                for i in range(layers)]
    if list(getattr(config, "layer_types", expected)) != expected:
        problems.append(f"its layer_types {list(config.layer_types)} differ from llama.cpp's "
                        f"fixed pattern (every {_GEMMA3_PATTERN}th layer global)")
    local_theta = _rope(config, "sliding_attention").get("rope_theta")
    if local_theta != _GEMMA3_LOCAL_ROPE_THETA:
        problems.append(f"its local rope base {local_theta} is not llama.cpp's fixed "
                        f"{_GEMMA3_LOCAL_ROPE_THETA:g}")
    # llama.cpp: 1/sqrt(head_dim), except hidden/heads for the 62-layer 27B
    scale = (config.hidden_size // config.num_attention_heads if layers == 62
             else config.head_dim)
    if getattr(config, "query_pre_attn_scalar", scale) != scale:
        problems.append(f"its query_pre_attn_scalar {config.query_pre_attn_scalar} is not the "
                        f"{scale} llama.cpp assumes")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("it soft-caps attention logits (Gemma 2 style)")
    return problems


def _llama_keys(writer: Any, config: Any) -> None:
    rope = _rope(config)
    if rope.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])


def _gemma3_keys(writer: Any, config: Any) -> None:
    _llama_keys(writer, config)
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


FAMILIES = {
    "llama": Family("llama", _llama_problems, extra_keys=_llama_keys, permute_qk=True),
    # llama.cpp's converter registers MistralForCausalLM with LlamaModel
    "mistral": Family("mistral", lambda config: _rope_problem(config, ("default",)),
                      notes=_mistral_notes, permute_qk=True),
    "qwen2": Family("qwen2", _qwen_problems),
    "qwen3": Family("qwen3", _qwen_problems),
    "gemma3_text": Family("gemma3_text", _gemma3_problems, extra_keys=_gemma3_keys, norm_shift=1.0,
                          trim_vocab=True),
}


@dataclass
class GGUFSupport:
    """What ``check_gguf_support`` found: the family, the tokenizer's kind, notes for the user."""

    family: Family
    tokenizer_model: str  #: tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SPM)
    notes: list[str] = field(default_factory=list)


def check_gguf_support(model_ref: str) -> GGUFSupport:
    """Refuse, before any weight is read, a model this writer would write wrongly.

    Reads config.json (``AutoConfig``) and the tokenizer files only; ``model_ref`` is a folder or
    a cached hub id, as ``from_pretrained`` takes.
    """
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_ref)
    family = family_of(config)  # before the tokenizer: a config.json alone is enough to refuse
    tokenizer = AutoTokenizer.from_pretrained(model_ref)
    return GGUFSupport(family, tokenizer_model(tokenizer), family.notes(text_config(config)))


def family_of(config: Any) -> Family:
    """The registered family of ``config``, or a ModelError naming why llama.cpp's converter
    is needed instead."""
    text = text_config(config)
    model_type = getattr(text, "model_type", None)
    family = FAMILIES.get(model_type)
    problems = family.problems(text) if family else []
    if family is None or problems:
        reason = (f"its architecture {model_type!r} is not one tunelab writes "
                  f"(it writes {', '.join(FAMILIES)})" if family is None
                  else " and ".join(problems))
        raise ModelError(f"GGUF export cannot write this model: {reason}", where="--to gguf",
                         fix=_CONVERT_FIX)
    return family


def write_gguf(model: Any, tokenizer: Any, path: Path, *, quant: str, name: str,
               chat_template: str | None) -> dict[str, list[int]]:
    """Write ``model`` + ``tokenizer`` to ``path``; return each tensor's shape.

    The shapes are GGUF's (innermost dimension first), for checking the file read back.
    """
    import gguf

    config = text_config(model.config)
    family = family_of(model.config)
    tensor_type, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_vocab = _add_tokenizer(writer, tokenizer, config.vocab_size, chat_template,
                             trim=family.trim_vocab)
    _add_architecture(writer, config, n_vocab)
    family.extra_keys(writer, config)
    shapes = {}
    for gguf_name, weights in gguf_tensors(model, family, n_vocab):
        data, raw_type = _encode(weights, gguf.GGMLQuantizationType[tensor_type], gguf_name)
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
            data, raw_type = _encode(weights, tensor_type, "")
            restored = gguf.quants.dequantize(data, raw_type).reshape(weights.shape)
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(restored)))
    return copied


def _add_architecture(writer: Any, config: Any, n_vocab: int) -> None:
    """The hyperparameters llama.cpp reads (TextModel.set_gguf_parameters and the families')."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(n_vocab)


# --- tensors --------------------------------------------------------------------------------


def gguf_tensors(model: Any, family: Family, n_vocab: int) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 numpy array) per tensor, changed as llama.cpp's converter does."""
    import gguf

    config = text_config(model.config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], config.num_hidden_layers)
    tied = getattr(model.config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        hf_name = hf_name.replace("model.language_model.", "model.")
        if hf_name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) or \
                hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # llama.cpp keeps a vision tower in a separate mmproj file
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"the model has a tensor {hf_name!r} that llama.cpp's "
                             f"{family.arch.lower()} has no place for", where="--to gguf",
                             fix=_CONVERT_FIX)
        yield gguf_name, _converted(hf_name, tensor, family, config, n_vocab)
    yield from _extra_tensors(config, family)


def _converted(hf_name: str, tensor: torch.Tensor, family: Family, config: Any,
               n_vocab: int) -> np.ndarray:
    weights = tensor.detach().to(torch.float32).cpu().numpy()
    if family.permute_qk and hf_name.endswith("q_proj.weight"):
        weights = permute(weights, config.num_attention_heads)
    elif family.permute_qk and hf_name.endswith("k_proj.weight"):
        weights = permute(weights, config.num_key_value_heads)
    if family.norm_shift and hf_name.endswith("norm.weight"):
        weights = weights + family.norm_shift
    if family.trim_vocab and hf_name.endswith(("embed_tokens.weight", "lm_head.weight")):
        weights = weights[:n_vocab]
    return weights


def _extra_tensors(config: Any, family: Family) -> Iterator[tuple[str, np.ndarray]]:
    """Llama 3.1's rope scaling as a ``rope_freqs`` tensor of per-frequency divisors
    (LlamaModel.generate_extra_tensors)."""
    import gguf

    rope = _rope(config)
    if family.arch != "LLAMA" or rope.get("rope_type") != "llama3":
        return
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", \
        np.asarray(factors, dtype=np.float32)


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half (transformers) to interleaved (llama.cpp)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _encode(weights: np.ndarray, tensor_type: Any, gguf_name: str) -> tuple[np.ndarray, Any]:
    """1-D tensors (norms, biases, rope_freqs) stay F32, as llama.cpp's converter keeps them;
    2-D weights become ``tensor_type``, falling back to F16 per tensor when a row is not a whole
    number of quantisation blocks (as the converter does)."""
    import gguf

    if weights.ndim == 1:
        return weights, gguf.GGMLQuantizationType.F32
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return weights.astype(np.float16), tensor_type
    try:
        return gguf.quants.quantize(weights, tensor_type), tensor_type
    except gguf.QuantError:
        return weights.astype(np.float16), gguf.GGMLQuantizationType.F16


# --- tokenizer ------------------------------------------------------------------------------


def tokenizer_model(tokenizer: Any) -> str:
    """``tokenizer.ggml.model`` for ``tokenizer``: "gpt2" for byte-level BPE, "llama" for
    SentencePiece-style BPE with byte fallback (Gemma, Llama 2, Mistral 7B); else ModelError."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    decoder = json.dumps(backend.get("decoder"))
    if model.get("type") == "BPE" and '"ByteLevel"' in decoder:
        pre_tokenizer_name(backend.get("pre_tokenizer"))  # refuses a split llama.cpp lacks
        return "gpt2"
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return "llama"
    raise ModelError(
        "GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM2) and "
        "SentencePiece-style BPE with byte fallback (Gemma, Mistral 7B), but this tokenizer is "
        f"{model.get('type')} with a {(backend.get('decoder') or {}).get('type')} decoder",
        where="--to gguf", fix=_CONVERT_FIX)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, chat_template: str | None,
                   *, trim: bool) -> int:
    """Vocabulary, its kind and special tokens; returns the vocabulary size written."""
    import gguf

    kind = tokenizer_model(tokenizer)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    n_vocab = min(vocab_size, len(tokenizer)) if trim else vocab_size
    tokens, token_types = _vocabulary(backend["model"]["vocab"], backend.get("added_tokens", []),
                                      n_vocab, tokenizer.unk_token_id)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(backend.get("pre_tokenizer")))
    else:  # _set_vocab_sentencepiece: scores decide llama.cpp's merges, no merge list
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_spm_scores(backend["model"], tokens))
        writer.add_add_space_prefix(_adds_space_prefix(backend))
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=n_vocab)
    probe = tokenizer("a").input_ids  # what the tokenizer does, whatever its files say
    special.add_special_token = {
        "bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "eos": bool(probe) and probe[-1] == tokenizer.eos_token_id}
    special.chat_template = chat_template or None
    special.add_to_gguf(writer, quiet=True)
    if kind == "gpt2":
        writer.add_add_space_prefix(False)
    _add_end_of_turn(writer, tokenizer, chat_template)
    return n_vocab


def _add_end_of_turn(writer: Any, tokenizer: Any, chat_template: str | None) -> None:
    """The token that ends an assistant turn, so llama.cpp's chat stops there."""
    for marker in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if chat_template and marker in chat_template and isinstance(token_id, int) \
                and token_id >= 0 and token_id != tokenizer.unk_token_id:
            writer.add_eot_token_id(token_id)
            return


def _vocabulary(vocab: dict[str, int], added: list[dict], vocab_size: int,
                unk_id: int | None) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types; ids the tokenizer lacks become [PADn] (unused)."""
    from gguf import TokenType

    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for token, index in vocab.items():
        if index < vocab_size:
            is_byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            tokens[index] = token
            types[index] = int(TokenType.BYTE if is_byte else TokenType.NORMAL)
    for entry in added:
        if entry["id"] < vocab_size:
            tokens[entry["id"]] = entry["content"]
            types[entry["id"]] = int(TokenType.CONTROL if entry.get("special")
                                     else TokenType.USER_DEFINED)
    if unk_id is not None and unk_id < vocab_size:
        types[unk_id] = int(TokenType.UNKNOWN)
    return tokens, types


def _spm_scores(model: dict, tokens: list[str]) -> list[float]:
    """SentencePiece scores from a BPE merge list: llama.cpp's SPM tokenizer merges the
    highest-scoring pair first, so a token made by merge r scores -r (SentencePiece's own BPE
    scores are in that order too); tokens no merge makes score 0."""
    rank = {}
    for index, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    return [-float(rank[token]) if token in rank else 0.0 for token in tokens]


def _adds_space_prefix(backend: dict) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2, Mistral) or not (Gemma)."""
    steps = json.dumps([backend.get("normalizer"), backend.get("pre_tokenizer")])
    return '"Prepend"' in steps or '"prepend_scheme": "first"' in steps \
        or '"prepend_scheme": "always"' in steps


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a tokenizers pre-tokenizer (``tokenizer.ggml.pre``).

    llama.cpp's converter recognises a tokenizer by hashing its output on a test text
    (get_vocab_base_pre); reading the pre-tokenizer's structure gives the same answer for the
    shapes our families use.
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
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
    raise ModelError(
        f"GGUF export does not know llama.cpp's name for this tokenizer's pre-tokenizer "
        f"({json.dumps(pre_tokenizer)[:200]}); llama.cpp would split text differently",
        where="--to gguf", fix=_CONVERT_FIX)


# --- reading back ---------------------------------------------------------------------------


def required_keys(config: Any, n_vocab: int) -> dict[str, Any]:
    """The metadata llama.cpp's loader requires for ``config``'s architecture, with the values
    this writer gives them (the checks and tests compare a file read back with these)."""
    import gguf

    family = family_of(config)
    config = text_config(config)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]]
    keys = {"general.architecture": arch,
            f"{arch}.context_length": config.max_position_embeddings,
            f"{arch}.embedding_length": config.hidden_size,
            f"{arch}.block_count": config.num_hidden_layers,
            f"{arch}.feed_forward_length": config.intermediate_size,
            f"{arch}.attention.head_count": config.num_attention_heads,
            f"{arch}.attention.head_count_kv": config.num_key_value_heads,
            f"{arch}.vocab_size": n_vocab}
    if family.arch == "GEMMA3":
        keys[f"{arch}.attention.sliding_window"] = config.sliding_window
    return keys


def transformers_config(config: Any, n_vocab: int) -> Any | None:
    """None where transformers rebuilds ``config`` from the GGUF's metadata alone; else the
    config to load the GGUF's tensors with, because its GGUF reader drops what llama.cpp
    reads or hard-codes (Llama 3.1's rope_freqs, Qwen3's head_dim, Gemma 3's
    query_pre_attn_scalar, soft-cap and layer pattern); Mistral is given as the Llama that
    llama.cpp runs it as."""
    import copy

    family = family_of(config)
    text = text_config(config)
    if family.arch == "QWEN2" or (family is FAMILIES["llama"]
                                  and _rope(text).get("rope_type", "default") == "default"):
        return None
    if family is FAMILIES["mistral"]:
        # llama.cpp's llama, window and all; and transformers reads a GGUF named "*mistral*"
        # as a mistral arch that gguf-py lacks, unless told it is a Llama
        from transformers import LlamaConfig

        settings = {k: v for k, v in text.to_dict().items()
                    if k not in ("model_type", "sliding_window", "architectures")}
        return LlamaConfig(**{**settings, "vocab_size": n_vocab})
    text = copy.deepcopy(text)
    text.vocab_size = n_vocab
    # a multimodal config's own tie_word_embeddings is what ties (its text_config may differ)
    text.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    return text
