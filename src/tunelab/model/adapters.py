"""Tuning methods, registered in ``METHODS``: LoRA / DoRA adapters through peft, or all weights.

A method is one small class: how it changes the model before training, where its result is saved
(``run/load.py`` loads a run's tuned model again), and what the memory planner needs to know of
it (adapter or all weights, a 4-bit base, DoRA's magnitude vector). Everything else (the loop,
evaluation, the report, the planner, the config's list of choices) asks ``METHODS[kind]``
instead of comparing strings, so adding a method is one class here. peft and torch are imported
only when a model is touched, so the config can read the registry cheaply.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn


class Method:
    """One way of tuning a model. Subclasses set the class attributes and ``apply``."""

    kind: ClassVar[str]
    title: ClassVar[str]  # how reports name it
    adapter: ClassVar[bool]  # True: a small peft adapter on frozen base weights
    final_folder: ClassVar[str]  # the run's final result: adapter/ (PEFT format) or model/
    load_in_4bit: ClassVar[bool] = False  # True: the base is loaded quantised to NF4 (QLoRA)
    # True: a learned magnitude per output feature of each adapted projection (DoRA); the
    # planner counts its parameters and the weight-norm activations it keeps.
    magnitude_vector: ClassVar[bool] = False

    def apply(self, model: nn.Module, *, r: int, alpha: float, dropout: float,
              targets: str | list[str], rslora: bool) -> nn.Module:
        """The model ready to train: wrapped, or with the right parameters trainable."""
        raise NotImplementedError


class LoRA(Method):
    kind, title, adapter, final_folder = "lora", "LoRA", True, "adapter"
    use_dora: ClassVar[bool] = False

    def apply(self, model, *, r, alpha, dropout, targets, rslora):
        from peft import LoraConfig, get_peft_model
        from torch import nn

        from tunelab.model.architecture import expert_targets, language_model_targets

        experts = expert_targets(model, targets)
        # peft's LoRA on a 3-D parameter (the experts) takes no dropout, so with experts the
        # adapter is made without and the linear projections get their dropout afterwards
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0 if experts else dropout,
                            target_modules=language_model_targets(model, targets),
                            target_parameters=experts or None,
                            use_dora=self.use_dora, use_rslora=rslora, bias="none",
                            task_type="CAUSAL_LM")
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as error:
            available = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                                if isinstance(module, nn.Linear)})
            raise ConfigError(f"method.targets {targets!r} does not fit this model: {error}",
                              where="method.targets",
                              fix="use 'all-linear' or names of linear layers: "
                              f"{', '.join(available)}") from None
        if experts and dropout > 0:
            _add_linear_dropout(wrapped, dropout)
        return wrapped


def _add_linear_dropout(model: nn.Module, dropout: float) -> None:
    """``nn.Dropout(dropout)`` on every LoRA linear projection of ``model`` (where peft put
    ``nn.Identity`` because the adapter was made without dropout)."""
    from peft.tuners.lora import Linear as LoraLinear
    from torch import nn

    for module in model.modules():
        if isinstance(module, LoraLinear):
            for name in module.lora_dropout:
                module.lora_dropout[name] = nn.Dropout(dropout)


class DoRA(LoRA):
    kind, title = "dora", "DoRA"
    use_dora = magnitude_vector = True


class QLoRA(LoRA):
    """LoRA on a base loaded in 4 bits (NF4, double quantisation, bitsandbytes): the frozen base
    takes about a quarter of its bf16 memory; the adapter trains in the compute dtype."""

    kind, title = "qlora", "QLoRA"
    load_in_4bit = True

    def apply(self, model, *, r, alpha, dropout, targets, rslora):
        from peft import prepare_model_for_kbit_training

        # Norms and embeddings in float32, as the QLoRA recipe keeps them; gradient
        # checkpointing stays train.gradient_checkpointing's business.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(model, r=r, alpha=alpha, dropout=dropout, targets=targets,
                             rslora=rslora)


class Full(Method):
    """Every weight trains; the run saves the whole model, loaded like a base model."""

    kind, title, adapter, final_folder = "full", "full fine-tuning", False, "model"

    def apply(self, model, *, r, alpha, dropout, targets, rslora):
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model


METHODS: dict[str, Method] = {method.kind: method for method in
                              (LoRA(), DoRA(), QLoRA(), Full())}


def without_bitsandbytes(kind: str) -> bool:
    """Keep peft from importing bitsandbytes in a process whose one training quantises nothing
    (``tunelab train`` with a method other than QLoRA): peft imports it whenever it is
    installed, which costs ~45 MB of resident memory for the whole run and prints a warning
    about a missing optional CPU kernel. Afterwards nothing in this process can import it, so
    only a command that trains once calls this. True if it took effect."""
    if METHODS[kind].load_in_4bit or "bitsandbytes" in sys.modules:
        return False
    sys.modules["bitsandbytes"] = None  # importlib.util.find_spec now answers None
    return True


def apply_method(model: nn.Module, *, kind: str, r: int, alpha: float, dropout: float,
                 targets: str | list[str], rslora: bool) -> nn.Module:
    """Prepare ``model`` for training with the registered method ``kind``."""
    return METHODS[kind].apply(model, r=r, alpha=alpha, dropout=dropout, targets=targets,
                               rslora=rslora)


def load_adapter_weights(model: nn.Module, folder: Path, *, where: str) -> None:
    """Load a saved adapter's weights (PEFT format) into ``model``'s own adapter of the same
    shape, to train it further; ConfigError when they do not fit it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    try:
        outcome = set_peft_model_state_dict(model, weights)
    except RuntimeError as error:  # a shape mismatch: another rank or other targets
        raise ConfigError(f"the adapter in {folder} does not fit this run's adapter: "
                          f"{str(error).splitlines()[0][:300]}", where=where,
                          fix="use the same method.r and method.targets as the run it comes "
                          "from") from None
    missing = [key for key in outcome.missing_keys if "lora_" in key]
    if outcome.unexpected_keys or missing:
        extra = (outcome.unexpected_keys or missing)[0]
        raise ConfigError(f"the adapter in {folder} does not fit this run's adapter ({extra} "
                          "is in one and not the other)", where=where,
                          fix="use the same method.targets as the run it comes from")


