"""Rewards of reinforcement runs (grpo, rloo) and the advantages compared within each group.

A reward scores one sampled answer. ``rl.rewards`` lists them, each with a weight:

- ``task``: the run's ``eval.task`` scorer, on the 0-1 scale of its per-example score (label
  match, SQuAD exact match, sentence chrF / 100, ROUGE-L, entity F1, tool-call match). The
  answer is read as evaluation reads it: ``<think>`` blocks removed (``eval.strip_thinking``),
  cut at the first ``eval.stop`` string, parsed by the task; an answer that does not parse
  scores 0, as it counts wrong in evaluation.
- ``python:module:function`` or ``python:path/to/file.py:function``: a function with TRL's
  signature, ``f(prompts=..., completions=..., **columns) -> list[float | None]``, called with
  keywords as TRL calls it; the columns are the record's raw fields (one list per field, aligned
  with the completions). ``None`` means "this reward does not judge this answer".

The total is the weighted sum over the rewards that judged an answer (TRL's ``nansum``); an
answer no reward judged has a NaN total and is left out of the loss. ``advantages`` compares
each answer with the rest of its group the way TRL's GRPOTrainer and RLOOTrainer do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from tunelab.errors import ConfigError, TrainingError
from tunelab.eval.evaluate import strip_thinking
from tunelab.eval.tasks import EvalSettings, Task

# Column names that would collide with the keywords every reward function is called with.
RESERVED_COLUMNS = frozenset({"prompt", "completion", "prompts", "completions",
                              "completion_ids"})
# TRL's GRPOTrainer adds this to the group's standard deviation before dividing.
STD_EPSILON = 1e-4


class TaskEvalSettings(EvalSettings, Protocol):
    """The eval section's fields the task reward reads besides the task's own."""

    strip_thinking: bool
    stop: list[str]


@dataclass(frozen=True)
class RewardScores:
    """Each reward's score of each answer (NaN where it gave None) and the weighted total."""

    per_function: dict[str, np.ndarray]  # reward name → [answers], float64
    total: np.ndarray  # [answers]; NaN where no reward judged the answer


@dataclass(frozen=True)
class RewardFunction:
    """One entry of ``rl.rewards``: its name in logs, weight, and how it scores a batch."""

    name: str
    weight: float
    # (prompts, completions, references, columns, contexts, wheres, completion_ids) → [answers]
    score: Callable[..., np.ndarray]


class Rewards:
    """The run's rewards; ``score`` judges a batch of answers with all of them."""

    def __init__(self, functions: list[RewardFunction]):
        if not functions:
            raise ValueError("a reinforcement run needs at least one reward")
        self.functions = functions

    @property
    def names(self) -> list[str]:
        return [function.name for function in self.functions]

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              references: Sequence[str], columns: Mapping[str, Sequence],
              contexts: Sequence[str | None], wheres: Sequence[str], *,
              completion_ids: Sequence[Sequence[int]] | None = None) -> RewardScores:
        """Every reward on every answer; all arguments are aligned with ``completions`` (a
        prompt's values repeated for each answer of its group).

        ``columns`` are the records' raw fields (``reward_columns``), ``wheres`` each record's
        file:line for error messages, ``contexts`` what the task's hallucination check reads.
        """
        n = len(completions)
        for name, values in [("prompts", prompts), ("references", references),
                             ("contexts", contexts), ("wheres", wheres),
                             *[(f"column {key!r}", column) for key, column in columns.items()]]:
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} completions")
        per_function = {
            function.name: function.score(list(prompts), list(completions), list(references),
                                          columns, list(contexts), list(wheres),
                                          completion_ids)
            for function in self.functions}
        return RewardScores(per_function, weighted_total(
            np.stack([per_function[f.name] for f in self.functions], axis=1),
            np.array([f.weight for f in self.functions], dtype=float)))


