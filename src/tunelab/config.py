"""The YAML config schema as pydantic models; ``load_config`` makes every mistake a ConfigError.

Relative paths in a config file (data files, a local model folder) are resolved against the
folder that holds the config file, so an example runs from any working directory.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The base model: a local folder, a hub id, a .gguf file, or the embedded default."""

    path: str = "embedded:smollm2-135m-instruct"
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "auto"
    device: str = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


class MethodConfig(_Section):
    """How the model is tuned: a LoRA-family adapter (the default) or all weights."""

    kind: Literal["lora", "dora", "full"] = "lora"
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    targets: str | list[str] = "all-linear"
    rslora: bool = False


class DataConfig(_Section):
    """Data files, their format, and which tokens carry the loss."""

    train: list[str]
    validation: list[str] = []
    test: list[str] = []
    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    format: Literal["auto", "chat", "instruction", "completion", "text", "template"] = "auto"
    prompt: str | None = None
    completion: str | None = None
    train_on: Literal["completion", "all"] = "completion"
    chat_template: str | None = None

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _template_pair(self) -> DataConfig:
        if (self.prompt is None) != (self.completion is None):
            missing = "completion" if self.completion is None else "prompt"
            raise ValueError(
                f"template mode needs both data.prompt and data.completion; data.{missing} is "
                "missing"
            )
        return self


class TrainConfig(_Section):
    """The optimisation: length, learning rate, batches, logging, checkpoints."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    batch_tokens: int = Field(4096, ge=8)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(1024, ge=8)
    packing: bool = True
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0)
    save_every: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    gradient_checkpointing: bool = False
    loss_chunk_tokens: int = Field(2048, ge=16)
    samples: int = Field(3, ge=0)
    max_new_tokens: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainConfig:
        if self.batch_tokens < self.max_seq_len and self.packing is False:
            raise ValueError(
                f"train.batch_tokens ({self.batch_tokens}) is smaller than train.max_seq_len "
                f"({self.max_seq_len}): a long example would not fit in a batch"
            )
        return self


class EvalConfig(_Section):
    """How a model is evaluated: the task, its prompts, and the statistics."""

    task: Literal["classification", "ner", "translation", "qa", "summarisation"] = \
        "classification"
    split: Literal["test", "validation"] = "test"
    labels: list[str] = []
    entity_types: list[str] = []
    predict: Literal["score", "generate", "both"] = "score"
    prompt_variants: list[str] = []
    shots: int = Field(0, ge=0)
    context: str | None = None  # the text answers must come from, e.g. "{text}"; for grounding
    max_new_tokens: int = Field(64, ge=1)
    stop: list[str] = ["\n\n"]
    max_examples: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    bootstrap: int = Field(1000, ge=100)
    seed: int = 0

    @model_validator(mode="after")
    def _labels_for_classification(self) -> EvalConfig:
        if self.task == "classification" and not self.labels:
            raise ValueError("eval.task classification needs eval.labels, the label strings")
        return self


class Config(_Section):
    """A whole tunelab run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and resolve a YAML config; every problem is a ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist",
            fix=_did_you_mean(path) or "pass the path of a YAML config, e.g. "
            "examples/sentiment/config.yaml",
        )
    try:
        text = path.read_text(encoding="utf-8")
        document = yaml.compose(text)
        raw = yaml.safe_load(text)
    except UnicodeDecodeError as error:
        raise ConfigError(f"is not UTF-8 text ({error.reason})", where=str(path)) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"is not valid YAML: {problem}", where=where,
                          fix="check the indentation and quoting on that line") from None
    if not isinstance(raw, dict):
        raise ConfigError("must be a YAML mapping of sections (name, model, method, data, train)",
                          where=str(path))
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return config_from_dict(raw, source=str(path), document=document, base_dir=path.parent)


