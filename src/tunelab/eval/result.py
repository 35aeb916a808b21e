"""The evaluation result: one typed, versioned record that ``evaluate`` writes and the report reads.

``eval/<split>.json`` in a run directory is ``EvalResult`` serialised. ``evaluate`` validates
what it built before writing, so a change of shape fails there (and in the tests) instead of
showing as a silent "n/a" in a report; the report reads files back through ``read_eval`` and
refuses a schema version it does not know. Task kinds add their own details to a model's
outcome (``confusion``, ``per_type``, ``hallucination``, ``output_length``...): those are kept
as given, next to the fields every kind has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.errors import RunError

#: Bump when a field is renamed, removed or changes meaning; readers refuse other versions.
SCHEMA_VERSION = 1


class _Fixed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Metric(_Open):
    """A metric with its bootstrap interval (``confidence``, ``n_resamples``, ``seed`` too)."""

    value: float | None
    ci: list[float | None]
    n: int


class ParseFailures(_Fixed):
    count: int
    rate: float


class Variant(_Fixed):
    """The metrics under one prompt variant (``prompt`` None: the data's own prompt)."""

    prompt: str | None
    metrics: dict[str, Metric]
    parse_failures: ParseFailures


class Spread(_Fixed):
    """A metric across prompt variants."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    n_variants: int


class Prediction(_Open):
    """One evaluated example: the prompt's end, the reference, the output and its 0..1 score."""

    index: int
    input: str
    gold: str
    prediction: str
    score: float | None


class Thinking(_Fixed):
    """Generated answers (first variant) that held a ``<think>`` block: ``closed`` ones, and
    ``unterminated`` ones cut inside it (by eval.max_new_tokens or a stop string). With
    ``stripped`` (eval.strip_thinking) the blocks were removed before scoring, an unterminated
    one leaving an empty answer."""

    closed: int
    unterminated: int
    stripped: bool


class ModelOutcome(_Open):
    """One model's results: the first variant's metrics, every variant, every prediction."""

    metrics: dict[str, Metric]
    variants: list[Variant]
    parse_failures: ParseFailures
    sensitivity: dict[str, Spread]
    predictions: list[Prediction]
    metrics_without_leaked: dict[str, Metric] | None = None
    # Optional, so files from before it read as they are (no version bump); on ModelOutcome,
    # which allows extra fields, so an older tunelab reads newer files too.
    thinking: Thinking | None = None

    def detail(self, name: str, default: Any = None) -> Any:
        """A detail the task kind adds (``confusion``, ``per_type``, ``hallucination``...)."""
        return (self.model_extra or {}).get(name, default)


class Comparison(_Open):
    """Tuned minus base for one metric; the paired test where the task runs one."""

    base: float | None
    tuned: float | None
    delta: float | None
    ci: list[float | None] | None = None
    p_value: float | None = None
    p_floor: float | None = None  # the least p the test can give (2 / (resamples + 1))
    p_text: str | None = None  # "p = 0.03" or "p < 0.002" at the floor
    significant: bool | None = None
    test: str | None = None


class Leakage(_Fixed):
    """Evaluated examples that also occur in earlier splits (train, or validation for test)."""

    count: int
    examples: list[dict[str, Any]]


class EvalResult(_Fixed):
    """What ``tunelab eval`` measured on one split, for the base and/or the tuned model."""

    schema_version: int = SCHEMA_VERSION
    name: str
    task: str
    split: str
    n: int
    primary_metric: str
    shots: int
    ci_level: float
    n_resamples: int
    predict: str
    leakage: Leakage | None = None
    models: dict[str, ModelOutcome]
    comparison: dict[str, Comparison]
    wall_s: float

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "evaluation result") -> EvalResult:
        """Validate a result given as plain data; RunError naming the first wrong field."""
        check_schema_version(raw, where)
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise RunError(f"is not an evaluation result of this tunelab: {field}: "
                           f"{first['msg']} ({error.error_count()} problem(s))", where=where,
                           fix="run tunelab eval again to rewrite it") from None

    @staticmethod
    def jsonable(raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` as its JSON file will hold it: sets as sorted lists, tensors as lists."""
        return json.loads(json.dumps(raw, default=_jsonable))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, task-specific details included."""
        return self.jsonable(self.model_dump())

    def write(self, path: Path) -> Path:
        """The result as ``path`` (a run's ``RunDir.eval_file``), atomically: a crash never
        leaves half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.model_dump(), indent=1, default=_jsonable))
        temporary.replace(path)
        return path


def check_schema_version(raw: dict[str, Any], where: str) -> None:
    """Refuse a result written with another schema: its fields may mean something else."""
    version = raw.get("schema_version")
    if version == SCHEMA_VERSION:
        return
    if version is None:
        raise RunError("has no schema_version: it was written by a tunelab older than its typed "
                       f"results (this one reads version {SCHEMA_VERSION})", where=where,
                       fix="run tunelab eval again to rewrite it")
    raise RunError(f"has schema version {version!r}; this tunelab reads version "
                   f"{SCHEMA_VERSION}", where=where,
                   fix="use the tunelab version that wrote it, or run tunelab eval again")


def read_eval(path: Path) -> EvalResult:
    """An ``eval/*.json`` file back as an ``EvalResult`` (RunError when it is not one)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"cannot be read: {error}", where=str(path),
                       fix="run tunelab eval again to rewrite it") from None
    if not isinstance(raw, dict):
        raise RunError(f"holds a {type(raw).__name__}, not an evaluation result",
                       where=str(path), fix="run tunelab eval again to rewrite it")
    return EvalResult.from_dict(raw, str(path))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if hasattr(value, "tolist"):  # numpy and torch values
        return value.tolist()
    return str(value)