def weighted_total(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per answer, the weighted sum over the rewards that judged it (``scores`` is
    ``[answers, rewards]`` with NaN for "not judged"); NaN when none did (TRL's rule)."""
    judged = ~np.isnan(scores)
    total = np.where(judged, scores * weights, 0.0).sum(axis=1)
    return np.where(judged.any(axis=1), total, np.nan)


def reward_columns(fields: Sequence[Mapping], *, group_size: int) -> dict[str, list]:
    """The records' raw fields as TRL passes them to reward functions: one list per field
    (None where a record lacks it), each record repeated ``group_size`` times. Fields named
    like the call's own keywords (prompt, completion, ...) are left out."""
    names = list(dict.fromkeys(key for record in fields for key in record))
    return {name: [record.get(name) for record in fields for _ in range(group_size)]
            for name in names if name not in RESERVED_COLUMNS}


# --- loading -------------------------------------------------------------------------------


def load_rewards(rewards: Sequence, eval_cfg: TaskEvalSettings | None, *,
                 config_dir: Path | None) -> Rewards:
    """The rewards of ``rl.rewards`` (``config.RewardConfig`` entries: ``function``,
    ``weight``), ready to score; ConfigError naming ``rl.rewards[i]`` for one that cannot be
    built. ``config_dir`` is where relative module paths are looked up."""
    functions, taken = [], set()
    for index, entry in enumerate(rewards):
        field = f"rl.rewards[{index}]"
        spec = entry.function.strip()
        if spec == "task":
            name, score = "task", _task_reward(field, eval_cfg)
        elif spec.startswith("python:"):
            function = _import_function(field, spec, config_dir)
            name, score = function.__name__, _python_reward(_describe(spec, function), function)
        else:
            raise ConfigError(f"unknown reward {spec!r}", where=field, fix=(
                "write task (the eval section's scorer) or python:module:function "
                "(or python:path/to/file.py:function)"))
        while name in taken:  # the same function twice (say, with two weights) logs twice
            name += "_2"
        taken.add(name)
        functions.append(RewardFunction(name, float(entry.weight), score))
    return Rewards(functions)


def _task_reward(field: str, eval_cfg: TaskEvalSettings | None) -> Callable[..., np.ndarray]:
    if eval_cfg is None:
        raise ConfigError("the task reward scores answers with the eval section's task, and "
                          "this config has no eval section", where=field, fix=(
                              "add an eval section (eval.task and what it requires, e.g. "
                              "eval.labels), or use a python:module:function reward"))
    task = Task.from_config(eval_cfg)
    # The reward reads only the per-example scores; the intervals the task computes beside
    # them would cost eval.bootstrap resamples of a corpus statistic at every step.
    task.n_resamples = 1

    def score(prompts, completions, references, columns, contexts, wheres, completion_ids):
        return task_scores(task, completions, references, contexts,
                           strip=eval_cfg.strip_thinking, stop=eval_cfg.stop)
    return score


def task_scores(task: Task, completions: Sequence[str], references: Sequence[str],
                contexts: Sequence[str | None], *, strip: bool = True,
                stop: Sequence[str] = ()) -> np.ndarray:
    """The task's per-example score (0-1) of each completion against its reference, the
    completion read as evaluation reads it (thinking stripped, cut at a stop string, parsed)."""
    if not completions:
        return np.zeros(0)
    answers = [_cut(strip_thinking(text)[0] if strip else text, stop) for text in completions]
    predictions = [task.parse(answer)[0] for answer in answers]
    golds = [task.gold(reference) for reference in references]
    scored = task.score(golds, predictions, list(contexts))
    return np.asarray(scored.per_example, dtype=float)


def _cut(text: str, stop: Sequence[str]) -> str:
    """The text before the first of the stop strings, as evaluation's generation ends it."""
    for marker in stop:
        index = text.find(marker)
        if index >= 0:
            text = text[:index]
    return text


def _import_function(field: str, spec: str, config_dir: Path | None) -> Callable:
    """The callable ``python:module:function`` or ``python:path/file.py:function`` names."""
    target, _, name = spec[len("python:"):].rpartition(":")
    if not target or not name:
        raise ConfigError(f"{spec!r} names no function", where=field,
                          fix="write python:module:function or python:path/to/file.py:function")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _module_from_file(field, target, config_dir)
    else:
        module = _module_by_name(field, target, config_dir)
    function = getattr(module, name, None)
    if function is None:
        raise ConfigError(f"{target} has no function {name!r}", where=field, fix=(
            f"define {name}(prompts, completions, **columns) in {target}, or name one it has"))
    if not callable(function):
        raise ConfigError(f"{target}.{name} is a {type(function).__name__}, not a function",
                          where=field, fix=f"point {field} at a function")
    return function


def _module_from_file(field: str, target: str, config_dir: Path | None):
    path = Path(target).expanduser()
    if not path.is_absolute() and config_dir is not None:
        path = Path(config_dir) / path
    if not path.is_file():
        raise ConfigError(f"reward module {path} does not exist", where=field, fix=(
            "give the file's path (relative to the config file's folder) or an importable "
            "module name"))
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"tunelab_reward_{path.stem}_{digest}"  # one module per file
    specification = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(specification)
    sys.modules[module_name] = module  # dataclasses and pickle look a module up by its name
    try:
        specification.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"importing reward module {path} failed: {type(exc).__name__}: {exc}",
                          where=field, fix="fix the module so that it imports") from exc
    return module


def _module_by_name(field: str, target: str, config_dir: Path | None):
    # A module beside the config file is found without installing it (after sys.path).
    beside = str(config_dir) if config_dir is not None else None
    if beside is not None:
        sys.path.append(beside)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (target == exc.name or target.startswith(exc.name + ".")):
            raise ConfigError(f"importing reward module {target} failed: {exc}", where=field,
                              fix="install what the module imports") from exc
        raise ConfigError(f"no module named {target!r}", where=field, fix=(
            "install it, put it beside the config file, or write "
            "python:path/to/file.py:function")) from exc
    except Exception as exc:
        raise ConfigError(f"importing reward module {target} failed: {type(exc).__name__}: "
                          f"{exc}", where=field, fix="fix the module so that it imports") from exc
    finally:
        if beside is not None:
            del sys.path[len(sys.path) - 1 - sys.path[::-1].index(beside)]


def reward_from_function(function: Callable, *, weight: float = 1.0) -> RewardFunction:
    """A Python callable with TRL's signature as a reward (what ``load_rewards`` builds from a
    ``python:`` entry), for runs set up from Python."""
    return RewardFunction(function.__name__, weight,
                          _python_reward(_describe(function.__name__, function), function))


def _python_reward(label: str, function: Callable) -> Callable[..., np.ndarray]:
    def score(prompts, completions, references, columns, contexts, wheres, completion_ids):
        extra = {"completion_ids": [list(ids) for ids in completion_ids]} if (
            completion_ids is not None) else {}
        try:
            returned = function(prompts=prompts, completions=completions, **extra,
                                **{key: list(values) for key, values in columns.items()})
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            raise TrainingError(f"reward function {label} raised {type(exc).__name__}: {exc} "
                                f"(at {frame.filename}:{frame.lineno})",
                                where=wheres[0] if wheres else None,
                                fix="fix the function (the row named is the call's first)"
                                ) from exc
        return _checked(returned, label, wheres)
    return score


def _describe(spec: str, function: Callable) -> str:
    try:
        place = f"{inspect.getsourcefile(function)}:{inspect.getsourcelines(function)[1]}"
    except (OSError, TypeError):
        return spec
    return f"{spec} ({place})"


def _checked(returned, label: str, wheres: Sequence[str]) -> np.ndarray:
    """The function's return value as floats (None → NaN), or a TrainingError saying what is
    wrong with it and at which row."""
    first = wheres[0] if wheres else None
    fix = "return a list with one finite number (or None) per completion"
    if getattr(returned, "ndim", None) == 1 and hasattr(returned, "tolist"):
        returned = returned.tolist()  # a numpy array or torch tensor of rewards
    if not isinstance(returned, (list, tuple)):
        raise TrainingError(f"reward function {label} returned a {type(returned).__name__}, "
                            f"not a list: {returned!r:.200}", where=first, fix=fix)
    if len(returned) != len(wheres):
        raise TrainingError(f"reward function {label} returned {len(returned)} values for "
                            f"{len(wheres)} completions", where=first, fix=fix)
    values = np.empty(len(returned))
    for row, value in enumerate(returned):
        if value is None:
            values[row] = np.nan
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            values[row] = float(value)
        else:
            raise TrainingError(f"reward function {label} returned {value!r:.200} for this row "
                                f"(completion {row}), not a finite number or None",
                                where=wheres[row], fix=fix)
    return values


# --- comparing answers within their group ----------------------------------------------------


def advantages(rewards: np.ndarray, *, estimator: Literal["grpo", "rloo"],
               scale: bool = True) -> np.ndarray:
    """Each answer's advantage over its group, ``rewards`` being ``[groups, group_size]``.

    grpo (TRL's GRPOTrainer): reward minus the group's mean, divided by the group's standard
    deviation (Bessel-corrected, as ``torch.std``) + 1e-4 when ``scale`` (false: Dr. GRPO).
    rloo (TRL's RLOOTrainer): reward minus the mean of the group's other answers; ``scale``
    does not apply (TRL's batch-wide ``normalize_advantages`` is not offered). A NaN reward
    (no reward judged the answer) is left out of its group's statistics and gets a NaN
    advantage (left out of the loss); an answer alone in its group with a reward gets 0
    (nothing to compare it with; TRL's NaN there becomes 0 too).
    """
    rewards = np.asarray(rewards, dtype=float)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [groups, group_size], got shape {rewards.shape}")
    scored = ~np.isnan(rewards)
    count = scored.sum(axis=1, keepdims=True)
    total = np.where(scored, rewards, 0.0).sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        if estimator == "grpo":
            mean = total / count
            result = rewards - mean
            if scale:
                squares = np.where(scored, (rewards - mean) ** 2, 0.0).sum(axis=1, keepdims=True)
                std = np.sqrt(squares / np.maximum(count - 1, 1))
                result = result / (std + STD_EPSILON)
        elif estimator == "rloo":
            result = rewards - (total - rewards) / (count - 1)
        else:
            raise ValueError(f"estimator must be grpo or rloo, not {estimator!r}")
    return np.where(scored & (count == 1), 0.0, np.where(scored, result, np.nan))


def tied_groups(rewards: np.ndarray) -> np.ndarray:
    """Per group of ``[groups, group_size]`` rewards, whether all its finite rewards are equal
    (such a group has no advantage to learn from; a group with none finite counts as tied)."""
    rewards = np.asarray(rewards, dtype=float)
    high = np.where(np.isnan(rewards), -np.inf, rewards).max(axis=1)
    low = np.where(np.isnan(rewards), np.inf, rewards).min(axis=1)
    return ~(high > low)


def tie_share(rewards: np.ndarray) -> float:
    """The share of groups whose finite rewards are all equal (``tied_groups``)."""
    tied = tied_groups(rewards)
    return float(tied.mean()) if tied.size else 0.0
