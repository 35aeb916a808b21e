"""What every script's ``--smoke`` mode shares: the tiny model, the result path, the CLI.

A smoke run takes a script through its whole code path at tiny sizes, in seconds: the test
suite's tiny Llama (built from a config, random weights), a few examples, one or two steps. Its
figures mean nothing; what it proves is that the script still runs at HEAD and still writes a
result file the README can render (``tests/test_scripts.py``). A smoke result never lands in
the repository, so it cannot overwrite a committed measurement.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a smoke config trains: two short steps, no samples or checkpoints; it evaluates with the
# fewest bootstrap resamples the config accepts and 8 new tokens at most; its data: the first
# few lines of each of the example's files.
SMOKE_TRAIN = {"max_steps": 2, "batch_tokens": 256, "max_seq_len": 128, "eval_every": 0,
               "save_every": 0, "samples": 0}
SMOKE_EXAMPLES = 8


def tiny_model(folder: Path) -> Path:
    """The test suite's tiny Llama (2 layers, hidden 32, a 512-token BPE with ChatML), saved in
    ``folder``: one definition for the tests and every smoke run (``tests/conftest.py``)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _build_tiny_model

    return _build_tiny_model(Path(folder))


def smoke_config(config: Path, folder: Path, model_dir: Path, *, steps: int = 2,
                 output_dir: Path | None = None) -> Path:
    """``config`` (an example's YAML) shrunk to a smoke run, written into ``folder``: the model
    ``model_dir``, each data file cut to its first ``SMOKE_EXAMPLES`` lines (a multitask
    config's per task), ``steps`` optimizer steps, runs under ``output_dir`` (default
    ``folder/runs``)."""
    import yaml

    config = Path(config).resolve()
    raw = yaml.safe_load(config.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    raw["model"] = {**raw.get("model", {}), "path": str(model_dir)}
    raw["output_dir"] = str(output_dir or folder / "runs")
    raw["train"] = {**raw.get("train", {}), **SMOKE_TRAIN, "max_steps": steps}
    data = raw["data"]
    for section in (raw, *data.get("tasks", [])):
        if "eval" in section:  # a random model never stops early: cap what it generates
            section["eval"].update(bootstrap=100, max_new_tokens=min(
                8, section["eval"].get("max_new_tokens", 8)))
    for number, section in enumerate([data, *data.get("tasks", [])]):
        for split in ("train", "validation", "test"):
            files = section.get(split)
            if files:
                first = files if isinstance(files, str) else files[0]
                section[split] = str(first_lines(config.parent / first,
                                                  folder / f"{number}-{split}.jsonl"))
    path = folder / config.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def first_lines(source: Path, target: Path) -> Path:
    """The first ``SMOKE_EXAMPLES`` lines of the JSONL file ``source``, written to ``target``."""
    lines = source.read_text(encoding="utf-8").splitlines()[:SMOKE_EXAMPLES]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def result_path(out: Path | None, name: str) -> Path:
    """Where a smoke run writes ``name``: ``out`` if given and outside the repository, else a
    new temporary folder (a committed result file is never a smoke run's target)."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix="tunelab-smoke-")) / name
    if Path(out).resolve().is_relative_to(ROOT):
        raise SystemExit(f"--smoke writes its result outside the repository, not to {out}: "
                         "leave out --out (a temporary folder) or name a path outside it")
    return Path(out)


def tunelab(args: list[str], log: Path) -> int:
    """``tunelab ARGS`` in this process (``tunelab.cli.main``, what the command runs after its
    jemalloc re-execution), its output written to ``log``; the exit code.

    A smoke run spends seconds, not the interpreter's start-up per command. ``tunelab train``
    keeps bitsandbytes out of its process for good (``model/adapters.without_bitsandbytes``);
    this process goes on after the command, so that block is lifted again.
    """
    from tunelab import cli

    blocked_before = "bitsandbytes" in sys.modules
    code = 0
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), \
            contextlib.redirect_stderr(handle):
        argv, sys.argv = sys.argv, ["tunelab", *map(str, args)]
        try:
            cli.main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        finally:
            sys.argv = argv
            if not blocked_before and sys.modules.get("bitsandbytes", False) is None:
                del sys.modules["bitsandbytes"]
    return code


def tiny_run(folder: Path, name: str, model_dir: Path,
             config: Path = ROOT / "examples" / "sentiment" / "config.yaml") -> Path:
    """A finished smoke run of an example config (sentiment by default) on ``model_dir``,
    trained by ``tunelab train`` in this process; its run directory."""
    path = smoke_config(config, folder / name, model_dir)
    log = folder / f"{name}-train.log"
    code = tunelab(["train", str(path), "--overwrite", "--set", f"name={name}"], log)
    if code != 0:
        raise SystemExit(f"{log.read_text()[-3000:]}\ntunelab train {path} failed (exit {code})")
    return folder / name / "runs" / name
