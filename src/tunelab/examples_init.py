"""``tunelab init --example NAME [DIR]``: a shipped example's configs and data, copied to DIR.

The examples travel in the wheel as package data (``tunelab/examples/``, mapped from the
repository's ``examples/`` by setup.py; a source checkout reads ``examples/`` itself), so a
user who installed tunelab from PyPI can start from one without cloning the repository.

An example's configs name their data relative to their own folder, and some reach outside it
(``../train.jsonl``, another example's data, a run of a sibling config). The copy is made to
stand alone: every file a config names outside the example is copied in beside it and the
config's text is rewritten to the new name (comments kept), runs go to ``DIR/runs`` (an
absolute ``output_dir``), and a ``train.init_from`` of a sibling config's run points there, so
``tunelab train DIR/config.yaml`` works from any folder.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

import tunelab
from tunelab.errors import ConfigError

#: Files of an example folder that are not copied: the scripts that generated its data.
_NOT_COPIED = {"prepare.py"}


@dataclass
class Written:
    """What ``init_example`` wrote: the folder, its files, its run configs and sweep files."""

    folder: Path
    files: list[Path]
    configs: list[Path]
    sweeps: list[Path]


def examples_root() -> Path:
    """The shipped examples: inside the installed package, else a source checkout's."""
    package = Path(tunelab.__file__).resolve().parent
    for candidate in (package / "examples", package.parents[1] / "examples"):
        if (candidate / "sentiment" / "config.yaml").is_file():
            return candidate
    raise ConfigError("this installation of tunelab has no examples", where=str(package),
                      fix="reinstall tunelab from its wheel or a source checkout "
                      "(pip install tunelab, or pip install -e . in the repository)")


def example_names(root: Path | None = None) -> list[str]:
    """Every example: a folder under the examples with a config.yaml (``sentiment``,
    ``sentiment/chat``, ``qa/preference``, ...)."""
    root = root or examples_root()
    return sorted(path.parent.relative_to(root).as_posix()
                  for path in root.rglob("config.yaml") if "results" not in path.parts)


def init_example(name: str, folder: Path | None = None, *, force: bool = False) -> Written:
    """Copy example ``name`` into ``folder`` (default ``./<last part of name>``), configs
    rewritten to stand alone; refuses a non-empty folder unless ``force``."""
    root = examples_root()
    names = example_names(root)
    if name.strip("/") not in names:
        raise ConfigError(f"no example named {name!r}", where="tunelab init --example",
                          fix=f"use one of: {', '.join(names)}")
    source = root / name.strip("/")
    target = (folder or Path(name.strip("/").split("/")[-1])).expanduser().resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise ConfigError("the folder already exists and is not empty", where=str(target),
                          fix=f"choose another folder (tunelab init --example {name} DIR) "
                          "or add --force to overwrite the example's files in it")
    target.mkdir(parents=True, exist_ok=True)
    files = [path for path in sorted(source.iterdir())
             if path.is_file() and path.name not in _NOT_COPIED]
    written = [Path(shutil.copyfile(path, target / path.name)) for path in files]
    configs, sweeps = [], []
    for path in [path for path in written if path.suffix in (".yaml", ".yml")]:
        is_sweep = _stand_alone(path, source, root, target, written)
        (sweeps if is_sweep else configs).append(path)
    return Written(folder=target, files=written, configs=configs, sweeps=sweeps)


def _stand_alone(config: Path, source: Path, root: Path, target: Path,
                 written: list[Path]) -> bool:
    """Rewrite ``config`` (copied from ``source``) so that nothing it names lies outside
    ``target`` (files copied in are added to ``written``); True for a sweep file."""
    text = config.read_text()
    raw = yaml.safe_load(text) or {}
    for reference in _outside_references(raw):
        if reference.startswith("runs/") or "/runs/" in reference:
            # a sibling config's run (train.init_from): it will be under target/runs
            replacement = f"runs/{Path(reference).name}"
        else:
            found = (source / reference).resolve()
            replacement = "-".join(found.relative_to(root.resolve()).parts)
            shutil.copyfile(found, target / replacement)
            if target / replacement not in written:
                written.append(target / replacement)
        text = re.sub(rf"(?<![\w./-]){re.escape(reference)}(?![\w./-])", replacement, text)
    if "name" in raw:  # a run config or a sweep file (a config's fragment has no name)
        text = _with_output_dir(text, target / "runs")
    config.write_text(text)
    return "base" in raw  # a sweep file names its base config


def _outside_references(raw: dict) -> list[str]:
    """The relative paths a config names that leave its folder (``../...``)."""
    data = raw.get("data") or {}
    sections = [data, *(data.get("tasks") or [])] if isinstance(data, dict) else []
    found = []
    for section in sections:
        for key in ("train", "validation", "test"):
            value = section.get(key) if isinstance(section, dict) else None
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and not item.startswith("hf://"):
                    found.append(item.partition("::")[0])
    start = (raw.get("train") or {}).get("init_from")
    if isinstance(start, str):
        found.append(start)
    return sorted({path for path in found if path.startswith("../")},
                  key=len, reverse=True)  # longest first: ../../x is not rewritten as ../x


def _with_output_dir(text: str, runs: Path) -> str:
    """``output_dir`` set to ``runs`` (absolute), replacing the config's own or added after
    its ``name:`` line."""
    line = f"output_dir: {json.dumps(str(runs))}  # tunelab init: runs go beside this config"
    if re.search(r"(?m)^output_dir:", text):
        return re.sub(r"(?m)^output_dir:.*$", line, text)
    return re.sub(r"(?m)^(name:.*)$", lambda match: f"{match.group(1)}\n{line}", text,
                  count=1)
