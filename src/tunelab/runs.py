"""The run directory: resolved config, manifest (versions, seed, data hashes), metrics log.

``runs/<name>/`` holds ``config.yaml``, ``manifest.json``, ``metrics.jsonl``,
``checkpoints/step-N/`` and the final ``adapter/`` (or ``model/`` for full fine-tuning).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.config import Config, dump_config, load_config
from tunelab.errors import RunError


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


def open_run(run_dir: str | Path) -> tuple[Path, Config]:
    """An existing run directory and its resolved config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"{run_dir} is not a tunelab run directory (no config.yaml)",
                       where=str(run_dir), fix="pass a folder made by `tunelab train`, "
                       "e.g. runs/<name>")
    return run_dir, load_config(run_dir / "config.yaml")


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json (atomically: a crash never leaves half a manifest)."""
    temporary = run_dir / "manifest.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2, default=str))
    temporary.replace(run_dir / "manifest.json")


def read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record: Any) -> None:
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint's step (they will be redone)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run_model(run_dir: str | Path, *, base: bool = False):
    """The model of a run ready to generate: base + adapter (or full weights), tokenizer, config.

    ``base=True`` gives the untouched base model, for side-by-side comparisons.
    """
    from tunelab.model.adapters import METHODS, load_tuned, tuned_weights_path
    from tunelab.model.load import load_model, load_tokenizer

    run_dir, config = open_run(run_dir)
    method = METHODS[config.method.kind]
    path, gguf_file = config.model.path, config.model.gguf_file
    if not method.adapter and not base:
        path, gguf_file = str(tuned_weights_path(method.kind, run_dir)), None
    tokenizer = load_tokenizer(path, gguf_file)
    model = load_model(path, dtype=config.model.dtype, device=config.model.device,
                       gguf_file=gguf_file, attn_implementation=config.model.attn_implementation)
    if method.adapter and not base:
        model = load_tuned(model, run_dir)
    model.eval()
    return model, tokenizer, config
