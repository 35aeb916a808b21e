"""Foreign configs (Axolotl, TRL, LLaMA-Factory) → a tunelab config, and what could not come.

``import_config(tool, path)`` reads the other tool's YAML and returns an ``Imported``: the
tunelab config as a plain dict (paths relative to the folder the config will be written to) and
one ``Row`` per foreign key: carried as it is, translated (with the numbers: ``micro_batch_size
2 × sequence_len 2048 → train.batch_tokens 4096``), taken from the tool's own default where the
file leaves a key to the tool (so the imported run trains as the foreign one did), or not carried
and why. The caller validates the dict with ``config.config_from_dict`` before writing it: the
config module imports this one (``foreign_config_error``, for a foreign config given to
``tunelab train``), so this one cannot import the config module back.

Paths: local data files are resolved against the foreign config's folder (then the working
directory, where these tools resolve them) and kept; hub dataset ids become ``hf://owner/name``
(read by ``datasets.load_dataset``); LLaMA-Factory's dataset names are looked up in its
``dataset_info.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import ConfigError

TOOLS = {"axolotl": "Axolotl", "trl": "TRL", "llamafactory": "LLaMA-Factory"}

#: Top-level keys only that tool's configs use; a config holding them and none of tunelab's
#: sections is that tool's.
MARKERS = {
    "axolotl": ("base_model", "micro_batch_size", "sequence_len", "num_epochs",
                "lora_target_linear", "sample_packing", "adapter", "val_set_size",
                "datasets", "lr_scheduler", "train_on_inputs", "rl"),
    "llamafactory": ("stage", "finetuning_type", "lora_rank", "lora_target", "cutoff_len",
                     "template", "dataset_dir", "do_train", "pref_beta", "quantization_bit",
                     "val_size", "dataset"),
    "trl": ("dataset_name", "use_peft", "max_seq_length", "dataset_text_field",
            "completion_only_loss", "assistant_only_loss", "dataset_train_split",
            "model_revision", "lora_r", "per_device_train_batch_size", "model_name_or_path"),
}
_TUNELAB_SECTIONS = ("model", "method", "data", "train", "eval", "rl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant",
              "constant_with_warmup": "constant"}


@dataclass
class Row:
    """One foreign key (or several read together) and what became of it."""

    source: str  # the foreign key(s) and values: "micro_batch_size 2 × sequence_len 2048"
    target: str | None  # the tunelab key and value: "train.batch_tokens 4096"; None: dropped
    note: str  # why, or what differs
    kind: str  # carried | translated | default | not carried


@dataclass
class Imported:
    """A foreign config as a tunelab config dict, and the rows of what was carried over."""

    tool: str
    source: Path
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def yaml(self) -> str:
        """The config as YAML, headed by where it came from."""
        head = (f"# Imported from {TOOLS[self.tool]} config {self.source.name} by tunelab config "
                "import;\n# what could not be carried over is listed by that command.\n")
        return head + yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True)


def default_output(path: str | os.PathLike) -> Path:
    """Where ``tunelab config import`` writes by default: ``NAME.tunelab.yaml`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tunelab.yaml")


# --- recognising a foreign config -----------------------------------------------------------


def recognise(raw: dict[str, Any]) -> tuple[str, list[str]] | None:
    """(tool, the marker keys found) for a config whose top level is another tool's, else None.

    A config with any of tunelab's sections is tunelab's (a misspelt key gets the usual hint).
    """
    if any(isinstance(raw.get(section), dict) for section in _TUNELAB_SECTIONS):
        return None
    found = {tool: [key for key in markers if key in raw] for tool, markers in MARKERS.items()}
    tool = max(found, key=lambda name: len(found[name]))
    return (tool, found[tool]) if found[tool] else None


def foreign_config_error(raw: dict[str, Any], path: str | os.PathLike) -> ConfigError | None:
    """The error for a foreign config given where a tunelab config belongs, naming the tool and
    the import command; None when ``raw`` is not recognisably another tool's."""
    match = recognise(raw)
    if match is None:
        return None
    tool, keys = match
    out = default_output(path)
    return ConfigError(
        f"this looks like {'an' if tool == 'axolotl' else 'a'} {TOOLS[tool]} config (it has "
        f"{', '.join(keys[:4])}), not a tunelab one",
        where=str(path),
        fix=f"convert it: tunelab config import --from {tool} {path} -o {out}, then tunelab "
        f"train {out} (the import lists what it could not carry over)",
    )


# --- the translation ------------------------------------------------------------------------


class _Translation:
    """A foreign config being read: its keys, the tunelab dict being built, the rows."""

    def __init__(self, tool: str, raw: dict[str, Any], base_dir: Path, out_dir: Path):
        self.tool, self.raw, self.base_dir, self.out_dir = tool, raw, base_dir, out_dir
        self.config: dict[str, Any] = {}
        self.rows: list[Row] = []
        self.used: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        """The foreign value (None counts as not set), marking the key as read."""
        self.used.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def given(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def set(self, dotted: str, value: Any) -> None:
        node = self.config
        *sections, last = dotted.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = value

    def row(self, source: str, target: str | None, note: str = "", kind: str = "carried"):
        self.rows.append(Row(source, target, note, kind))

    def carry(self, key: str, dotted: str, convert: Callable[[Any], Any] = lambda v: v, *,
              default: Any = None, note: str = "") -> None:
        """``key`` to ``dotted`` (converted); where the file leaves it out and ``default`` is
        given, the tool's default is carried (rows of kind default)."""
        if self.given(key):
            value = convert(self.get(key))
            self.set(dotted, value)
            self.row(f"{key} {_text(self.raw[key])}", f"{dotted} {_text(value)}", note)
        elif default is not None:
            self.used.add(key)
            self.set(dotted, default)
            self.row(f"{key} (not set)", f"{dotted} {_text(default)}",
                     f"{TOOLS[self.tool]}'s default" + (f"; {note}" if note else ""), "default")

    def drop(self, key: str, why: str) -> None:
        if self.given(key):
            self.used.add(key)
            self.row(f"{key} {_text(self.raw[key])}", None, why, "not carried")

    def path(self, spec: str, what: str) -> str | None:
        """A data path as tunelab reads it: a local file (relative to the output folder), or
        hf://owner/name for a hub id; None (with a row) when it is neither."""
        if spec.startswith("hf://"):
            return spec
        candidate = Path(os.path.expanduser(spec))
        for place in ([candidate] if candidate.is_absolute() else
                      [self.base_dir / candidate, Path.cwd() / candidate]):
            if place.exists():
                return _relative(place, self.out_dir)
        if _HUB_ID.match(spec):
            return f"hf://{spec}"
        self.row(f"{what} {spec}", None, f"not found beside the config ({self.base_dir}) or in "
                 "the working directory", "not carried")
        return None

    def finish(self, reasons: dict[str, str]) -> None:
        """Every key not read yet: a row saying why it has no tunelab counterpart."""
        for key, value in self.raw.items():
            if key in self.used or value in (None, "", [], {}):
                continue
            self.row(f"{key} {_text(value)}", None,
                     reasons.get(key, "no tunelab counterpart"), "not carried")


def import_config(tool: str, path: str | os.PathLike,
                  out: str | os.PathLike | None = None) -> Imported:
    """Translate the ``tool`` config at ``path`` (axolotl, trl or llamafactory); paths in the
    result are relative to the folder of ``out`` (default ``default_output(path)``)."""
    if tool not in TOOLS:
        raise ConfigError(f"unknown tool {tool!r}", where="tunelab config import --from",
                          fix=f"use one of {', '.join(TOOLS)}")
    path = Path(path)
    raw = _read_yaml(path)
    out_dir = Path(out if out is not None else default_output(path)).parent
    translation = _Translation(tool, raw, path.parent, out_dir)
    _name_the_run(translation, path)
    _TRANSLATORS[tool](translation)
    return Imported(tool, path, translation.config, translation.rows)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", where=str(path),
                          fix="pass the path of the other tool's YAML config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"is not valid YAML ({error})", where=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("is not a YAML mapping of settings", where=str(path))
    return raw


def _name_the_run(t: _Translation, path: Path) -> None:
    """The foreign output_dir becomes output_dir/name (tunelab's run directory)."""
    foreign = t.get("output_dir")
    if foreign:
        where = Path(str(foreign))
        name = _run_name(where.name) or _run_name(path.stem)
        t.config.update(name=name, output_dir=str(where.parent))
        t.row(f"output_dir {foreign}", f"output_dir {where.parent}, name {name}",
              "the run directory is output_dir/name, relative to the working directory",
              "translated")
    else:
        t.config["name"] = _run_name(path.stem)


def _run_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return name or "imported"


# --- what the three tools share -------------------------------------------------------------


def _model(t: _Translation, key: str) -> None:
    model = t.get(key)
    if model is None:
        raise ConfigError(f"the config has no {key}", where=key,
                          fix=f"add {key}: the base model's hub id or folder")
    model = str(model)
    local = Path(os.path.expanduser(model))
    local = local if local.is_absolute() else t.base_dir / local
    if model.startswith((".", "/", "~")) and local.exists():
        value = _relative(local, t.out_dir)
        t.set("model.path", value if value.startswith((".", "/")) else f"./{value}")
        t.row(f"{key} {model}", f"model.path {t.config['model']['path']}")
    else:
        t.set("model.path", model)
        t.row(f"{key} {model}", f"model.path {model}", "a hub id is loaded from the local "
              "Hugging Face cache; tunelab never downloads")


def _batch(t: _Translation, batch_key: str, batch_default: int, length_key: str,
           length_default: int | None) -> None:
    """Rows × their length → tokens per micro-batch (tunelab counts tokens, not examples)."""
    rows = int(t.get(batch_key, batch_default))
    length = t.get(length_key)
    if length is None and length_key == "max_length":
        length = t.get("max_seq_length")  # TRL's name before 0.20
        length_key = "max_seq_length" if length is not None else length_key
    source = "" if t.given(length_key) else f" ({TOOLS[t.tool]}'s default)"
    length = int(length if length is not None else length_default or 1024)
    t.set("train.max_seq_len", length)
    t.set("train.batch_tokens", rows * length)
    t.row(f"{length_key} {length}{source}", f"train.max_seq_len {length}")
    t.row(f"{batch_key} {rows}" + ("" if t.given(batch_key) else " (default)")
          + f" × {length_key} {length}", f"train.batch_tokens {rows * length}",
          "tunelab sizes a micro-batch in tokens: as many examples as fit", "translated")


def _accumulation(t: _Translation, key: str = "gradient_accumulation_steps") -> None:
    steps = int(t.get(key, 1))
    t.set("train.grad_accum", steps)
    if t.given(key):
        tokens = t.config["train"]["batch_tokens"] * steps
        t.row(f"{key} {steps}", f"train.grad_accum {steps}",
              f"{tokens} tokens per optimizer step (batch_tokens × grad_accum)")


def _schedule(t: _Translation, key: str, default: str) -> None:
    name = str(t.get(key, default))
    if name in _SCHEDULES:
        t.set("train.schedule", _SCHEDULES[name])
        kind = "carried" if t.given(key) else "default"
        t.row(f"{key} {name}" + ("" if t.given(key) else " (not set)"),
              f"train.schedule {_SCHEDULES[name]}",
              "" if t.given(key) else f"{TOOLS[t.tool]}'s default", kind)
    else:
        t.row(f"{key} {name}", None, "tunelab schedules are cosine, linear and constant; "
              "tunelab's cosine is used", "not carried")


def _warmup(t: _Translation, ratio_default: float | None) -> None:
    if t.given("warmup_steps") and int(t.get("warmup_steps")) > 0:
        t.carry("warmup_steps", "train.warmup_steps", int)
    elif t.given("warmup_ratio"):
        t.carry("warmup_ratio", "train.warmup_ratio", float)
    elif ratio_default is not None:
        t.used.add("warmup_steps")
        t.carry("warmup_ratio", "train.warmup_ratio", float, default=ratio_default)


def _optimizer(t: _Translation, key: str) -> None:
    name = t.get(key)
    if name is None:
        return
    if str(name).startswith("adamw"):
        t.row(f"{key} {name}", "AdamW", "tunelab's optimizer (32-bit state; 8-bit and fused "
              "variants make the same update)", "translated")
    else:
        t.row(f"{key} {name}", None, "tunelab trains with AdamW", "not carried")


def _precision(t: _Translation) -> None:
    """bf16 / fp16 mixed precision → model.dtype auto: tunelab trains in the weights' dtype."""
    for key in ("bf16", "fp16", "bfloat16", "float16", "tf32"):
        if not t.given(key):
            continue
        value = t.get(key)
        if key == "tf32" or value is False:
            t.row(f"{key} {_text(value)}", None, "tunelab has no such switch", "not carried")
            continue
        t.set("model.dtype", "auto")
        t.row(f"{key} {_text(value)}", "model.dtype auto", "bfloat16 weights on a GPU that "
              "supports them, else float32 (tunelab trains in the weights' dtype, without "
              "autocast)", "translated")


def _lora(t: _Translation, rank_key: str, rank_default: int | None, alpha_default: Any,
          dropout_default: float | None) -> None:
    t.carry(rank_key, "method.r", int, default=rank_default)
    alpha = alpha_default(t) if callable(alpha_default) else alpha_default
    t.carry("lora_alpha", "method.alpha", float, default=alpha)
    t.carry("lora_dropout", "method.dropout", float, default=dropout_default)


def _steps_and_logging(t: _Translation, *, logging_default: int | None) -> None:
    t.carry("seed", "train.seed", int, default=42 if t.tool != "axolotl" else None)
    if t.given("max_steps") and int(t.raw["max_steps"]) > 0:
        t.carry("max_steps", "train.max_steps", int)
    else:
        t.used.add("max_steps")
    t.carry("weight_decay", "train.weight_decay", float)
    t.carry("max_grad_norm", "train.max_grad_norm", float)
    t.carry("logging_steps", "train.log_every", int, default=logging_default)
    t.carry("save_steps", "train.save_every", int)
    t.carry("eval_steps", "train.eval_every", int)
    t.carry("save_total_limit", "train.keep_checkpoints", int)
    if t.given("gradient_checkpointing"):
        t.carry("gradient_checkpointing", "train.gradient_checkpointing", bool)


def _trackers(t: _Translation, names: list[str]) -> None:
    known = [name for name in names if name in ("tensorboard", "mlflow", "wandb", "trackio")]
    if known:
        t.set("train.report_to", known)
        t.row(f"report_to {', '.join(names)}", f"train.report_to {known}")


# --- Axolotl --------------------------------------------------------------------------------

_AXOLOTL_TYPES = {
    "alpaca": "instruction (Alpaca)", "sharegpt": "sharegpt", "completion": "text",
    "pretrain": "text", "chat_template": "chat",
}
_AXOLOTL_REASONS = {
    "special_tokens": "tunelab uses the tokenizer's special tokens as they are",
    "deepspeed": "tunelab runs under torchrun with train.distributed (ddp or fsdp)",
    "fsdp": "tunelab runs under torchrun with train.distributed: fsdp",
    "fsdp_config": "tunelab runs under torchrun with train.distributed: fsdp",
    "dataset_prepared_path": "tunelab tokenizes at the start of every run",
    "evals_per_epoch": "tunelab counts in steps: set train.eval_every",
    "saves_per_epoch": "tunelab counts in steps: set train.save_every",
    "hub_model_id": "tunelab never uploads; tunelab export writes the files",
    "load_in_8bit": "tunelab quantises to 4-bit only (method.kind: qlora)",
    "strict": "an Axolotl setting", "tokenizer_type": "the model's own tokenizer is used",
    "model_type": "the model's own class is used", "trust_remote_code":
    "tunelab loads only architectures transformers ships",
    "lora_model_dir": "start from a finished tunelab run with train.init_from",
    "resume_from_checkpoint": "tunelab train --resume RUN resumes a tunelab run",
    "wandb_entity": "W&B reads WANDB_ENTITY", "wandb_name": "the run's name is used",
}


def _axolotl(t: _Translation) -> None:
    _model(t, "base_model")
    adapter = t.get("adapter")
    kind = {"lora": "lora", "qlora": "qlora", None: "full", "": "full"}.get(adapter)
    if kind is None:
        raise ConfigError(f"adapter {adapter!r} has no tunelab method (lora, qlora, or no "
                          "adapter for full fine-tuning)", where="adapter",
                          fix="set adapter to lora or qlora")
    if kind == "lora" and t.get("load_in_4bit") is True:
        kind = "qlora"
    if t.get("peft_use_dora") is True:
        kind = "dora"
    t.set("method.kind", kind)
    t.row(f"adapter {adapter or '(none)'}" + (" + load_in_4bit" if t.raw.get("load_in_4bit")
                                            else ""), f"method.kind {kind}",
          "" if adapter else "no adapter: every weight trains", "translated")
    if kind != "full":
        _lora(t, "lora_r", None, None, None)
        if t.get("lora_target_linear") is True:
            t.set("method.targets", "all-linear")
            t.row("lora_target_linear true", "method.targets all-linear")
            t.used.add("lora_target_modules")
        else:
            t.carry("lora_target_modules", "method.targets", list)
        t.carry("peft_use_rslora", "method.rslora", bool)
    _axolotl_objective(t)
    _axolotl_data(t)
    _batch(t, "micro_batch_size", 1, "sequence_len", 512)
    _accumulation(t)
    sample_packing = bool(t.get("sample_packing", False))
    t.set("train.packing", sample_packing)
    t.row(f"sample_packing {_text(sample_packing)}" + ("" if t.given("sample_packing")
                                                       else " (not set)"),
          f"train.packing {_text(sample_packing)}",
          "tunelab's packing keeps attention within each example, as Axolotl's does")
    t.carry("num_epochs", "train.epochs", float, default=1.0)
    t.carry("learning_rate", "train.lr", float)
    _schedule(t, "lr_scheduler", "cosine")
    _warmup(t, None)
    if not (t.given("warmup_steps") or t.given("warmup_ratio")):
        t.row("warmup_steps, warmup_ratio (not set)", "train.warmup_ratio 0.03 (tunelab's "
              "default)", "Axolotl warms up for 3% of the steps, at most 100", "default")
    _optimizer(t, "optimizer")
    _precision(t)
    _steps_and_logging(t, logging_default=None)
    if t.get("attn_implementation") in ("sdpa", "eager", "flash_attention_2"):
        t.carry("attn_implementation", "model.attn_implementation")
    if t.get("flash_attention") is True:
        t.set("model.attn_implementation", "flash_attention_2")
        t.row("flash_attention true", "model.attn_implementation flash_attention_2")
    trackers = (["tensorboard"] if t.get("use_tensorboard") else []) + \
        (["wandb"] if t.get("wandb_project") else []) + \
        (["mlflow"] if t.get("mlflow_tracking_uri") or t.get("mlflow_experiment_name") else [])
    _trackers(t, trackers)
    t.finish(_AXOLOTL_REASONS)


def _axolotl_objective(t: _Translation) -> None:
    rl = t.get("rl")
    if rl is None:
        return
    objective = {"dpo": "dpo", "simpo": "simpo", "kto": "kto", "grpo": "grpo"}.get(str(rl))
    if objective is None:
        raise ConfigError(f"rl: {rl} has no tunelab objective", where="rl",
                          fix="tunelab trains sft, dpo, simpo, kto, grpo and rloo "
                          "(docs/objectives.md)")
    t.set("method.objective", objective)
    t.row(f"rl {rl}", f"method.objective {objective}")
    t.carry("rl_beta", "method.beta", float)
    t.carry("simpo_gamma", "method.simpo_gamma", float)
    t.carry("kto_desirable_weight", "method.desirable_weight", float)
    t.carry("kto_undesirable_weight", "method.undesirable_weight", float)
    if objective == "grpo":
        t.row("rl grpo: trl.reward_funcs", None, "set rl.rewards in the imported config "
              "(python:module:function, TRL's signature)", "not carried")


def _axolotl_data(t: _Translation) -> None:
    for key, target in (("datasets", "data.train"), ("test_datasets", "data.validation")):
        paths = []
        for index, spec in enumerate(t.get(key, [])):
            path = _axolotl_dataset(t, f"{key}[{index}]", spec)
            if path is not None:
                paths.append(path)
        if paths:
            t.set(target, paths)
    size = float(t.get("val_set_size", 0.0))
    if 0 < size < 1 and "validation" not in t.config.get("data", {}):
        t.carry("val_set_size", "data.validation_split", float)
    elif size >= 1:
        t.row(f"val_set_size {_text(size)}", None, "tunelab holds out a fraction below 1 "
              "(data.validation_split)", "not carried")
    if t.get("train_on_inputs") is True:
        t.set("data.train_on", "all")
        t.row("train_on_inputs true", "data.train_on all")
    template = t.get("chat_template")
    if template not in (None, "tokenizer_default") and not str(template).startswith(
            "tokenizer_default_fallback"):
        t.row(f"chat_template {template}", None, "tunelab renders chat with the tokenizer's "
              "own template (ChatML when it has none); data.chat_template takes a Jinja "
              "template", "not carried")
    jinja = t.get("chat_template_jinja")
    if jinja:
        file = t.base_dir / str(jinja)
        t.set("data.chat_template", file.read_text() if file.is_file() else str(jinja))
        t.row("chat_template_jinja", "data.chat_template (the same Jinja template)")
    t.carry("default_system_message", "data.chat_template_kwargs",
            lambda text: {"system_message": text},
            note="only templates that read system_message use it")


def _axolotl_dataset(t: _Translation, where: str, spec: Any) -> str | None:
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict) or not spec.get("path"):
        t.row(where, None, "a dataset without a path", "not carried")
        return None
    path = t.path(str(spec["path"]), f"{where}.path")
    if path is None:
        return None
    if path.startswith("hf://") and spec.get("split") not in (None, "train"):
        path += f"::{spec['split']}"
    kind = str(spec.get("type") or "")
    base = kind.split(".")[0].split(":")[0]
    fields = spec.get("field_messages")
    mappings = spec.get("message_property_mappings") or {}
    if spec.get("message_field_role") or spec.get("message_field_content"):
        mappings = {"role": spec.get("message_field_role", "role"),
                    "content": spec.get("message_field_content", "content")}
    read_as = _AXOLOTL_TYPES.get(base, "by its keys")
    if base == "chat_template" and (fields == "conversations" or mappings.get("role") == "from"):
        read_as = "sharegpt"
    if spec.get("field_chosen") or t.raw.get("rl"):
        read_as = "preference data, by its keys (docs/objectives.md)"
    t.row(f"{where} {spec['path']} (type {kind or 'unset'})", f"data {path}",
          f"read as {read_as}; tunelab detects each file's format from its keys",
          "translated")
    unusual = {key: value for key, value in spec.items() if value is not None and key not in (
        "path", "type", "split", "ds_type", "data_files", "conversation")
        and not (key == "field_messages" and value in ("conversations", "messages"))
        and not (key == "message_property_mappings" and dict(value) in (
            {"role": "role", "content": "content"}, {"role": "from", "content": "value"}))
        and not (key == "roles_to_train" and value == ["assistant"])}
    for key, value in unusual.items():
        t.row(f"{where}.{key} {_text(value)}", None, "tunelab reads the turns from "
              "conversations (from / value) or messages (role / content) and trains the "
              "assistant's: rename the columns to those", "not carried")
    if spec.get("data_files") and path.startswith("hf://"):
        t.row(f"{where}.data_files {_text(spec['data_files'])}", None, "hf:// reads a dataset's "
              "splits; download the file and point data.train at it", "not carried")
    return path


# --- TRL ------------------------------------------------------------------------------------

_LOADERS = ("json", "csv", "parquet", "text")  # datasets' builders that read data_files
_TRL_DPO_KEYS = ("beta", "loss_type", "max_prompt_length", "rpo_alpha", "reference_free",
                 "precompute_ref_log_probs", "ref_model_init_kwargs", "label_smoothing")
_TRL_KTO_KEYS = ("desirable_weight", "undesirable_weight")
_TRL_REASONS = {
    "eval_strategy": "tunelab measures the validation loss every train.eval_every steps",
    "dataset_text_field": "tunelab reads the text column of text data ({\"text\"})",
    "model_revision": "the hub id's cached revision is used", "trust_remote_code":
    "tunelab loads only architectures transformers ships",
    "push_to_hub": "tunelab never uploads", "hub_model_id": "tunelab never uploads",
    "load_in_8bit": "tunelab quantises to 4-bit only (method.kind: qlora)",
    "lora_task_type": "always a causal LM", "per_device_eval_batch_size":
    "validation batches are sized like training's",
}


def _trl(t: _Translation) -> None:
    _model(t, "model_name_or_path")
    dtype = t.get("dtype", t.get("torch_dtype"))
    t.used.add("torch_dtype")
    if dtype is not None:
        t.set("model.dtype", str(dtype))
        t.row(f"dtype {dtype}", f"model.dtype {dtype}")
    if t.get("attn_implementation"):
        t.carry("attn_implementation", "model.attn_implementation")
    objective = "sft"
    if any(t.given(key) for key in _TRL_KTO_KEYS):
        objective = "kto"
    elif any(t.given(key) for key in _TRL_DPO_KEYS):
        objective = "dpo"
    t.set("method.objective", objective)
    t.row(f"(keys of {'trl sft' if objective == 'sft' else 'trl ' + objective})",
          f"method.objective {objective}", "read from the arguments the config sets",
          "translated")
    if t.get("use_peft") is True:
        kind = "qlora" if t.get("load_in_4bit") is True else (
            "dora" if t.get("use_dora") is True else "lora")
        t.set("method.kind", kind)
        t.row("use_peft true", f"method.kind {kind}", "", "translated")
        _lora(t, "lora_r", 16, 32.0, 0.05)
        targets = t.get("lora_target_modules")
        if targets is not None:
            value = "all-linear" if targets in ("all-linear", ["all-linear"]) else list(targets)
            t.set("method.targets", value)
            t.row(f"lora_target_modules {_text(targets)}", f"method.targets {_text(value)}")
        t.carry("use_rslora", "method.rslora", bool)
    else:
        t.set("method.kind", "full")
        t.row("use_peft (not set)" if not t.given("use_peft") else "use_peft false",
              "method.kind full", "TRL trains every weight without use_peft", "default")
    if objective != "sft":
        t.carry("beta", "method.beta", float, default=0.1)
        t.carry("desirable_weight", "method.desirable_weight", float)
        t.carry("undesirable_weight", "method.undesirable_weight", float)
        loss = t.get("loss_type")
        if loss not in (None, "sigmoid", ["sigmoid"], "kto"):
            t.row(f"loss_type {_text(loss)}", None, "tunelab's DPO loss is TRL's sigmoid",
                  "not carried")
    _trl_data(t, objective)
    _batch(t, "per_device_train_batch_size", 8, "max_length", 1024)
    _accumulation(t)
    t.carry("packing", "train.packing", bool, default=False,
            note="TRL's packing lets examples attend to each other unless padding_free; "
            "tunelab's never does")
    t.used.add("padding_free")
    t.carry("num_train_epochs", "train.epochs", float, default=3.0)
    t.carry("learning_rate", "train.lr", float, default=2e-5 if objective == "sft" else 1e-6)
    _schedule(t, "lr_scheduler_type", "linear")
    _warmup(t, 0.0)
    _optimizer(t, "optim")
    _precision(t)
    _steps_and_logging(t, logging_default=10)
    report = t.get("report_to")
    if report not in (None, "none", ["none"]):
        _trackers(t, [report] if isinstance(report, str) else list(report))
    t.finish(_TRL_REASONS)


def _trl_data(t: _Translation, objective: str) -> None:
    specs = []
    if t.given("dataset_name"):
        specs.append((f"dataset_name {t.get('dataset_name')}", str(t.raw["dataset_name"]),
                      str(t.get("dataset_train_split", "train"))))
    for index, spec in enumerate(t.get("datasets", [])):
        if not isinstance(spec, dict) or not spec.get("path"):
            continue
        split = str(spec.get("split", "train"))
        if spec["path"] in _LOADERS and spec.get("data_files"):  # load_dataset("json", ...)
            files = spec["data_files"]
            for file in [files] if isinstance(files, str) else list(files):
                specs.append((f"datasets[{index}].data_files", str(file), split))
        else:
            specs.append((f"datasets[{index}]", str(spec["path"]), split))
    paths = []
    for where, spec, split in specs:
        path = t.path(spec, where)
        if path is None:
            continue
        if path.startswith("hf://") and split != "train":
            path += f"::{split}"
        paths.append(path)
        t.row(where, f"data.train {path}", "read by its keys: TRL's prompt-completion (strings "
              "or messages), messages, text, or preference pairs", "translated")
    if paths:
        t.set("data.train", paths)
    if t.given("dataset_config"):
        t.drop("dataset_config", "hf:// reads a dataset's default configuration; save the one "
               "you want with save_to_disk and point data.train at the folder")
    strategy = t.get("eval_strategy", "no")
    test_split = t.get("dataset_test_split", "test")
    if strategy != "no" and paths and paths[0].startswith("hf://"):
        validation = f"{paths[0].split('::')[0]}::{test_split}"
        t.set("data.validation", [validation])
        t.row(f"eval_strategy {strategy}, dataset_test_split {test_split}",
              f"data.validation {validation}")
    if objective == "sft":
        if t.get("completion_only_loss") is False:
            t.set("data.train_on", "all")
            t.row("completion_only_loss false", "data.train_on all")
        if t.given("assistant_only_loss"):
            t.row(f"assistant_only_loss {_text(t.get('assistant_only_loss'))}",
                  "data.train_on completion", "tunelab trains assistant turns only")
        else:
            t.row("assistant_only_loss (not set)", "data.train_on completion",
                  "TRL trains every token of messages data by default, tunelab the assistant's "
                  "turns; set data.train_on: all for TRL's behaviour", "default")


# --- LLaMA-Factory --------------------------------------------------------------------------

_LLAMAFACTORY_REASONS = {
    "template": "tunelab renders chat with the tokenizer's own template (ChatML when it has "
    "none); data.chat_template takes a Jinja template",
    "do_train": "tunelab train trains", "overwrite_output_dir": "a tunelab run directory is "
    "never overwritten; --resume continues it", "overwrite_cache": "tunelab keeps no cache",
    "preprocessing_num_workers": "tunelab tokenizes in batches in one process",
    "dataloader_num_workers": "tunelab keeps the tokenized data in memory",
    "plot_loss": "tunelab report draws the loss curves", "ddp_timeout":
    "train.distributed_timeout_s, in seconds", "max_samples": "tunelab reads every record",
    "trust_remote_code": "tunelab loads only architectures transformers ships",
    "save_only_model": "tunelab checkpoints keep what an exact resume needs",
    "deepspeed": "tunelab runs under torchrun with train.distributed (ddp or fsdp)",
    "mask_history": "tunelab trains every assistant turn of a conversation",
    "resume_from_checkpoint": "tunelab train --resume RUN resumes a tunelab run",
    "per_device_eval_batch_size": "validation batches are sized like training's",
    "eval_strategy": "tunelab measures the validation loss every train.eval_every steps",
}


def _llamafactory(t: _Translation) -> None:
    _model(t, "model_name_or_path")
    stage = str(t.get("stage", "sft"))
    pref_loss = str(t.get("pref_loss", "sigmoid"))
    objective = {"sft": "sft", "pt": "sft", "kto": "kto",
                 "dpo": {"sigmoid": "dpo", "simpo": "simpo"}.get(pref_loss)}.get(stage)
    if objective is None:
        what = f"stage {stage}" + (f" with pref_loss {pref_loss}" if stage == "dpo" else "")
        raise ConfigError(f"{what} has no tunelab objective", where="stage",
                          fix="tunelab trains sft, dpo, simpo, kto, grpo and rloo "
                          "(docs/objectives.md)")
    t.set("method.objective", objective)
    t.row(f"stage {stage}" + (f", pref_loss {pref_loss}" if stage == "dpo" else ""),
          f"method.objective {objective}", "pt: text data trains every token" if stage == "pt"
          else "")
    kind = str(t.get("finetuning_type", "lora"))
    if kind == "lora":
        quantized = t.get("quantization_bit")
        kind = "qlora" if quantized == 4 else ("dora" if t.get("use_dora") else "lora")
        if quantized not in (None, 4):
            t.row(f"quantization_bit {quantized}", None, "tunelab quantises to 4-bit only",
                  "not carried")
        t.set("method.kind", kind)
        t.row("finetuning_type lora" + (", quantization_bit 4" if kind == "qlora" else ""),
              f"method.kind {kind}")
        _lora(t, "lora_rank", 8, lambda tr: 2.0 * int(tr.raw.get("lora_rank") or 8), 0.0)
        target = str(t.get("lora_target", "all"))
        value = "all-linear" if target == "all" else [name.strip() for name in
                                                      target.split(",")]
        t.set("method.targets", value)
        t.row(f"lora_target {target}", f"method.targets {_text(value)}")
        t.carry("use_rslora", "method.rslora", bool)
    elif kind == "full":
        t.set("method.kind", "full")
        t.row("finetuning_type full", "method.kind full")
    else:
        t.row(f"finetuning_type {kind}", None, "tunelab tunes adapters (lora, dora, qlora) or "
              "every weight (full); tunelab's lora is used", "not carried")
    if objective != "sft":
        t.carry("pref_beta", "method.beta", float, default=0.1)
        t.carry("pref_ftx", "method.sft_weight", float)
        t.carry("simpo_gamma", "method.simpo_gamma", float)
        t.carry("kto_chosen_weight", "method.desirable_weight", float)
        t.carry("kto_rejected_weight", "method.undesirable_weight", float)
    _llamafactory_data(t)
    _batch(t, "per_device_train_batch_size", 8, "cutoff_len", 2048)
    _accumulation(t)
    packing = t.get("packing")
    neat = t.get("neat_packing") is True
    if packing is True and not neat:
        t.set("train.packing", True)
        t.row("packing true", "train.packing true", "LLaMA-Factory's packing lets examples "
              "attend to each other (unless neat_packing); tunelab's never does")
    else:
        value = neat or (packing is None and stage == "pt")
        t.set("train.packing", value)
        t.row(f"packing {_text(packing) if packing is not None else '(not set)'}"
              + (", neat_packing true" if neat else ""),
              f"train.packing {_text(value)}")
    t.carry("num_train_epochs", "train.epochs", float, default=3.0)
    t.carry("learning_rate", "train.lr", float, default=5e-5)
    _schedule(t, "lr_scheduler_type", "linear")
    _warmup(t, 0.0)
    _optimizer(t, "optim")
    _precision(t)
    _steps_and_logging(t, logging_default=None)
    flash = t.get("flash_attn")
    if flash in ("fa2", "sdpa"):
        value = "flash_attention_2" if flash == "fa2" else "sdpa"
        t.set("model.attn_implementation", value)
        t.row(f"flash_attn {flash}", f"model.attn_implementation {value}")
    report = t.get("report_to")
    if report not in (None, "none", ["none"]):
        _trackers(t, [report] if isinstance(report, str) else list(report))
    t.finish(_LLAMAFACTORY_REASONS)


def _llamafactory_data(t: _Translation) -> None:
    dataset_dir = str(t.get("dataset_dir", "data"))
    info, info_path = _dataset_info(t, dataset_dir)
    for key, target in (("dataset", "data.train"), ("eval_dataset", "data.validation")):
        names = t.get(key)
        if names is None:
            continue
        names = names if isinstance(names, list) else str(names).split(",")
        paths = [path for name in names
                 if (path := _llamafactory_dataset(t, key, name.strip(), info, info_path,
                                                   dataset_dir)) is not None]
        if paths:
            t.set(target, paths)
    if "validation" not in t.config.get("data", {}):
        t.carry("val_size", "data.validation_split", float)
    if t.get("train_on_prompt") is True:
        t.set("data.train_on", "all")
        t.row("train_on_prompt true", "data.train_on all")


def _dataset_info(t: _Translation, dataset_dir: str) -> tuple[dict, Path | None]:
    """LLaMA-Factory's dataset_info.json: beside the config, or in the working directory."""
    for folder in (t.base_dir / dataset_dir, Path.cwd() / dataset_dir):
        candidate = folder / "dataset_info.json"
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text(encoding="utf-8")), candidate
            except json.JSONDecodeError as error:
                raise ConfigError(f"is not valid JSON ({error.msg})",
                                  where=f"{candidate}:{error.lineno}") from None
    return {}, None


def _llamafactory_dataset(t: _Translation, key: str, name: str, info: dict,
                          info_path: Path | None, dataset_dir: str) -> str | None:
    entry = info.get(name)
    if entry is None:
        if dataset_dir == "ONLINE" or _HUB_ID.match(name):
            path = f"hf://{name}"
            t.row(f"{key} {name}", f"data {path}", "a hub dataset id", "translated")
            return path
        where = str(info_path) if info_path else f"{dataset_dir}/dataset_info.json (not found)"
        t.row(f"{key} {name}", None, f"not registered in {where}", "not carried")
        return None
    if entry.get("file_name"):
        path = t.path(str(Path(info_path.parent, entry["file_name"])), f"{key} {name}")
    elif entry.get("hf_hub_url"):
        path = f"hf://{entry['hf_hub_url']}"
        if entry.get("split") not in (None, "train"):
            path += f"::{entry['split']}"
    else:
        t.row(f"{key} {name}", None, "only file_name and hf_hub_url entries are read",
              "not carried")
        return None
    if path is None:
        return None
    formatting = entry.get("formatting", "alpaca")
    t.row(f"{key} {name}", f"data {path}", f"{formatting} data, read by its keys (tunelab "
          "detects each file's format)", "translated")
    if entry.get("columns") or entry.get("tags"):
        custom = {**entry.get("columns", {}), **entry.get("tags", {})}
        default = {"messages": "conversations", "system": "system", "tools": "tools",
                   "prompt": "instruction", "query": "input", "response": "output",
                   "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag",
                   "role_tag": "from", "content_tag": "value", "user_tag": "human",
                   "assistant_tag": "gpt", "observation_tag": "observation",
                   "function_tag": "function_call", "system_tag": "system"}
        renamed = {k: v for k, v in custom.items() if default.get(k) != v}
        if renamed:
            t.row(f"{key} {name}: columns/tags {_text(renamed)}", None, "tunelab reads "
                  "ShareGPT's and Alpaca's standard names: rename the columns", "not carried")
    return path


_TRANSLATORS: dict[str, Callable[[_Translation], None]] = {
    "axolotl": _axolotl, "trl": _trl, "llamafactory": _llamafactory}


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when it lies below it, else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def _text(value: Any) -> str:
    """A value as the table shows it: lists joined, numbers as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
