"""The run directory: resolved config, manifest (versions, seed, data hashes), metrics log.

``runs/<name>/`` holds ``config.yaml``, ``manifest.json``, ``metrics.jsonl``,
``checkpoints/step-N/`` and the final ``adapter/`` (or ``model/`` for full fine-tuning).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunelab.config import Config, dump_config, load_config
from tunelab.errors import ConfigError, ModelError, RunError


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
    for package in ("tunelab", "torch", "transformers", "peft", "tokenizers", "datasets"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def create_run(config: Config, *, overwrite: bool = False) -> Path:
    """Make ``runs/<name>/`` with the resolved config; refuse to clobber an existing run."""
    run_dir = config.run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunError(
                f"run directory {run_dir} already exists",
                where="name",
                fix=f"resume it with `tunelab train --resume {run_dir}`, pick another name, "
                "or pass --overwrite to replace it",
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    return run_dir


def open_run(run_dir: str | Path, *, need_data: bool = True) -> tuple[Path, Config]:
    """An existing run directory and its resolved config.

    ``need_data=False`` reads the saved config without checking that its data files and model
    path exist here: serving, chat and export need only the model part, and a run copied to
    another machine (or whose data moved) names paths that are gone. Training and evaluation
    keep the check, so a missing data file is named before any work starts.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunError(f"{run_dir} is not a tunelab run directory (no config.yaml)",
                       where=str(run_dir), fix="pass a folder made by `tunelab train`, "
                       "e.g. runs/<name>")
    if need_data:
        return run_dir, load_config(config_path)
    try:  # the saved config is already resolved: its paths are absolute, nothing to resolve
        return run_dir, Config.model_validate(yaml.safe_load(config_path.read_text()))
    except (ValidationError, yaml.YAMLError, UnicodeDecodeError):
        return run_dir, load_config(config_path)  # raises the same problem as a clear error


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json (atomically: a crash never leaves half a manifest)."""
    temporary = run_dir / "manifest.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, default=str))
    temporary.replace(run_dir / "manifest.json")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``, and streams each record
    to the trackers the run's ``train.report_to`` names and to any ``stream_metrics_to`` sink."""

    def __init__(self, path: Path):
        self.path = path
        self._sinks: list[Callable[[dict[str, Any]], None]] | None = None  # opened on 1st write

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._sinks is None:
            self._sinks = [*open_trackers(self.path.parent), *_extra_sinks.get()]
        for sink in self._sinks:
            sink(record)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint's step (they will be redone), and
        a last line cut short by a crash or a full disk; replaced atomically."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        if lines and not _is_json(lines[-1]):
            lines.pop()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        temporary.replace(self.path)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


_extra_sinks: ContextVar[tuple[Callable[[dict[str, Any]], None], ...]] = ContextVar(
    "metric_sinks", default=())


@contextmanager
def stream_metrics_to(sink: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Every metrics record written inside the block also goes to ``sink`` (a sweep's pruner
    reads the validation loss this way; the training loop stays unaware of it)."""
    token = _extra_sinks.set((*_extra_sinks.get(), sink))
    try:
        yield
    finally:
        _extra_sinks.reset(token)


def open_trackers(run_dir: Path) -> list[Callable[[dict[str, Any]], None]]:
    """Writers for the trackers the run's resolved config names in ``train.report_to``."""
    config_path = run_dir / "config.yaml"
    raw = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    report_to = ((raw or {}).get("train") or {}).get("report_to") or []
    writers = {"tensorboard": TensorBoardWriter, "mlflow": MlflowWriter}
    return [writers[name](run_dir, raw) for name in report_to]


def _missing_extra(tracker: str, package: str) -> ConfigError:
    return ConfigError(f"train.report_to names {tracker}, but the {package} package is not "
                       "installed", where="train.report_to",
                       fix=f'pip install "tunelab[{tracker}]", or remove {tracker} from '
                       "train.report_to")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in record.items()
            if key not in ("step", "time") and isinstance(value, (int, float))
            and not isinstance(value, bool)}


