"""The run's manifest: what a run was made of and how it went, typed and versioned.

``manifest.json`` is ``Manifest`` serialised. ``train()`` writes it when the run starts
(``Manifest.start``: versions, seed, device, model, data hashes, the planner's prediction) and
again when it finishes (``Manifest.finish``: losses, throughput, time, peak memory); the report,
``tunelab compare``, assess, a sweep's final word, the CLI and resume read its attributes, so a
renamed field fails where it is read, in the tests, instead of as a silent "n/a". Manifests
written before versions hold exactly version 1's fields, so a missing ``schema_version`` reads as
1; another version is refused, since its fields may mean something else.
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.config import Config
from tunelab.errors import RunError

#: Bump when a field is renamed, removed or changes meaning; readers refuse other versions.
SCHEMA_VERSION = 1

#: The libraries whose versions a run records (with Python and the platform).
RECORDED_PACKAGES = ("tunelab", "torch", "transformers", "peft", "tokenizers", "datasets")


class _Fixed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Prediction(_Fixed):
    """The planner's prediction for the run, kept to measure its error against the run's;
    ``error`` alone when the planner could not predict (it never stops a run)."""

    predicted_peak_bytes: int | float | None = None
    predicted_tokens_per_second: float | None = None
    predicted_wall_s: float | None = None
    error: str | None = None


class Mixture(_Fixed):
    """A multitask run's configured token shares (``data.mixing``), which the ``task_tokens``
    that ``metrics.jsonl`` logs per step are checked against."""

    mixing: str
    rates: dict[str, float]


class Manifest(_Fixed):
    """Provenance and outcome of one training run (``runs/<name>/manifest.json``)."""

    schema_version: int = SCHEMA_VERSION
    name: str
    seed: int
    device: str
    versions: dict[str, str]
    model: dict[str, Any]  # model.load.describe_model: architecture, sizes, dtype
    data: dict[str, str]  # each train and validation file → its sha256
    data_report: dict[str, Any]  # data.prepare's report: format, counts, tokens, truncation
    total_steps: int
    warmup_steps: int
    status: Literal["running", "finished"]
    started_at: str | None = None  # optional: manifests from before it read as they are
    plan: Prediction | None = None
    mixture: Mixture | None = None
    allocator: dict[str, Any] | None = None  # allocator.for_training: the malloc the run got
    # What a Python caller handed in instead of files and a model path (run/supplied.py):
    # "base" (a loaded model: its name_or_path, class, what later loads get), "data" (the
    # in-memory splits, written as data/<split>.jsonl).
    supplied: dict[str, Any] | None = None
    # Written when the run finishes.
    val_loss_before: float | None = None
    val_loss_after: float | None = None
    tokens_per_second: float | None = None
    final_train_loss: float | None = None
    steps: int | None = None
    wall_s: float | None = None
    train_s: float | None = None
    train_tokens: int | None = None
    measured_peak_rss_bytes: int | None = None

    @classmethod
    def start(cls, config: Config, *, device: str, model: dict[str, Any],
              data_report: dict[str, Any], total_steps: int, warmup_steps: int,
              plan: dict[str, Any] | None, allocator: dict[str, Any] | None,
              mixture: dict[str, Any] | None = None,
              supplied: dict[str, Any] | None = None) -> Manifest:
        """The manifest of a run that starts now: what it trains, on what, with what."""
        return cls(name=config.name, seed=config.train.seed, device=device, versions=versions(),
                   model=model, data=data_hashes(config), data_report=data_report,
                   total_steps=total_steps, warmup_steps=warmup_steps, status="running",
                   started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), plan=plan, mixture=mixture,
                   allocator=allocator, supplied=supplied)

    def finish(self, *, val_loss_before: float | None, val_loss_after: float | None,
               tokens_per_second: float, final_train_loss: float | None, steps: int,
               wall_s: float, train_s: float, train_tokens: int,
               measured_peak_rss_bytes: int) -> Manifest:
        """This manifest with the run finished and what it measured (times to 0.1 s)."""
        return Manifest.model_validate({
            **self.model_dump(), "status": "finished", "val_loss_before": val_loss_before,
            "val_loss_after": val_loss_after, "tokens_per_second": tokens_per_second,
            "final_train_loss": final_train_loss, "steps": steps, "wall_s": round(wall_s, 1),
            "train_s": round(train_s, 1), "train_tokens": train_tokens,
            "measured_peak_rss_bytes": measured_peak_rss_bytes})

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "manifest.json") -> Manifest:
        """A manifest given as plain data; RunError naming the first wrong field."""
        check_schema_version(raw, where)
        try:
            return cls.model_validate({"schema_version": SCHEMA_VERSION, **raw})
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(top level)"
            raise RunError(f"is not a run manifest of this tunelab: {field}: {first['msg']} "
                           f"({error.error_count()} problem(s))", where=where,
                           fix="train the run again (tunelab train CONFIG --overwrite)") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``manifest.json``; fields not measured (yet) are left out."""
        return self.model_dump(exclude_none=True)


def check_schema_version(raw: dict[str, Any], where: str) -> None:
    """Refuse a manifest written with another schema: its fields may mean something else.
    No version means version 1 (every manifest from before versions holds its fields)."""
    version = raw.get("schema_version", 1)
    if version != SCHEMA_VERSION:
        raise RunError(f"has manifest schema version {version!r}; this tunelab reads version "
                       f"{SCHEMA_VERSION}", where=where,
                       fix="read the run with the tunelab version that wrote it (pip install "
                       "--upgrade tunelab), or train it again with this one")


def data_hashes(config: Config) -> dict[str, str]:
    """Each train and validation file of the config (every task's too) → its sha256."""
    return {path: hash_file(path) for data in [config.data, *config.data.tasks]
            for path in data.train + data.validation}


def hash_file(path: str) -> str:
    """sha256 of a data file, or of every file in a dataset folder (sorted by name)."""
    digest = hashlib.sha256()
    location = Path(path.split("::")[0])
    files = sorted(p for p in location.rglob("*") if p.is_file()) if location.is_dir() \
        else [location]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a run depends on."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in RECORDED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found