def trainable_state(model: nn.Module) -> dict:
    """The trainable tensors only (the adapter, or everything for full fine-tuning)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in names}


def save_final(model: nn.Module, tokenizer, folder: Path, *,
               state_dict: dict | None = None) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors) or full safetensors weights.

    An adapter names its base by hub id (not this machine's cache path) and records the exact
    base weights in tunelab_base.json, so other machines and tools can find the base again.
    ``state_dict`` gives the weights when the model holds only shards of them (FSDP).
    """
    from peft import PeftModel

    loaded_from = model.get_base_model().name_or_path if isinstance(model, PeftModel) else ""
    base = _name_base_portably(model) if isinstance(model, PeftModel) else None
    with _no_hub_lookup_warnings(loaded_from):
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)
    if base is not None:
        from tunelab.model.load import BASE_SIDECAR

        (Path(folder) / BASE_SIDECAR).write_text(json.dumps(base, indent=2) + "\n")


@contextmanager
def _no_hub_lookup_warnings(loaded_from: str) -> Iterator[None]:
    """peft's save looks the adapter's base up on the hub (for ``config.json``, to see whether
    the vocabulary was resized, which tunelab never does) and warns twice when it cannot: a
    failed fetch, then "Could not find a config file". Offline, or with the base loaded from
    a local folder, both say nothing, so they are silenced there (and only those two)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    with warnings.catch_warnings():
        if offline or (loaded_from and Path(loaded_from).is_dir()):
            warnings.filterwarnings("ignore", message=r"Unable to fetch remote file due to the "
                                    r"following error .* for the file config\.json in ")
            warnings.filterwarnings("ignore", message=r"Could not find a config file in .* - "
                                    r"will assume that the vocabulary was not modified")
        yield


def _name_base_portably(model) -> dict:
    from tunelab.model.load import describe_base

    base = describe_base(model.get_base_model().name_or_path)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base["hub_id"] or base["reference"]
    return base


def model_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """The decoder body, output layer and logit soft-cap of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return body, base.get_output_embeddings(), softcap
