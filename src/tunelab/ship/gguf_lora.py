"""Write a run's PEFT LoRA adapter as a GGUF LoRA adapter that llama.cpp loads beside its base.

llama.cpp's ``convert_lora_to_gguf.py`` is not on PyPI; what it writes for the families
``tunelab.ship.gguf`` registers is written here: ``general.type = adapter``, ``adapter.type =
lora``, ``adapter.lora.alpha``, and per adapted weight ``<gguf name>.lora_a`` ([rank, in] as
torch holds it, so GGUF's ne = [in, rank]) and ``<gguf name>.lora_b`` ([out, rank]), under the
names ``gguf.get_tensor_name_map`` gives the base's weights. The converter's reshapes act on B
(the output side of B @ A), so llama's q/k row permutation is applied to ``lora_b`` alone.
llama.cpp scales each adapter by ``alpha / rank``, peft by ``alpha / rank`` too, or by
``alpha / sqrt(rank)`` with rsLoRA: that alpha is written as ``alpha * sqrt(rank)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError
from tunelab.model.architecture import text_config
from tunelab.ship.gguf import family_of, permute

#: The prefix peft puts before the base model's own parameter names in adapter_model.safetensors.
_PEFT_PREFIX = "base_model.model."


def write_gguf_lora(adapter_folder: Path, base_config: Any, path: Path, *, name: str) -> dict:
    """Write the PEFT adapter in ``adapter_folder`` (adapter_config.json and
    adapter_model.safetensors, for a base whose transformers config is ``base_config``) to
    ``path``; return what was written: alpha, rank and each tensor's GGUF shape.

    A ModelError where llama.cpp cannot apply the adapter as trained (DoRA, per-module ranks or
    alphas, biases or fully trained modules saved beside it, embeddings or the output layer).
    """
    import gguf
    from safetensors.numpy import load_file

    adapter_config = json.loads((adapter_folder / "adapter_config.json").read_text())
    _check_supported(adapter_config, adapter_folder)
    family = family_of(base_config)
    config = text_config(base_config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.arch], config.num_hidden_layers)
    weights = load_file(str(adapter_folder / "adapter_model.safetensors"))
    rank = int(adapter_config["r"])
    alpha = float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= math.sqrt(rank)  # peft scales by alpha/sqrt(r), llama.cpp by alpha/r
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[family.arch]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    shapes = {}
    for key in sorted(weights):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        hf_name = module.removeprefix(_PEFT_PREFIX).replace("model.language_model.", "model.")
        gguf_name = names.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ModelError(f"the adapter adapts {hf_name!r}, which llama.cpp's "
                             f"{family.arch} has no weight for", where=str(adapter_folder),
                             fix="serve this run with the own engine (tunelab serve without "
                                 "--engine) or export it merged: tunelab export RUN --to gguf")
        lora_a = weights[key].astype(np.float32)  # [rank, in]
        lora_b = weights[f"{module}.lora_B.weight"].astype(np.float32)  # [out, rank]
        if family.permute_qk and hf_name.endswith("q_proj"):
            lora_b = permute(lora_b, config.num_attention_heads)
        elif family.permute_qk and hf_name.endswith("k_proj"):
            lora_b = permute(lora_b, config.num_key_value_heads)
        # float32: a rank-r adapter is small, and llama.cpp multiplies F32 A and B as they are
        for suffix, tensor in ((".lora_a", lora_a), (".lora_b", lora_b)):
            writer.add_tensor(gguf_name + suffix, np.ascontiguousarray(tensor))
            shapes[gguf_name + suffix] = list(reversed(tensor.shape))
    if not shapes:
        raise ModelError("the adapter holds no LoRA weights", where=str(adapter_folder),
                         fix="serve a run trained with method.kind lora")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"alpha": alpha, "rank": rank, "tensors": shapes}


def _check_supported(adapter_config: dict, folder: Path) -> None:
    fix = ("serve this run with the own engine (tunelab serve without --engine), or export it "
           "merged (tunelab export RUN --to gguf) and serve that GGUF with llama-server")
    problems = []
    if adapter_config.get("use_dora"):
        problems.append("it is a DoRA adapter (llama.cpp applies plain LoRA only)")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        problems.append("its modules have different ranks or alphas (a GGUF adapter has one "
                        "alpha)")
    if adapter_config.get("modules_to_save"):
        problems.append(f"it trains whole modules too ({adapter_config['modules_to_save']})")
    if adapter_config.get("bias", "none") != "none":
        problems.append("it trains biases")
    if any(t in ("lm_head", "embed_tokens") for t in _targets(adapter_config)):
        problems.append("it adapts the embeddings or the output layer")
    if problems:
        raise ModelError("llama.cpp cannot apply this adapter as it was trained: "
                         + "; ".join(problems), where=str(folder), fix=fix)


def _targets(adapter_config: dict) -> list[str]:
    targets = adapter_config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)
