"""What a server serves, whichever engine generates: the runs named on the command line opened
and checked, the one base they share, and the model ids clients ask for.

``ship/serve.py`` (the own engine) and the other engines (``ship/llamacpp.py``,
``ship/vllm_engine.py``) all start here, so every engine refuses the same runs with the same
errors and lists the same models under the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import RunError
from tunelab.run.directory import RunDir, open_run
from tunelab.run.load import run_base


@dataclass(frozen=True)
class ServedModel:
    """A model id clients ask for: a run's adapter, or the base (``adapter`` None)."""

    name: str
    adapter: str | None
    chat_template: str | None = None  # the run's data.chat_template, as training used it
    chat_template_kwargs: dict | None = None  # and its data.chat_template_kwargs


def open_runs(runs: list[str]) -> list[tuple[str, RunDir, object]]:
    """``(name, run, config)`` for each ``RUN`` or ``NAME=RUN`` argument, each checked to be an
    adapter run with its final adapter, no two under one name. Runs need only their config,
    adapter and base here, not their data files."""
    opened = []
    for argument in runs:
        name, path = named_run(argument)
        run, config = open_run(path, need_data=False)
        check_servable(run, config)
        opened.append((name or config.name, run, config))
    names = [name for name, _, _ in opened]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RunError(f"two runs would be served as {duplicates[0]!r}", where="tunelab serve",
                       fix="give one another name: tunelab serve NEWNAME=RUN_DIR ...")
    return opened


def served_models(base_name: str, opened: list) -> list[ServedModel]:
    """The base first, then each opened run under its name as adapter ``adapterN`` (peft keys
    modules by adapter name: no dots allowed, hence not the run's name)."""
    return [ServedModel(base_name, None)] + [
        ServedModel(name, f"adapter{number}", config.data.chat_template,
                    config.data.chat_template_kwargs)
        for number, (name, _, config) in enumerate(opened)]


def named_run(argument: str) -> tuple[str | None, Path]:
    name, sep, path = argument.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        return name, Path(path)
    return None, Path(argument)


def check_servable(run: RunDir, config) -> None:
    from tunelab.model.adapters import METHODS

    if not METHODS[config.method.kind].adapter:
        raise RunError(f"{run} is a {config.method.kind} fine-tune, not an adapter; tunelab "
                       "serve serves adapters on a shared base", where=str(run),
                       fix=f"serve its weights as the base: tunelab serve OTHER_RUN --base "
                       f"{run.final_folder(config.method.kind)}, or train with method.kind lora")
    run.final_weights(config.method.kind)  # a RunError when the run has no final adapter


def common_base(opened: list, base: str | None) -> tuple[str, str | None]:
    """The one base every run was trained on (each found as :func:`run.load.run_base` finds
    it), or ``base``; QLoRA runs (a 4-bit base) and others never share one."""
    from tunelab.model.adapters import METHODS

    in_4bit = {METHODS[config.method.kind].load_in_4bit for _, _, config in opened}
    bases = {run_base(run, config) for _, run, config in opened}
    if len(in_4bit) > 1 or (base is None and len(bases) > 1):
        listing = "; ".join(f"{run}: {config.model.path}"
                            + (" in 4 bits (QLoRA)" if METHODS[config.method.kind].load_in_4bit
                               else "") for _, run, config in opened)
        raise RunError(f"these runs were trained on different base models ({listing})",
                       where="tunelab serve",
                       fix="serve runs of one base together (one server per base), or pass "
                       "--base MODEL if the bases are the same model at different paths")
    return (base, None) if base is not None else bases.pop()
