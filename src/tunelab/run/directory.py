"""The run directory, ``runs/<name>/``: one object that knows every path in it and reads it back.

``create_run`` makes it with the resolved ``config.yaml``; the training loop adds
``manifest.json``, ``metrics.jsonl``, ``checkpoints/step-N/`` and the final ``adapter/`` (or
``model/`` for full fine-tuning); ``tunelab eval`` adds ``eval/<split>.json`` (a multitask run
``eval/<split>-<task>.json``), ``tunelab report`` ``report.html`` and ``tunelab export``
``export/<kind>/``; ``train.report_to`` writes ``trackers.json``, ``tensorboard/`` and
``wandb/``. No other module spells these
paths: they ask ``RunDir``, so "is this a run", "has it finished" and "where are its final
weights" each have one answer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tunelab.config import Config, dump_config, load_config
from tunelab.errors import RunError
from tunelab.eval.result import EvalResult, check_schema_version, read_eval
from tunelab.model.adapters import METHODS
from tunelab.run.manifest import Manifest
from tunelab.run.manifest import check_schema_version as check_manifest_version

#: The file each kind of final folder is complete with: PEFT's adapter config, or the whole
#: model's HF config (written last by ``save_pretrained``, after the weights).
_ADAPTER_MARKER, _MODEL_MARKER = "adapter_config.json", "config.json"


@dataclass(frozen=True)
class RunDir:
    """A run directory (which need not exist yet): its paths, and what its files say."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # --- paths ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The resolved config the run was made with (written first: it marks a run)."""
        return self.path / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        """One JSON object per logged step."""
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        """The folder of ``step-N/`` checkpoints (``train/checkpoint.py`` owns their insides)."""
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        """The final PEFT adapter of an adapter method (LoRA, DoRA, QLoRA)."""
        return self.final_folder("lora")

    def final_folder(self, kind: str) -> Path:
        """Where a run of tuning method ``kind`` keeps its result (adapter/ or model/)."""
        return self.path / METHODS[kind].final_folder

    @property
    def preflight_file(self) -> Path:
        """A reinforcement run's pre-flight: the starting model's pass rates and tied groups."""
        return self.path / "preflight.json"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def eval_file(self, split: str, task: str | None = None) -> Path:
        """``eval/<split>.json``; for one task of a multitask run ``eval/<split>-<task>.json``."""
        return self.eval_dir / f"{eval_name(split, task)}.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    def export_folder(self, name: str) -> Path:
        """``export/<name>`` (``merged``, ``adapter``, ``gguf-<quant>``)."""
        return self.export_dir / name

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (``train.report_to: [tensorboard]``)."""
        return self.path / "tensorboard"

    @property
    def trackers_file(self) -> Path:
        """The run's tracker run ids (``run/trackers.py``), so a resume reopens them."""
        return self.path / "trackers.json"

    # --- what the files say --------------------------------------------------------------------

    def is_run(self) -> bool:
        """A run directory: it holds the resolved config, which ``create_run`` writes first
        (a base-only evaluation's run has no manifest, and is a run all the same)."""
        return self.config_path.is_file()

    def require(self) -> RunDir:
        """This run, or a RunError saying the folder is not one."""
        if not self.is_run():
            raise RunError(f"{self.path} is not a tunelab run directory (no config.yaml)",
                           where=str(self.path),
                           fix="pass a folder made by `tunelab train`, e.g. runs/<name>")
        return self

    def finished(self) -> bool:
        """Training ran to its last step: the manifest says ``finished``, which the loop writes
        only after the final adapter or model is saved (no manifest: not a finished run)."""
        manifest = self.read_manifest()
        return manifest is not None and manifest.finished

    def read_config(self, *, need_data: bool = True) -> Config:
        """The run's resolved config.

        ``need_data=False`` reads it without checking that its data files and model path exist
        here: serving, chat and export need only the model part, and a run copied to another
        machine (or whose data moved) names paths that are gone. Training and evaluation keep
        the check, so a missing data file is named before any work starts.
        """
        path = self.require().config_path
        if need_data:
            return load_config(path)
        try:  # the saved config is already resolved: its paths are absolute, nothing to resolve
            return Config.model_validate(yaml.safe_load(path.read_text()))
        except (ValidationError, yaml.YAMLError, UnicodeDecodeError):
            return load_config(path)  # raises the same problem as a clear error

    def read_manifest(self, *, notes: list[str] | None = None) -> Manifest | None:
        """The manifest, or None before training wrote one. Another schema version is refused;
        a file that is not a manifest raises too, unless ``notes`` is given: then it is left
        out with a note (the report shows what it can)."""
        raw = _read_object(self.manifest_path, notes)
        if raw is None:
            return None
        where = str(self.manifest_path)
        check_manifest_version(raw, where)
        try:
            return Manifest.from_dict(raw, where)
        except RunError as error:
            if notes is None:
                raise
            notes.append(f"{error.render()} Left out.")
            return None

    def write_manifest(self, manifest: Manifest) -> None:
        """Atomically: a crash never leaves half a manifest."""
        write_json(self.manifest_path, manifest.to_dict(), indent=2)

    def eval_files(self) -> list[Path]:
        return sorted(self.eval_dir.glob("*.json"))

    def read_eval(self, split: str, task: str | None = None) -> EvalResult | None:
        """The evaluation on ``split`` (of ``task``), or None before one was written."""
        path = self.eval_file(split, task)
        return read_eval(path) if path.is_file() else None

    def read_evals(self, *, notes: list[str] | None = None) -> dict[Path, EvalResult]:
        """Every ``eval/*.json`` by path. Another schema version is refused; a file that is not
        a result raises too, unless ``notes`` is given: then it is left out with a note."""
        results = {}
        for path in self.eval_files():
            where = f"{self.eval_dir.name}/{path.name}"
            raw = _read_object(path, notes)
            if raw is None:
                continue
            check_schema_version(raw, where)
            try:
                results[path] = EvalResult.from_dict(raw, where)
            except RunError as error:
                if notes is None:
                    raise
                notes.append(f"{error.render()} Left out.")
        return results

    def final_weights(self, kind: str) -> Path:
        """The final adapter or model folder of a run of method ``kind``, checked complete."""
        method = METHODS[kind]
        folder = self.final_folder(kind)
        marker = _ADAPTER_MARKER if method.adapter else _MODEL_MARKER
        if (folder / marker).is_file():
            return folder
        what = "adapter" if method.adapter else "weights"
        if self.finished():
            raise RunError(f"{self.path} has no final {what} ({folder.name}/{marker}): the run "
                           "finished, but the folder is gone", where=str(self.path),
                           fix="copy the whole run directory, or train it again with tunelab "
                           "train CONFIG --overwrite")
        raise RunError(f"{self.path} has no final {what} ({folder.name}/{marker}): the run has "
                       "not finished training", where=str(self.path),
                       fix=f"finish training first: tunelab train --resume {self.path}")


