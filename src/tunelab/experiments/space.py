"""The sweep file: a base config, a search space over dotted config keys, and how to search.

``load_sweep(path)`` validates the whole file the way ``load_config`` validates a config: an
unknown key, a range the field cannot take, or a choice the config rejects is a ConfigError
naming the sweep file's line and the fix. Every choice and both ends of every range are checked
against the real config schema before a single trial trains.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.config import Config, config_from_dict, explain, load_config
from tunelab.errors import ConfigError
from tunelab.eval.tasks import TASKS

RANGE_KINDS = ("uniform", "log_uniform", "int", "int_log")
PRIMITIVE = (str, int, float, bool)


class Objective(BaseModel):
    """What a trial is judged by: a task metric on the validation split, or its loss."""

    model_config = ConfigDict(extra="forbid")
    metric: str | None = Field(None, description=(
        "A metric of the base config's eval.task (default: its primary metric, e.g. accuracy) "
        "or val_loss (the validation loss after training)."))
    split: Literal["validation"] = Field("validation", description=(
        "Trials are judged on validation data only; the test split is kept for the final word."))
    direction: Literal["maximize", "minimize"] | None = Field(None, description=(
        "Default: minimize for val_loss, maximize for task metrics."))


class SweepFile(BaseModel):
    """The sweep file's schema (its ``space`` is checked against the config schema apart)."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field(description="The run config every trial starts from (relative to this "
                      "file's folder).")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description=(
        "The sweep's name; its directory is output_dir/name (default: the sweep file's stem)."))
    output_dir: str = Field("runs", description="The folder that holds the sweep directory.")
    trials: int | None = Field(None, ge=1, description=(
        "Configurations to try (default 16; grid: the size of the grid)."))
    sampler: Literal["tpe", "grid", "random"] = Field("tpe", description=(
        "How configurations are chosen: tpe (Optuna's Bayesian sampler), grid (every "
        "combination of the listed choices) or random."))
    seed: int = Field(0, description="Seed of the sampler.")
    objective: Objective = Field(Objective(), description=Objective.__doc__)
    pruner: Literal["median", "hyperband", "none"] = Field("none", description=(
        "Stop unpromising trials early on the validation loss measured every "
        "train.eval_every steps."))
    retry_failed: bool = Field(False, description=(
        "Run a trial whose worker died (killed, machine lost) once more."))
    overrides: dict[str, Any] = Field({}, description=(
        "Dotted config keys set on the base config for every trial (and the base run), e.g. "
        "train.max_steps: 40."))
    space: dict[str, Any] = Field(description=(
        "Dotted config key → a list of choices, or {uniform | log_uniform | int | int_log: "
        "[low, high]}."))


@dataclass(frozen=True)
class Param:
    """One searched config key: a list of choices or a numeric range."""

    key: str  # dotted config key, e.g. train.lr
    kind: str  # choice | uniform | log_uniform | int | int_log
    choices: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0


@dataclass
class Sweep:
    """A validated sweep file: the resolved base config, the space and how to search it."""

    source: str
    spec: SweepFile
    base: Config
    params: list[Param]
    metric: str
    direction: str

    @property
    def trials(self) -> int:
        if self.spec.trials is not None:
            return self.spec.trials
        return grid_size(self.params) if self.spec.sampler == "grid" else 16

    @property
    def directory(self) -> Path:
        return Path(self.spec.output_dir) / (self.spec.name or Path(self.source).stem)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every problem is a ConfigError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} does not exist", where="tunelab sweep",
                          fix="pass the path of a sweep YAML file (base, trials, space)")
    text = path.read_text(encoding="utf-8")
    try:
        document, raw = yaml.compose(text), yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise ConfigError(f"is not valid YAML: {getattr(error, 'problem', error)}",
                          where=f"{path}:{mark.line + 1}" if mark else str(path),
                          fix="check the indentation and quoting on that line") from None
    if not isinstance(raw, dict):
        raise ConfigError("must be a YAML mapping with base, trials and space", where=str(path))
    where = lambda *keys: _line(path, document, keys)  # noqa: E731
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as error:
        raise _schema_error(error, where) from None
    for key in spec.overrides:
        _check_key(key, where("overrides", key))
    base_path = Path(spec.base) if Path(spec.base).is_absolute() else path.parent / spec.base
    base = load_config(base_path, overrides=spec.overrides)
    if base.data.tasks:
        from tunelab.eval.multitask import multitask_refused

        raise multitask_refused("sweep", base, where=where("base"))
    params = [_param(key, value, where) for key, value in spec.space.items()]
    if not params:
        raise ConfigError("space is empty", where=where("space"),
                          fix="add a key to search, e.g. train.lr: {log_uniform: [1.0e-5, "
                          "1.0e-3]}")
    base_raw = base.model_dump(mode="json")
    for param in params:
        _check_values(param, base_raw, where)
    _check_search(spec, params, base, where)
    metric, direction = _objective(spec.objective, base, where)
    return Sweep(str(path), spec, base, params, metric, direction)


