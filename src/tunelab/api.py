"""The Python API: one function per command, each with named arguments; the CLI calls these.

``import tunelab`` exports them lazily (``tunelab/__init__.py``), so ``tunelab.finetune(config)``
and ``tunelab train config.yaml`` do the same thing. What a command decides beyond parsing its
options (a multitask config evaluated task by task, the base-only run, the distributed strategy
a plan assumes, a full disk while the run is written, the sweep's trials then its final word)
is decided here, not in ``cli.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Config, load_config
from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from tunelab.eval.result import EvalResult
    from tunelab.planner.predict import Plan
    from tunelab.run.directory import RunDir
    from tunelab.run.manifest import Manifest
    from tunelab.ship.export import ExportResult
    from tunelab.train.state import TrainResult

__all__ = ["Config", "Run", "assess", "check_data", "evaluate", "export", "finetune",
           "load_config", "load_run", "plan", "sweep"]

Source = Config | str | Path


def _config(source: Source) -> Config:
    return source if isinstance(source, Config) else load_config(source)


def finetune(config: Source | None = None, *, resume: str | Path | None = None,
             overwrite: bool = False, stop_after_steps: int | None = None,
             console: Console | None = None) -> TrainResult:
    """Fine-tune as ``config`` says and write its run directory; or continue the run
    ``resume`` exactly (its own saved config, unless ``config`` is given).

    ``stop_after_steps`` stops after that many optimizer steps with a checkpoint, as an
    interruption would. A full disk while the run is written raises a ``RunError`` that says
    what was kept and how to go on.
    """
    from tunelab.run.directory import RunDir
    from tunelab.train.checkpoint import disk_full, write_failed
    from tunelab.train.loop import train

    if config is None and resume is None:
        raise ConfigError("give a config, or the run directory to resume", where="finetune",
                          fix="tunelab.finetune('examples/sentiment/config.yaml')")
    cfg = RunDir(resume).read_config() if config is None else _config(config)
    try:
        return train(cfg, resume=resume, overwrite=overwrite,
                     stop_after_steps=stop_after_steps, console=console)
    except Exception as error:  # a full disk while writing the final adapter or the manifest
        if disk_full(error) is None:
            raise
        raise write_failed(disk_full(error),
                           run_dir=Path(resume) if resume else cfg.run_dir) from None


def evaluate(config: Source, *, run_dir: str | Path | None = None, base: bool = True,
             tuned: bool = True, console: Console | None = None
             ) -> EvalResult | dict[str, EvalResult]:
    """Evaluate the base model and the tuned one on the config's test split, with intervals.

    ``run_dir`` defaults to the config's run when it exists; with no run (or ``tuned=False``)
    the base model is evaluated alone and its results filed in a run directory of their own,
    ``<name>-base``. A multitask config evaluates each task with an eval section and returns
    ``{task: EvalResult}``.
    """
    from tunelab.eval.evaluate import evaluate as evaluate_one
    from tunelab.eval.multitask import evaluate_tasks
    from tunelab.run.directory import RunDir, create_run

    cfg = _config(config)
    evaluator = evaluate_tasks if cfg.data.tasks else evaluate_one
    if run_dir is None and tuned and RunDir(cfg.run_dir).is_run():
        run_dir = cfg.run_dir
    if run_dir is None:  # the base model alone: its results still get a run directory
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-base"})
        own = RunDir(cfg.run_dir)
        run_dir = own.path if own.is_run() else create_run(cfg).path
        return evaluator(cfg, run_dir=run_dir, base=True, tuned=False, console=console)
    return evaluator(cfg, run_dir=run_dir, base=base, tuned=tuned, console=console)


def plan(config: Source, *, calibrate: bool = False, nproc: int = 1,
         memory_budget_bytes: int | None = None) -> Plan:
    """Predict peak memory, tokens/s and wall time of ``finetune(config)`` before it starts.

    ``calibrate`` runs a few real steps in a subprocess and scales the prediction by them;
    ``nproc`` ranks add each rank's memory under the strategy ``train.distributed`` gives;
    ``memory_budget_bytes`` judges the fit against that instead of the device's free memory.
    """
    from tunelab.planner.predict import plan as predict
    from tunelab.train.calibrate import calibrate_run
    from tunelab.train.distributed import strategy_for

    cfg = _config(config)
    return predict(cfg, calibration=calibrate_run(cfg) if calibrate else None, nproc=nproc,
                   strategy=strategy_for(cfg.method.kind, cfg.train.distributed),
                   memory_budget_bytes=memory_budget_bytes)


def check_data(source: Source, *, max_seq_len: int | None = None, model: str | None = None,
               console: Console | None = None) -> dict:
    """Validate a config's data (or one data file) and return its quality report: duplicates,
    leakage between splits, balance, token lengths and what ``max_seq_len`` cuts."""
    from tunelab.data.check import check_data as check

    return check(source, max_seq_len=max_seq_len, model=model, console=console)


def assess(config: Source, *, shots: Sequence[int] | None = None,
           fractions: Sequence[float] | None = None, seeds: int | Sequence[int] | None = None,
           target: float | None = None, baselines: Sequence[str] = (),
           baseline_shots: Sequence[int] | None = None, prices: Sequence[str] = (),
           device_cost_per_hour: float | None = None,
           bases: Sequence[str] = (), overwrite: bool = False,
           console: Console | None = None) -> dict:
    """Should we fine-tune? Prompting arms with ``shots`` demonstrations (default 0 and 4) of
    the base model and of each endpoint in ``baselines`` ("NAME=URL[#model]", any
    OpenAI-compatible server, asked with ``baseline_shots`` demonstrations, default ``shots``;
    ``prices`` "NAME=IN/OUT" in USD per 1M tokens), a learning curve
    over growing ``fractions`` of the training data (default 1/8, 1/4, 1/2, 1) trained with
    ``seeds`` training seeds per fraction (one count, or one per fraction; default two for
    the fractions up to a quarter, one above), its fit, cost and verdict; resumes an
    interrupted assessment.

    With ``bases`` (model paths or hub ids), one assessment per base model (``<name>-<base>``)
    and a page that puts them side by side and names the cheapest base that meets ``target``
    (or, without one, whose verdict is to fine-tune): ``<output_dir>/<name>-bases/``; returns
    {"bases": that comparison, "assessments": each assessment}."""
    from tunelab.eval.endpoint import parse_endpoint
    from tunelab.experiments.assess import DEFAULT_FRACTIONS, DEFAULT_SHOTS, parse_seeds
    from tunelab.experiments.assess import assess as run_assessment

    fractions = sorted(DEFAULT_FRACTIONS if fractions is None else fractions)
    if isinstance(seeds, int):
        seeds = [seeds] * len(fractions)
    elif isinstance(seeds, str):
        seeds = parse_seeds(seeds, fractions)
    endpoints = [parse_endpoint(text) for text in baselines]
    names = [endpoint.name for endpoint in endpoints]
    if len(set(names)) < len(names) or "base" in names:
        raise ConfigError(f"--baseline names must be distinct and not 'base': {names}",
                          where="--baseline", fix="name each endpoint once: NAME=URL[#model]")
    priced = dict(_price(text) for text in prices)
    unknown = sorted(set(priced) - set(names))
    if unknown:
        raise ConfigError(f"--price names {unknown}, which no --baseline has",
                          where="--price", fix=f"use one of the --baseline names: {names}")
    settings = dict(shots=DEFAULT_SHOTS if shots is None else shots, fractions=fractions,
                    seeds=seeds, target=target, endpoints=endpoints,
                    endpoint_shots=baseline_shots, prices=priced,
                    device_cost_per_hour=device_cost_per_hour, overwrite=overwrite,
                    console=console)
    loaded = _config(config)
    if not bases:
        return run_assessment(loaded, **settings)
    from rich.console import Console

    from tunelab.experiments.bases import compare_bases, render_bases, write_bases_report

    results = [run_assessment(_on_base(loaded, base), **settings) for base in bases]
    summary = compare_bases(results, bases=list(bases), target=target)
    write_bases_report(summary, Path(loaded.output_dir) / f"{loaded.name}-bases")
    render_bases(summary, console or Console())
    return {"bases": summary, "assessments": results}


def _on_base(config: Config, base: str) -> Config:
    """``config`` on another base model, named after it."""
    copy = config.model_copy(deep=True)
    path = Path(base)
    if path.suffix == ".gguf":
        copy.model.path, copy.model.gguf_file = str(path.parent), path.name
    else:
        copy.model.path, copy.model.gguf_file = base, None
    slug = "".join(c if c.isalnum() or c in "-." else "-" for c in path.stem or base)
    copy.name = f"{config.name}-{slug.strip('-.') or 'base'}"
    return copy


def _price(text: str):
    from tunelab.eval.endpoint import parse_price

    price = parse_price(text)
    return price.name, price


def export(run_dir: str | Path, *, to: str, out: str | Path | None = None, quant: str = "f16",
           check: bool = True, max_lora_rank: int = 16) -> ExportResult:
    """Export a run: ``merged`` weights, ``gguf`` (with an Ollama Modelfile) or the ``adapter``
    (checked for vLLM); ``check`` reloads the export and compares its logits."""
    from tunelab.ship.export import export_run

    return export_run(run_dir, to, out=out, quant=quant, check=check,
                      max_lora_rank=max_lora_rank)


def sweep(sweep_file: str | Path, *, workers: int = 1, storage: str | None = None,
          repeat_best: int = 0, console: Console | None = None) -> dict[str, Any]:
    """Run a hyperparameter sweep: trials are runs judged on validation; then the best trial and
    the base config are compared on test (``final.json``, returned)."""
    from rich.console import Console

    from tunelab.experiments.final import final_word
    from tunelab.experiments.space import load_sweep
    from tunelab.experiments.sweep import (
        create_sweep,
        load_study,
        reclaim_dead_trials,
        run_workers,
    )

    console = console or Console()
    opened = create_sweep(load_sweep(sweep_file), storage_url=storage)
    run_workers(opened.directory, workers, console=console)
    study = load_study(opened)
    reclaim_dead_trials(study, opened)
    return final_word(study, opened, repeat_best=repeat_best, console=console)


@dataclass
class Run:
    """A run read back from its directory: what ``load_run`` returns."""

    directory: RunDir
    config: Config
    manifest: Manifest | None
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl, one record per line
    evals: dict[Path, EvalResult] = field(default_factory=dict)  # eval/*.json

    def model(self, *, base: bool = False) -> tuple[Any, Any]:
        """(model, tokenizer): the base with the run's adapter (or its full weights), ready to
        generate; ``base=True`` leaves the adapter off."""
        from tunelab.run.load import load_run_model

        model, tokenizer, _ = load_run_model(self.directory, base=base)
        return model, tokenizer


def load_run(run_dir: str | Path) -> Run:
    """A run directory's config, manifest, metrics and evaluations (the model on demand)."""
    from tunelab.run.directory import RunDir
    from tunelab.run.metrics import read_metrics

    directory = RunDir(run_dir).require()
    return Run(directory, directory.read_config(need_data=False), directory.read_manifest(),
               read_metrics(directory), directory.read_evals())
