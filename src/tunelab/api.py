"""The Python API: one function per command, each with named arguments; the CLI calls these.

``import tunelab`` exports them lazily (``tunelab/__init__.py``), so ``tunelab.finetune(config)``
and ``tunelab train config.yaml`` do the same thing. What a command decides beyond parsing its
options (a multitask config evaluated task by task, the base-only run, the distributed strategy
a plan assumes, a full disk while the run is written, the sweep's trials then its final word)
is decided here, not in ``cli.py``.

From a notebook, ``finetune``, ``evaluate`` and ``assess`` also take in-memory data
(``train=``, ``validation=``, ``test=``: a list of dicts, a ``datasets.Dataset``, a pandas
DataFrame; or ``data=``, a ``DatasetDict`` or ``{split: rows}``), read and checked as files are
and written into the run directory (``run/supplied.py``), and ``finetune`` and ``evaluate`` a
model and tokenizer already loaded (``model=``, ``tokenizer=``). docs/python-api.md says how.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Config, config_from_dict, load_config
from tunelab.errors import ConfigError, RunError

if TYPE_CHECKING:
    from rich.console import Console

    from tunelab.data.records import Record
    from tunelab.eval.result import EvalResult
    from tunelab.model.load import Preloaded
    from tunelab.planner.predict import Plan
    from tunelab.run.directory import RunDir
    from tunelab.run.manifest import Manifest
    from tunelab.run.supplied import Supplied
    from tunelab.ship.export import ExportResult
    from tunelab.train.state import TrainResult

__all__ = ["Config", "Run", "assess", "check_data", "evaluate", "export", "finetune",
           "load_config", "load_run", "plan", "sweep"]

Source = Config | str | Path | Mapping[str, Any]
#: In-memory data: a list of dicts, a ``datasets.Dataset`` or a pandas DataFrame.
Rows = Any


#: What ``data.train`` names while a config whose training data is handed in is validated
#: (the config needs a train split); the in-memory data's file replaces it before any read.
_HANDED_IN = "hf://tunelab/handed-in"


def _config(source: Source, *, train_handed_in: bool = False) -> Config:
    """A Config as given, read from a YAML file, or validated from a dict; with the training
    data handed in, the config need not name train files (nor a dict a data section)."""
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        raw = {**source, "data": dict(source.get("data") or {})}
        if train_handed_in:
            raw["data"]["train"] = _HANDED_IN
        return config_from_dict(raw)
    return load_config(source, {"data.train": _HANDED_IN} if train_handed_in else None)


def finetune(config: Source | None = None, *, train: Rows = None, validation: Rows = None,
             test: Rows = None, data: Mapping[str, Rows] | None = None, model: Any = None,
             tokenizer: Any = None, resume: str | Path | None = None,
             overwrite: bool = False, stop_after_steps: int | None = None,
             console: Console | None = None) -> TrainResult:
    """Fine-tune as ``config`` says and write its run directory; or continue the run
    ``resume`` exactly (its own saved config, unless ``config`` is given).

    ``train``, ``validation``, ``test`` (or ``data``: a DatasetDict or ``{split: rows}``) are
    in-memory data used instead of the config's files for those splits: checked as files are
    (errors name the row) and written into the run, ``data/<split>.jsonl``, which its saved
    config names. ``model`` and ``tokenizer``: a model already loaded (patched, quantised) that
    is trained instead of loading ``model.path``; tunelab applies the method to it in place
    (peft injects the adapter into it), and the manifest records the base as handed in.
    ``stop_after_steps`` stops after that many optimizer steps with a checkpoint, as an
    interruption would. A full disk while the run is written raises a ``RunError`` that says
    what was kept and how to go on.
    """
    from tunelab.run.directory import RunDir
    from tunelab.run.supplied import StagedData, Supplied, read_splits_in_memory
    from tunelab.train.checkpoint import disk_full, write_failed
    from tunelab.train.loop import train as run_training

    if config is None and resume is None:
        raise ConfigError("give a config, or the run directory to resume", where="finetune",
                          fix="tunelab.finetune('examples/sentiment/config.yaml')")
    given = _in_memory(train, validation, test, data, "finetune")
    cfg = RunDir(resume).read_config() if config is None else \
        _config(config, train_handed_in="train" in given)
    if given and cfg.data.tasks:
        from tunelab.eval.multitask import multitask_refused

        raise multitask_refused("finetune(train=...)", cfg)
    preloaded = _preloaded(model, tokenizer, cfg)
    if resume is not None:
        if given:
            raise ConfigError("a resumed run trains on the data it started with",
                              where="finetune(resume=...)",
                              fix="leave out train=/validation=/test=/data=, or start a new "
                              "run with them")
        supplied = _resumed(RunDir(resume), preloaded)
    else:
        supplied = None
        if preloaded is not None:
            cfg = _named_after(cfg, preloaded)
        if given:
            staged, cfg = StagedData.stage(read_splits_in_memory(given, cfg), cfg)
            supplied = Supplied(preloaded, staged)
        elif preloaded is not None:
            supplied = Supplied(preloaded)
    try:
        return run_training(cfg, resume=resume, overwrite=overwrite,
                            stop_after_steps=stop_after_steps, console=console,
                            supplied=supplied)
    except Exception as error:  # a full disk while writing the final adapter or the manifest
        if disk_full(error) is None:
            raise
        raise write_failed(disk_full(error),
                           run_dir=Path(resume) if resume else cfg.run_dir) from None
    finally:
        if supplied is not None and supplied.data is not None:
            supplied.data.discard()  # a run that took its data has moved the folder away


_SPLIT_NAMES = ("train", "validation", "test")
_SPLIT_HINTS = {"valid": "validation", "val": "validation", "dev": "validation",
                "eval": "validation", "evaluation": "validation"}


def _in_memory(train: Rows, validation: Rows, test: Rows, data: Mapping[str, Rows] | None,
               command: str) -> dict[str, Rows]:
    """The splits handed in, by name: ``train=``/``validation=``/``test=`` or ``data=``."""
    given = {"train": train, "validation": validation, "test": test}
    if data is not None:
        if any(rows is not None for rows in given.values()):
            raise ConfigError("data= and train=/validation=/test= are both given",
                              where=f"{command}(data=...)",
                              fix="give the splits one way: data={'train': ..., 'test': ...} "
                              "or train=..., test=...")
        if not isinstance(data, Mapping):
            raise ConfigError(f"data= is {type(data).__name__}, not a dict of splits",
                              where=f"{command}(data=...)",
                              fix="pass a DatasetDict or {'train': rows, 'validation': rows}; "
                              "one split goes to train=")
        unknown = [name for name in data if name not in _SPLIT_NAMES]
        if unknown:
            hint = {name: _SPLIT_HINTS[name] for name in unknown if name in _SPLIT_HINTS}
            raise ConfigError(f"data= has split(s) {unknown}; tunelab's splits are train, "
                              "validation and test", where=f"{command}(data=...)",
                              fix="rename them" + (f", e.g. {hint}" if hint else "") +
                              ", or drop the ones not to use")
        given = {name: data[name] for name in _SPLIT_NAMES if name in data}
    return {name: rows for name, rows in given.items() if rows is not None}


def _preloaded(model: Any, tokenizer: Any, config: Config) -> Preloaded | None:
    """``model``/``tokenizer`` handed in, or None; a tokenizer left out is ``model.path``'s
    (or, when the config names none, the one of the model's ``name_or_path``)."""
    from tunelab.model.load import Preloaded, load_tokenizer

    if model is None:
        if tokenizer is not None:
            raise ConfigError("a tokenizer was given without its model", where="tokenizer=",
                              fix="pass model= too, or leave tokenizer= out")
        return None
    if tokenizer is None:
        name = getattr(model, "name_or_path", None)
        tokenizer = load_tokenizer(config.model.path if "path" in config.model.model_fields_set
                                   or not name else name)
    return Preloaded(model, tokenizer)


def _named_after(config: Config, preloaded: Preloaded) -> Config:
    """``config`` whose ``model.path`` names the model handed in: what it says itself (its
    ``name_or_path``) unless the config names one. Refused where tunelab would load another
    model as the base (``train.init_from`` a full fine-tuning run)."""
    from tunelab.run.load import starting_point

    if starting_point(config).model_path != config.model.path:
        raise ConfigError("train.init_from names a full fine-tuning run, whose weights are the "
                          "base, and model= hands in another", where="model=",
                          fix="leave out model= (the run's weights are loaded), or "
                          "train.init_from")
    if "path" in config.model.model_fields_set:
        if preloaded.name_or_path is None:  # the adapter's sidecar names the base by it
            preloaded.model.name_or_path = config.model.path
        return config
    if preloaded.name_or_path is None:
        raise ConfigError("the model handed in has no name_or_path (it was built from a config,"
                          " not loaded with from_pretrained) and the config names no model.path,"
                          " so the run could not say what its base is", where="model=",
                          fix="save it (model.save_pretrained(folder)) and load it from there, "
                          "or set model.path in the config to what it is")
    named = config.model_copy(deep=True)
    named.model.path, named.model.gguf_file = preloaded.name_or_path, None
    return named


def _resumed(run: RunDir, preloaded: Preloaded | None) -> Supplied | None:
    """What a resumed run is handed: the model again, where its base was handed in (a patched
    base cannot be loaded from ``model.path``); its manifest's earlier record carried over."""
    from tunelab.model.load import describe_model
    from tunelab.run.supplied import Supplied

    manifest = run.read_manifest()
    carried = manifest.supplied if manifest is not None else None
    base = (carried or {}).get("base")
    if base and preloaded is None:
        raise RunError(f"{run} trained on a base model handed in from Python "
                       f"({base['class']} from {base['name_or_path']}); resuming here would "
                       "load model.path instead, which is that model only if it was never "
                       "changed", where=str(run),
                       fix=f"resume from Python with the same model: tunelab.finetune(resume="
                       f"'{run}', model=model, tokenizer=tokenizer)")
    if preloaded is not None and manifest is not None:
        was, now = manifest.model, describe_model(preloaded.model)
        keys = ("architecture", "vocab_size", "hidden_size", "num_layers")
        changed = [key for key in keys if was.get(key) != now.get(key)]
        if changed:
            differences = ", ".join(f"{key}: {was.get(key)} then, {now.get(key)} now"
                                    for key in changed)
            raise ConfigError(f"the model handed in is not the base {run} trained on "
                              f"({differences})", where="model=",
                              fix="hand in the model the run started with")
    if preloaded is None and not carried:
        return None
    return Supplied(preloaded, carried=carried)


def evaluate(config: Source, *, run_dir: str | Path | None = None, base: bool = True,
             tuned: bool = True, test: Rows = None, train: Rows = None,
             validation: Rows = None, data: Mapping[str, Rows] | None = None,
             model: Any = None, tokenizer: Any = None, console: Console | None = None
             ) -> EvalResult | dict[str, EvalResult]:
    """Evaluate the base model and the tuned one on the config's test split, with intervals.

    ``run_dir`` defaults to the config's run when it exists; with no run (or ``tuned=False``)
    the base model is evaluated alone and its results filed in a run directory of their own,
    ``<name>-base``. A multitask config evaluates each task with an eval section and returns
    ``{task: EvalResult}``.

    ``test`` (or ``data``) is in-memory evaluation data, checked as files are and written into
    the run (``data/test.jsonl``), whose saved config then names it, so ``tunelab eval`` on
    the run measures the same examples; a base-only evaluation also takes ``train`` (its
    few-shot pool) and ``validation``. ``model``/``tokenizer``: the base already loaded, used
    instead of ``model.path`` (the run's adapter is attached to it).
    """
    from tunelab.eval.evaluate import evaluate as evaluate_one
    from tunelab.eval.multitask import evaluate_tasks, multitask_refused
    from tunelab.run.directory import RunDir, create_run
    from tunelab.run.supplied import read_splits_in_memory

    given = _in_memory(train, validation, test, data, "evaluate")
    cfg = _config(config, train_handed_in="train" in given)
    if cfg.data.tasks and (given or model is not None):
        raise multitask_refused("evaluate(test=..., model=...)", cfg)
    preloaded = _preloaded(model, tokenizer, cfg)
    splits = read_splits_in_memory(given, cfg) if given else {}
    evaluator = evaluate_tasks if cfg.data.tasks else evaluate_one
    own_model = {"preloaded": preloaded} if preloaded is not None else {}
    if run_dir is None and tuned and RunDir(cfg.run_dir).is_run():
        run_dir = cfg.run_dir
    if run_dir is None:  # the base model alone: its results still get a run directory
        cfg = cfg.model_copy(update={"name": f"{cfg.name}-base"})
        own = RunDir(cfg.run_dir)
        run_dir = own.path if own.is_run() else create_run(cfg).path
        cfg = _evaluation_data(cfg, RunDir(run_dir), splits)
        return evaluator(cfg, run_dir=run_dir, base=True, tuned=False, console=console,
                         **own_model)
    cfg = _evaluation_data(cfg, RunDir(run_dir), splits)
    if tuned and preloaded is None:
        _note_supplied_base(RunDir(run_dir), console)
    return evaluator(cfg, run_dir=run_dir, base=base, tuned=tuned, console=console,
                     **own_model)


def _evaluation_data(config: Config, run: RunDir, splits: dict[str, list[Record]]) -> Config:
    """In-memory evaluation data written into ``run`` (``data/<split>.jsonl``) and named by
    its saved config; ``config`` reading those files. A trained run keeps its own train and
    validation data, so it takes ``test`` alone."""
    from tunelab.run.supplied import repoint_saved_config, with_files, write_into_run

    if not splits:
        return config
    if run.read_manifest() is not None and set(splits) - {"test"}:
        raise ConfigError(f"{run} trained on its own train and validation data; evaluating "
                          "it takes test= alone", where="evaluate(...)",
                          fix="leave out train=/validation= (a base-only evaluation, "
                          "tuned=False with no run, takes them)")
    files = write_into_run(run, splits)
    repoint_saved_config(run, files)
    return with_files(config, files)


def _note_supplied_base(run: RunDir, console: Console | None) -> None:
    """Say that a run whose base was handed in is evaluated on ``model.path`` as loaded."""
    manifest = run.read_manifest() if run.is_run() else None
    base = ((manifest.supplied if manifest else None) or {}).get("base")
    if base:
        from rich.console import Console

        (console or Console()).print(
            f"[yellow]note:[/] {run} trained on a base handed in from Python ({base['class']} "
            f"from {base['name_or_path']}); this evaluation loads model.path, which is that "
            "model only if it was never changed (else pass model=, tokenizer=)")


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


def assess(config: Source, *, train: Rows = None, validation: Rows = None, test: Rows = None,
           data: Mapping[str, Rows] | None = None, shots: Sequence[int] | None = None,
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
    {"bases": that comparison, "assessments": each assessment}.

    ``train``, ``validation``, ``test`` (or ``data``) are in-memory data, checked as files are
    and written into the assessment's folder (``data/<split>-<sha256>.jsonl``, so changed data
    is a changed config, never mixed with the runs of the old)."""
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
    given = _in_memory(train, validation, test, data, "assess")
    loaded = _config(config, train_handed_in="train" in given)
    if given:
        from tunelab.run.supplied import read_splits_in_memory

        splits = read_splits_in_memory(given, loaded)
        settings["overwrite"] = False  # done here, before the data is written into the folder
        if not bases:
            loaded = _assessment_data(loaded, splits, overwrite=overwrite)
    if not bases:
        return run_assessment(loaded, **settings)
    from rich.console import Console

    from tunelab.experiments.bases import compare_bases, render_bases, write_bases_report

    on_bases = [_on_base(loaded, base) for base in bases]
    if given:
        on_bases = [_assessment_data(on_base, splits, overwrite=overwrite)
                    for on_base in on_bases]
    results = [run_assessment(on_base, **settings) for on_base in on_bases]
    summary = compare_bases(results, bases=list(bases), target=target)
    write_bases_report(summary, Path(loaded.output_dir) / f"{loaded.name}-bases")
    render_bases(summary, console or Console())
    return {"bases": summary, "assessments": results}


def _assessment_data(config: Config, splits: dict[str, list[Record]], *,
                     overwrite: bool) -> Config:
    """``config`` reading in-memory ``splits`` written into its assessment's folder, named by
    their content; ``overwrite`` empties the folder first, as the assessment would."""
    import hashlib
    import shutil

    from tunelab.experiments.assess import assessment_folder
    from tunelab.run.directory import write_text
    from tunelab.run.supplied import jsonl_text, with_files

    folder = assessment_folder(config)
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    files = {}
    for split, records in splits.items():
        text = jsonl_text(records)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        files[split] = folder / "data" / f"{split}-{digest}.jsonl"
        if not files[split].is_file():
            write_text(files[split], text)
    return with_files(config, files)


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
        generate; ``base=True`` leaves the adapter off. A run whose base was handed in from
        Python loads ``model.path`` (a warning says so): the model itself is the one you hold,
        trained in place."""
        import warnings

        from tunelab.run.load import load_run_model

        supplied_base = ((self.manifest.supplied if self.manifest else None) or {}).get("base")
        if supplied_base:
            warnings.warn(f"{self.directory} trained on a base handed in from Python "
                          f"({supplied_base['class']}); loading model.path "
                          f"({self.config.model.path}), which is that model only if it was "
                          "never changed", stacklevel=2)
        model, tokenizer, _ = load_run_model(self.directory, base=base)
        return model, tokenizer


def load_run(run_dir: str | Path) -> Run:
    """A run directory's config, manifest, metrics and evaluations (the model on demand)."""
    from tunelab.run.directory import RunDir
    from tunelab.run.metrics import read_metrics

    directory = RunDir(run_dir).require()
    return Run(directory, directory.read_config(need_data=False), directory.read_manifest(),
               read_metrics(directory), directory.read_evals())