def config_from_dict(raw: dict[str, Any], *, source: str = "<config>", document: Any = None,
                     base_dir: Path | None = None) -> Config:
    """Validate a config given as a dict (paths relative to ``base_dir``, default: cwd)."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise _friendly(error, source, document) from None
    # Absolute paths, so the resolved config saved in a run directory works from anywhere.
    return _resolve_paths(config, (base_dir or Path.cwd()).resolve(), source, document)


def dump_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (defaults included), so the run can be repeated."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _resolve_paths(config: Config, base_dir: Path, source: str, document: Any) -> Config:
    data = config.data
    for key in ("train", "validation", "test"):
        resolved = []
        for index, name in enumerate(getattr(data, key)):
            if name.startswith("hf://"):
                resolved.append(name)
                continue
            file_part, _, split = name.partition("::")
            candidate = Path(os.path.expanduser(file_part))
            if not candidate.is_absolute():
                candidate = base_dir / candidate
            if not candidate.exists():
                several = len(getattr(data, key)) > 1
                field_path = f"data.{key}[{index}]" if several else f"data.{key}"
                raise ConfigError(
                    f"{field_path}: data file {str(candidate)!r} does not exist",
                    where=_where(source, document, ("data", key)),
                    fix=_did_you_mean(candidate) or "check the path; relative paths are "
                    "resolved against the config file's folder",
                )
            resolved.append(str(candidate) + (f"::{split}" if split else ""))
        setattr(data, key, resolved)
    model_path = config.model.path
    looks_local = model_path.startswith((".", "/", "~")) or model_path.endswith(".gguf")
    if looks_local:
        candidate = Path(os.path.expanduser(model_path))
        if not candidate.is_absolute():
            candidate = base_dir / candidate
        if not candidate.exists():
            raise ConfigError(
                f"model.path: {str(candidate)!r} does not exist",
                where=_where(source, document, ("model", "path")),
                fix=_did_you_mean(candidate) or "point model.path at a model folder, a hub id, or "
                "embedded:smollm2-135m-instruct",
            )
        config.model.path = str(candidate)
    return config


# Names other fine-tuning tools use for our keys, so their users get a useful hint.
_SYNONYMS = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target_modules": "targets",
    "sequence_len": "max_seq_len", "max_length": "max_seq_len", "seq_len": "max_seq_len",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler": "schedule",
    "lr_scheduler_type": "schedule", "sample_packing": "packing", "base_model": "path",
    "eval_steps": "eval_every", "save_steps": "save_every", "logging_steps": "log_every",
    "datasets": "train", "val_set_size": "validation_split", "output": "output_dir",
}


def _friendly(error: ValidationError, source: str, document: Any) -> ConfigError:
    """One paragraph for the first problem, naming the key, the line and the fix."""
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(part) for part in loc) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            hint = [_SYNONYMS[loc[-1]]] if loc[-1] in _SYNONYMS else difflib.get_close_matches(
                str(loc[-1]), known, n=1)
            fix = (f"did you mean '{hint[0]}'?" if hint else "remove it.") + (
                f" Known keys here: {', '.join(known)}" if known else "")
            problems.append((loc, f"unknown key '{dotted}'", fix))
        elif kind == "missing":
            problems.append((loc, f"'{dotted}' is required", f"add {dotted} to the config"))
        else:
            given = item.get("input")
            message = f"'{dotted}': {item['msg'].removeprefix('Value error, ')}"
            if kind != "value_error" and not isinstance(given, dict):
                message += f" (got {given!r})"
            problems.append((loc, message, None))
    # A misspelt key usually also leaves a required key missing: report the spelling first.
    problems.sort(key=lambda problem: not problem[1].startswith("unknown key"))
    loc, message, fix = problems[0]
    for other_loc, other_message, _ in problems[1:3]:
        message += f"; also {_where(source, document, other_loc)}: {other_message}"
    if len(problems) > 3:
        message += f"; and {len(problems) - 3} more"
    return ConfigError(message, where=_where(source, document, loc), fix=fix)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _where(source: str, document: Any, loc: tuple) -> str:
    """``file:line`` of the deepest YAML node on ``loc`` that exists."""
    line = None
    node = document
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return f"{source}:{line}" if line else source


def _did_you_mean(path: Path) -> str | None:
    folder = path.parent if path.parent.is_dir() else None
    if folder is None:
        return None
    names = [entry.name for entry in folder.iterdir()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"did you mean {str(folder / close[0])!r}?" if close else None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{key}' is not a section", where="--set")
    node[keys[-1]] = value