def eval_name(split: str, task: str | None = None) -> str:
    """The name of an evaluation result (and its file): the split, and a multitask run's task."""
    return split if task is None else f"{split}-{task}"


def create_run(config: Config, *, overwrite: bool = False) -> RunDir:
    """Make ``runs/<name>/`` with the resolved config; refuse to clobber an existing run."""
    run = RunDir(config.run_dir)
    if run.path.exists() and any(run.path.iterdir()):
        if not overwrite:
            raise RunError(
                f"run directory {run.path} already exists",
                where="name",
                fix=f"resume it with `tunelab train --resume {run.path}`, pick another name, "
                "or pass --overwrite to replace it",
            )
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    dump_config(config, run.config_path)
    return run


def open_run(run_dir: str | Path | RunDir, *, need_data: bool = True) -> tuple[RunDir, Config]:
    """An existing run directory and its resolved config (see ``RunDir.read_config``)."""
    run = RunDir(run_dir)
    return run, run.read_config(need_data=need_data)


def write_json(path: Path, data: Any, *, indent: int | None = 1) -> None:
    """``data`` as JSON at ``path``, atomically: a crash, a full disk or an unserialisable
    value leaves the old file (or none), never half a file."""
    write_text(path, json.dumps(data, indent=indent, default=str))


def write_text(path: Path, text: str) -> None:
    """``text`` at ``path``, atomically (a temporary file beside it, synced, renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; run files are ordinary files
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_object(path: Path, notes: list[str] | None) -> dict[str, Any] | None:
    """A JSON object file, or None when it is absent; one that cannot be read or holds
    something else raises a RunError, or with ``notes`` is noted and read as None."""
    if not path.is_file():
        return None
    problem = None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem = f"{path.name} could not be read ({error})"
    else:
        if isinstance(raw, dict):
            return raw
        problem = f"{path.name} holds a {type(raw).__name__}, not a JSON object"
    if notes is None:
        raise RunError(problem, where=str(path), fix="delete it and run the command that "
                       "writes it again")
    notes.append(f"{problem}; left out.")
    return None
