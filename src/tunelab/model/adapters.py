"""LoRA / DoRA / rsLoRA adapters through peft; full fine-tuning leaves the model as it is."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from tunelab.errors import ConfigError, RunError


def apply_method(model: nn.Module, *, kind: str, r: int, alpha: float, dropout: float,
                 targets: str | list[str], rslora: bool) -> nn.Module:
    """Wrap ``model`` with a peft adapter (lora, dora), or make every weight trainable (full)."""
    if kind == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        use_dora=kind == "dora", use_rslora=rslora, bias="none",
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as error:
        available = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                            if isinstance(module, nn.Linear)})
        raise ConfigError(f"method.targets {targets!r} does not fit this model: {error}",
                          where="method.targets",
                          fix=f"use 'all-linear' or names of linear layers: {', '.join(available)}"
                          ) from None


def trainable_state(model: nn.Module) -> dict:
    """The trainable tensors only (the adapter, or everything for full fine-tuning)."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: tensor for name, tensor in model.state_dict().items() if name in names}


def save_final(model: nn.Module, tokenizer, folder: Path) -> None:
    """PEFT format (adapter_config.json + adapter_model.safetensors) or full safetensors weights."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_tuned(base: nn.Module, run_dir: Path) -> nn.Module:
    """Attach a run's final adapter to ``base``; full fine-tuned runs are loaded by the caller."""
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunError(f"{run_dir} has no final adapter (adapter/adapter_config.json)",
                       where=str(run_dir),
                       fix=f"finish training first: tunelab train --resume {run_dir}")
    return PeftModel.from_pretrained(base, adapter)


def load_run_model(run_dir: str | Path, *, base: bool = False):
    """The model of a run ready to generate: base + adapter (or full weights), tokenizer, config.

    ``base=True`` gives the untouched base model, for side-by-side comparisons.
    """
    from tunelab.model.load import load_model, load_tokenizer
    from tunelab.runs import open_run

    run_dir, config = open_run(run_dir)
    full = run_dir / "model"
    if config.method.kind == "full" and not base:
        if not (full / "config.json").is_file():
            raise RunError(f"{run_dir} has no final weights (model/config.json)",
                           where=str(run_dir),
                           fix=f"finish training first: tunelab train --resume {run_dir}")
        path, gguf_file = str(full), None
    else:
        path, gguf_file = config.model.path, config.model.gguf_file
    tokenizer = load_tokenizer(path, gguf_file)
    model = load_model(path, dtype=config.model.dtype, device=config.model.device,
                       gguf_file=gguf_file, attn_implementation=config.model.attn_implementation)
    if config.method.kind != "full" and not base:
        model = load_tuned(model, run_dir)
    model.eval()
    return model, tokenizer, config