def grid_size(params: list[Param]) -> int:
    return math.prod(len(param.choices) for param in params)


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    """The trial's value of every searched key, asked of the Optuna trial."""
    values = {}
    for param in params:
        if param.kind == "choice":
            values[param.key] = trial.suggest_categorical(param.key, list(param.choices))
        elif param.kind in ("int", "int_log"):
            values[param.key] = trial.suggest_int(param.key, int(param.low), int(param.high),
                                                  log=param.kind == "int_log")
        else:
            values[param.key] = trial.suggest_float(param.key, param.low, param.high,
                                                    log=param.kind == "log_uniform")
    return values


def trial_config(base: Config, values: dict[str, Any], *, name: str, output_dir: Path,
                 seed: int | None = None) -> Config:
    """The base config with a trial's values (and seed) set, as a run named ``name``."""
    raw = with_values(base.model_dump(mode="json"), values)
    raw.update(name=name, output_dir=str(output_dir))
    if seed is not None:
        raw["train"]["seed"] = seed
    return config_from_dict(raw, source=name)


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with dotted keys set."""
    raw = copy.deepcopy(raw)
    for dotted, value in values.items():
        node = raw
        *sections, leaf = dotted.split(".")
        for section in sections:
            if not isinstance(node.get(section), dict):
                node[section] = {}
            node = node[section]
        node[leaf] = value
    return raw


def _param(key: str, value: Any, where) -> Param:
    field_type = _check_key(key, where("space", key))
    line = where("space", key)
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"space.{key}: the list of choices is empty", where=line,
                              fix="list at least two values, e.g. [8, 16, 32]")
        bad = [choice for choice in value if not isinstance(choice, PRIMITIVE)]
        if bad:
            raise ConfigError(f"space.{key}: choice {bad[0]!r} is not a string, number or "
                              "boolean", where=line, fix="list plain values")
        if len(set(map(repr, value))) != len(value):
            raise ConfigError(f"space.{key}: a choice is listed twice", where=line,
                              fix="list each value once")
        return Param(key, "choice", choices=tuple(value))
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in RANGE_KINDS):
        raise ConfigError(f"space.{key}: {value!r} is neither a list of choices nor a range",
                          where=line, fix="write a list [a, b, c] or {log_uniform: [low, high]}"
                          f" (ranges: {', '.join(RANGE_KINDS)})")
    kind, bounds = next(iter(value.items()))
    if not (isinstance(bounds, list) and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
        raise ConfigError(f"space.{key}: {kind} needs [low, high] numbers, got {bounds!r}",
                          where=line, fix=f"write e.g. {{{kind}: [1, 10]}}")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"space.{key}: {kind} range [{low}, {high}] is empty (low must be "
                          "below high)", where=line, fix="swap or widen the bounds")
    if kind in ("log_uniform", "int_log") and low <= 0:
        raise ConfigError(f"space.{key}: a log range needs low > 0, got {low}", where=line,
                          fix="use a positive low bound, e.g. 1.0e-6")
    if kind in ("int", "int_log") and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"space.{key}: {kind} bounds must be whole numbers", where=line,
                          fix=f"write e.g. {{{kind}: [4, 64]}}")
    if kind in ("uniform", "log_uniform") and field_type.startswith("int"):
        raise ConfigError(f"space.{key} is a whole number ({field_type}); {kind} would draw "
                          "fractions", where=line, fix=f"write {{int: [{low}, {high}]}} or a "
                          "list of choices")
    return Param(key, kind, low=float(low), high=float(high))


def _check_key(key: str, line: str) -> str:
    """The field's type text; an unknown or section key is an error at the sweep file's line."""
    try:
        docs = explain(key)
    except ConfigError as error:
        raise ConfigError(error.message.replace("unknown key", "unknown config key"), where=line,
                          fix=error.fix) from None
    if len(docs) != 1 or docs[0].key != key:
        raise ConfigError(f"'{key}' is a config section, not a field", where=line,
                          fix=f"name one field, e.g. {docs[0].key}")
    return docs[0].type


def _check_values(param: Param, base_raw: dict[str, Any], where) -> None:
    """Each choice (or both ends of a range) must make a valid config."""
    values = param.choices if param.kind == "choice" else (param.low, param.high)
    for index, value in enumerate(values):
        if param.kind in ("int", "int_log"):
            value = int(value)
        try:
            config_from_dict(with_values(base_raw, {param.key: value}), source="sweep")
        except ConfigError as error:
            keys = ("space", param.key, index) if param.kind == "choice" else ("space", param.key)
            raise ConfigError(f"space.{param.key}: the value {value!r} makes an invalid config: "
                              f"{error.message.split(': ', 1)[-1]}", where=where(*keys),
                              fix=error.fix or "change or remove that value") from None


def _check_search(spec: SweepFile, params: list[Param], base: Config, where) -> None:
    if spec.sampler == "grid":
        ranged = [param.key for param in params if param.kind != "choice"]
        if ranged:
            raise ConfigError(f"sampler grid needs lists of choices; space.{ranged[0]} is a "
                              "range", where=where("space", ranged[0]),
                              fix="list the values to try, or use sampler: tpe")
        if spec.trials is not None and spec.trials > grid_size(params):
            raise ConfigError(f"trials is {spec.trials} but the grid has only "
                              f"{grid_size(params)} combinations", where=where("trials"),
                              fix=f"set trials: {grid_size(params)} or leave it out")
    if spec.pruner != "none" and not base.train.eval_every:
        raise ConfigError(f"pruner {spec.pruner} needs the validation loss during training, "
                          "but train.eval_every is 0", where=where("pruner"),
                          fix="add train.eval_every: N under overrides (or in the base "
                          "config), or set pruner: none")
    if spec.pruner != "none" and not base.data.validation and not base.data.validation_split:
        raise ConfigError("pruning needs validation data", where=where("pruner"),
                          fix="add data.validation to the base config")


def _objective(objective: Objective, base: Config, where) -> tuple[str, str]:
    if objective.metric == "val_loss":
        return "val_loss", objective.direction or "minimize"
    if base.eval is None:
        raise ConfigError("the objective is a task metric but the base config has no eval "
                          "section", where=where("objective"),
                          fix="add an eval section to the base config, or use objective: "
                          "{metric: val_loss}")
    if not (base.data.validation or base.data.validation_split):
        raise ConfigError("the objective is measured on the validation split, which the base "
                          "config does not have", where=where("objective"),
                          fix="add data.validation to the base config")
    return objective.metric or TASKS[base.eval.task].primary, objective.direction or "maximize"


def _schema_error(error: ValidationError, where) -> ConfigError:
    item = error.errors()[0]
    loc = tuple(item["loc"])
    dotted = ".".join(str(part) for part in loc)
    if item["type"] == "extra_forbidden":
        known = list(SweepFile.model_fields if len(loc) == 1 else Objective.model_fields)
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return ConfigError(f"unknown key '{dotted}' in the sweep file", where=where(*loc),
                           fix=(f"did you mean '{hint[0]}'? " if hint else "")
                           + f"Known keys here: {', '.join(known)}")
    if item["type"] == "missing":
        return ConfigError(f"'{dotted}' is required", where=where(*loc[:-1]),
                           fix=f"add {dotted} to the sweep file")
    message = item["msg"].removeprefix("Value error, ")
    return ConfigError(f"'{dotted}': {message} (got {item.get('input')!r})", where=where(*loc))


def _line(path: Path, document: Any, keys: tuple) -> str:
    """``file:line`` of the deepest node on ``keys`` (mapping keys and list indexes)."""
    line, node = None, document
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) \
                and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return f"{path}:{line}" if line else str(path)
