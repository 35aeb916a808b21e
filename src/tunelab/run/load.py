"""A run's model, loaded to run: the base as it was trained, with the run's adapter or weights.

Every command that runs a run's model (generate, chat, eval, serve, export) loads it here, so
each gets the model that was trained. The base an adapter trained on is found on this machine by
:func:`run_base` (the config's ``model.path``, or in a run copied from elsewhere the base the
adapter's sidecar names) and loaded as it was trained: in 4 bits for QLoRA, whose adapter
corrects the NF4 weights (on a float base it would be another model). The run's data files need
not exist (``RunDir.read_config(need_data=False)``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import Config
from tunelab.errors import ModelError
from tunelab.model.adapters import METHODS
from tunelab.run.directory import RunDir, open_run


def load_run_model(run: str | Path | RunDir, *, base: bool = False,
                   dequantize: bool = False) -> tuple[Any, Any, Config]:
    """(model, tokenizer, config) of a run, ready to generate: base + adapter, or full weights.

    ``base=True`` gives the base without the adapter, for side-by-side comparisons.
    ``dequantize=True`` (export's merge) attaches a QLoRA adapter to its NF4 base de-quantised
    to float: merged into that, the model computes what was trained, whereas merging into the
    original float weights is off by the whole quantisation error and merging into 4-bit
    weights rounds the update away.
    """
    run, config = open_run(run, need_data=False)
    method = METHODS[config.method.kind]
    if not method.adapter:
        weights = None if base else (str(run.final_weights(config.method.kind)), None)
        model, tokenizer = load_base(config, reference=weights)
    else:
        model, tokenizer = load_run_base(run, config)
        if dequantize and method.load_in_4bit:
            # transformers' own: every Linear4bit becomes the float Linear it multiplied by,
            # and the quantisation config goes, so a merged folder loads without bitsandbytes
            model = model.dequantize()
        if not base:
            model = attach_adapter(model, run, config)
    model.eval()
    return model, tokenizer, config


def load_base(config: Config, *, reference: tuple[str, str | None] | None = None,
              load_in_4bit: bool = False) -> tuple[Any, Any]:
    """A model and its tokenizer loaded as ``config.model`` says (dtype, device, attention),
    from ``reference`` (model path or hub id, GGUF file) or else ``config.model``'s own."""
    from tunelab.model.load import load_model, load_tokenizer

    path, gguf_file = reference or (config.model.path, config.model.gguf_file)
    tokenizer = load_tokenizer(path, gguf_file)
    model = load_model(path, dtype=config.model.dtype, device=config.model.device,
                       gguf_file=gguf_file, attn_implementation=config.model.attn_implementation,
                       load_in_4bit=load_in_4bit)
    return model, tokenizer


def load_run_base(run: RunDir, config: Config, *,
                  base: tuple[str, str | None] | None = None) -> tuple[Any, Any]:
    """The base an adapter run trained on, as it trained on it, and its tokenizer.

    A QLoRA run's adapter corrects the NF4 weights, so its base is loaded in 4 bits again. The
    base is found with :func:`run_base`, unless ``base`` (model reference, GGUF file) names it.
    """
    load_in_4bit = METHODS[config.method.kind].load_in_4bit
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"{run} was trained with QLoRA on a 4-bit (NF4) base, and loading that base needs "
            "the bitsandbytes package, which is not installed; on a float base the adapter "
            "would not give the model that was trained",
            where=str(run), fix='pip install "tunelab[qlora]" (bitsandbytes >= 0.50 runs on '
            f"CPU and CUDA); or, where it is installed, run tunelab export {run} --to merged "
            "and use the merged folder (plain float weights) here")
    return load_base(config, reference=base or run_base(run, config), load_in_4bit=load_in_4bit)


def run_base(run: RunDir, config: Config) -> tuple[str, str | None]:
    """The model reference and GGUF file an adapter run's base loads from on this machine.

    The config's ``model.path`` while it exists here; in a run copied from another machine it
    names that machine's folder, so the base the adapter's sidecar names (its weights' hashes
    and hub id, :func:`tunelab.model.load.resolve_adapter_base`) is loaded instead.
    """
    from tunelab.model.load import resolve_adapter_base

    path = config.model.path
    local = path.startswith(("/", "~", ".")) or path.endswith(".gguf")
    if local and not Path(path).expanduser().exists():
        return resolve_adapter_base(run.adapter), None
    return path, config.model.gguf_file


def attach_adapter(model: Any, run: RunDir, config: Config, *, name: str = "default") -> Any:
    """``model`` with the run's final adapter loaded as ``name`` (a peft model takes it as one
    more adapter: serving puts several runs on one base). ModelError when it does not fit."""
    from peft import PeftModel

    folder = run.final_weights(config.method.kind)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(folder, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, folder, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:
        base = getattr(model, "name_or_path", None) or "this base"
        raise ModelError(f"the adapter of {run} does not fit the base {base}: "
                         f"{str(error).splitlines()[0]}", where=str(folder),
                         fix=f"load it on the base it was trained on ({config.model.path})"
                         ) from None


@dataclass(frozen=True)
class StartingPoint:
    """Where a run's training starts: the model to load and, for an adapter, its weights."""

    model_path: str
    gguf_file: str | None
    adapter: Path | None = None  # a finished run's adapter folder, loaded into the new adapter


def starting_point(config: Config) -> StartingPoint:
    """The base ``config.model`` names, or a finished run's result (``train.init_from``): its
    adapter, trained further by this run, or its full weights, loaded as the base."""
    if not config.train.init_from:
        return StartingPoint(config.model.path, config.model.gguf_file)
    where, fix = "train.init_from", "name a finished run directory (runs/NAME)"
    if not RunDir(config.train.init_from).is_run():
        raise ModelError(f"{config.train.init_from} is not a run directory", where=where, fix=fix)
    run, start = open_run(config.train.init_from, need_data=False)
    if not run.finished():
        raise ModelError(f"{run} has not finished training: there is no result to start from",
                         where=where, fix=f"finish it first (tunelab train --resume {run})")
    start_method, method = METHODS[start.method.kind], METHODS[config.method.kind]
    if not start_method.adapter:
        return StartingPoint(str(run.final_weights(start.method.kind)), None)
    if start.method.kind != config.method.kind or start.model.path != config.model.path:
        raise ModelError(
            f"{run} trained a {start.method.kind} adapter on {start.model.path}; this run is "
            f"{config.method.kind} on {config.model.path}", where=where,
            fix=f"set method.kind: {start.method.kind} and model.path: {start.model.path} (the "
            f"adapter goes on on its own base), or export it merged (tunelab export {run} --to "
            "merged) and give that folder as model.path" if method.adapter else
            f"export it merged (tunelab export {run} --to merged) and give that folder as "
            "model.path for full fine-tuning")
    return StartingPoint(config.model.path, config.model.gguf_file,
                         run.final_weights(start.method.kind))