class TensorBoardWriter:
    """TensorBoard event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing_extra("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        weakref.finalize(self, self.writer.close)

    def __call__(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record.get("step", 0), walltime=record["time"])
        self.writer.flush()  # a crash or SIGKILL keeps everything logged so far


class MlflowWriter:
    """One MLflow run per tunelab run, in ``<output_dir>/mlflow.db`` (a local SQLite store:
    MLflow 3 refuses its old ``mlruns`` folder store) unless ``MLFLOW_TRACKING_URI`` is set; the
    resolved config goes in as parameters."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing_extra("mlflow", "mlflow-skinny") from None
        self.metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI") or \
            f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("tunelab")
        experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment("tunelab")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        params = [Param(key, str(value)[:500]) for key, value in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes 100 parameters per call
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        weakref.finalize(self, self.client.set_terminated, self.run_id)

    def __call__(self, record: dict[str, Any]) -> None:
        milliseconds = int(record["time"] * 1000)
        metrics = [self.metric(key, value, milliseconds, record.get("step", 0))
                   for key, value in _scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run_model(run_dir: str | Path, *, base: bool = False):
    """The model of a run ready to generate: base + adapter (or full weights), tokenizer, config.

    The base is the one the adapter was trained on (:func:`load_run_base`). ``base=True`` gives
    that base without the adapter, for side-by-side comparisons. The run's data files need not
    exist (see :func:`open_run`).
    """
    from tunelab.model.adapters import METHODS, load_tuned, tuned_weights_path
    from tunelab.model.load import load_model, load_tokenizer

    run_dir, config = open_run(run_dir, need_data=False)
    if METHODS[config.method.kind].adapter:
        model, tokenizer = load_run_base(run_dir, config)
        if not base:
            model = load_tuned(model, run_dir)
    else:
        path, gguf_file = config.model.path, config.model.gguf_file
        if not base:
            path, gguf_file = str(tuned_weights_path(config.method.kind, run_dir)), None
        tokenizer = load_tokenizer(path, gguf_file)
        model = load_model(path, dtype=config.model.dtype, device=config.model.device,
                           gguf_file=gguf_file,
                           attn_implementation=config.model.attn_implementation)
    model.eval()
    return model, tokenizer, config


def load_run_base(run_dir: Path, config: Config, *,
                  base: tuple[str, str | None] | None = None):
    """The base an adapter run trained on, as it trained on it, and its tokenizer.

    A QLoRA run's adapter corrects the NF4 weights, so its base is loaded in 4 bits again (on a
    float base it would be another model). The base is found with :func:`run_base`, unless
    ``base`` (model reference, GGUF file) names it.
    """
    from tunelab.model.adapters import METHODS
    from tunelab.model.load import load_model, load_tokenizer

    load_in_4bit = METHODS[config.method.kind].load_in_4bit
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            f"{run_dir} was trained with QLoRA on a 4-bit (NF4) base, and loading that base "
            "needs the bitsandbytes package, which is not installed; on a float base the adapter "
            "would not give the model that was trained",
            where=str(run_dir), fix='pip install "tunelab[qlora]" (bitsandbytes >= 0.50 runs on '
            f"CPU and CUDA); or, where it is installed, run tunelab export {run_dir} --to merged "
            "and use the merged folder (plain float weights) here")
    path, gguf_file = base or run_base(run_dir, config)
    tokenizer = load_tokenizer(path, gguf_file)
    model = load_model(path, dtype=config.model.dtype, device=config.model.device,
                       gguf_file=gguf_file, attn_implementation=config.model.attn_implementation,
                       load_in_4bit=load_in_4bit)
    return model, tokenizer


def run_base(run_dir: Path, config: Config) -> tuple[str, str | None]:
    """The model reference and GGUF file an adapter run's base loads from on this machine.

    The config's ``model.path`` while it exists here; in a run copied from another machine it
    names that machine's folder, so the base the adapter's sidecar names (its weights' hashes
    and hub id, :func:`tunelab.model.load.resolve_adapter_base`) is loaded instead.
    """
    from tunelab.model.load import resolve_adapter_base

    path = config.model.path
    local = path.startswith(("/", "~", ".")) or path.endswith(".gguf")
    if local and not Path(path).expanduser().exists():
        return resolve_adapter_base(run_dir / "adapter"), None
    return path, config.model.gguf_file
