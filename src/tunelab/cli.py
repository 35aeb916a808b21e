"""``tunelab <command>``: a thin layer over the library functions."""

from __future__ import annotations

import json
import logging
import re
import sys
import textwrap
import warnings
from pathlib import Path

import typer
import yaml
from rich.console import Console

from tunelab.errors import ConfigError, Interrupted, TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fine-tune language models on your own data.")
data_app = typer.Typer(no_args_is_help=True, help="Validate data and report on its quality.")
app.add_typer(data_app, name="data")
console = Console()
error_console = Console(stderr=True)


def _overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r} is not KEY=VALUE", where="--set",
                              fix="write e.g. --set train.lr=1e-4")
        overrides[key] = yaml.safe_load(value)
    return overrides


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _bytes(text: str, option: str) -> int:
    """``3GB`` → 3·10⁹, ``2.5GiB`` → 2.5·2³⁰ (a plain number is bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if unit is None:
        raise ConfigError(f"{option} {text!r} is not an amount of memory", where=option,
                          fix="write e.g. 3GB, 2.5GiB or 800MB")
    return int(float(match.group(1)) * unit)


def _print_version(value: bool) -> None:
    if value:
        from tunelab.environment import version_line

        console.print(version_line(), markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version,
                                          is_eager=True, help="Print tunelab's version.")):
    pass


@app.command()
def train(
    config: Path | None = typer.Argument(None, help="YAML config of the run."),
    resume: Path | None = typer.Option(None, help="Continue this run directory exactly."),
    overwrite: bool = typer.Option(False, help="Replace an existing run directory."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: train.lr=1e-4"),
    nproc: int | None = typer.Option(None, help="Train with N ranks on this machine (runs "
                                     "torchrun; DDP or FSDP2 as train.distributed says)."),
) -> None:
    """Fine-tune a model: data files → LoRA or full fine-tuning → a run directory."""
    from tunelab.api import finetune
    from tunelab.config import load_config
    from tunelab.model.adapters import without_bitsandbytes
    from tunelab.run import RunDir

    if resume is not None:
        cfg = RunDir(resume).read_config()
    elif config is None:
        raise ConfigError("give a config file, or --resume RUN", where="tunelab train",
                          fix="tunelab train examples/sentiment/config.yaml")
    else:
        cfg = load_config(config, _overrides(set_))
    # A command trains once per process, so it may keep bitsandbytes out of it for good; the
    # library cannot (a later QLoRA run in the same Python process would find it gone).
    without_bitsandbytes(cfg.method.kind)
    if nproc is not None:
        from tunelab.train.distributed import launch

        rank_args = ([str(config)] if resume is None else ["--resume", str(resume)]) + \
            (["--overwrite"] if overwrite else []) + [arg for s in set_ for arg in ("--set", s)]
        launch(nproc, rank_args, run_dir=Path(resume) if resume else cfg.run_dir)
        return
    try:
        finetune(cfg, resume=resume, overwrite=overwrite, console=console)
    except KeyboardInterrupt:
        raise Interrupted("training was interrupted", where=str(cfg.run_dir),
                          fix="continue it with tunelab train --resume RUN (the checkpoint "
                          "written at the interruption is used)") from None


@data_app.command("check")
def data_check(
    source: Path = typer.Argument(..., help="A config (its train/validation data) or a data file."),
    max_seq_len: int | None = typer.Option(None, help="Report truncation at this length."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report here."),
) -> None:
    """Validate data files and print a quality report."""
    from tunelab.api import check_data

    report = check_data(source, max_seq_len=max_seq_len, console=console)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"Report written to {json_out}")


@app.command()
def generate(
    run: Path = typer.Argument(..., help="A run directory made by tunelab train."),
    prompt: str = typer.Option(..., help="The prompt text."),
    max_new_tokens: int = typer.Option(64, help="Most new tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass when sampling."),
    seed: int = typer.Option(0, help="Seed for sampling."),
    chat: bool | None = typer.Option(None, help="Wrap the prompt in the chat template "
                                        "(default: when the run trained on chat data)."),
    base: bool = typer.Option(False, help="Use the base model, without the run's adapter."),
) -> None:
    """Load base + adapter of a run and complete a prompt."""
    from tunelab.data.render import user_prompt
    from tunelab.eval.generate import generate_texts
    from tunelab.run import load_run_model

    model, tokenizer, cfg = load_run_model(run, base=base)
    if chat is None:
        chat = cfg.data.format == "chat" or _trained_on_chat(run)
    text = user_prompt(prompt, tokenizer, chat=chat, chat_template=cfg.data.chat_template,
                       chat_template_kwargs=cfg.data.chat_template_kwargs)
    output = generate_texts(model, tokenizer, [text], max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, seed=seed)[0]
    console.print(output, markup=False, highlight=False)


@app.command("eval")
def eval_(
    config: Path = typer.Argument(..., help="YAML config with an eval section."),
    run: Path | None = typer.Option(None, help="Run directory whose tuned model to evaluate "
                                       "(default: the config's run, if it exists)."),
    base: bool = typer.Option(True, help="Also evaluate the base model (--no-base: tuned only)."),
    base_only: bool = typer.Option(False, "--base-only", help="Evaluate the base model alone."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: eval.shots=3"),
) -> None:
    """Evaluate base and tuned models: metrics with intervals, prompt sensitivity, comparison
    (a multitask config: every task with its own metric)."""
    from tunelab.api import evaluate
    from tunelab.config import load_config

    evaluate(load_config(config, _overrides(set_)), run_dir=run, base=base or base_only,
             tuned=not base_only, console=console)


@app.command()
def plan(
    config: Path = typer.Argument(..., help="YAML config of the run to plan."),
    calibrate: bool = typer.Option(False, help="Measure a few real training steps and scale."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the plan here."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: train.lr=1e-4"),
    nproc: int = typer.Option(1, min=1, help="Also predict each rank's memory with N ranks "
                              "(DDP or FSDP2, as train.distributed says)."),
    memory_budget: str | None = typer.Option(None, help="Judge the fit against this much memory "
                                             "(e.g. 3GB, 2.5GiB, 800MB) instead of what the "
                                             "device has free; says which train.memory fits."),
) -> None:
    """Predict peak memory, tokens/s and wall time of a run before starting it."""
    from tunelab.api import plan as make_plan
    from tunelab.config import load_config
    from tunelab.planner.render import render_plan

    budget = None if memory_budget is None else _bytes(memory_budget, "--memory-budget")
    result = make_plan(load_config(config, _overrides(set_)), calibrate=calibrate, nproc=nproc,
                       memory_budget_bytes=budget)
    render_plan(result, console)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2, default=str))


@app.command()
def assess(
    config: Path = typer.Argument(..., help="YAML config with train, validation and test data."),
    shots: str = typer.Option("0,4", help="Demonstrations of the prompting baselines."),
    fractions: str = typer.Option("1/8,1/4,1/2,1", help="Fractions of the training data of "
                                  "the learning curve (nested, seeded)."),
    seeds: str | None = typer.Option(None, help="Training seeds per fraction: one count "
                                     "(every fraction) or one per fraction, e.g. 3,3,2,1 "
                                     "(default: 2 up to a quarter of the data, 1 above)."),
    target: float | None = typer.Option(None, help="Metric to reach: how many examples it "
                                        "needs."),
    baseline: list[str] = typer.Option([], "--baseline", help="Another model to prompt, from "
                                       "any OpenAI-compatible server: NAME=URL[#model] "
                                       "(repeatable; key from $OPENAI_API_KEY)."),
    baseline_shots: str | None = typer.Option(None, help="Demonstrations of the --baseline "
                                              "arms (default: --shots)."),
    price: list[str] = typer.Option([], "--price", help="An endpoint's price, USD per 1M "
                                    "prompt/completion tokens: NAME=IN/OUT, e.g. big=0.15/0.6."),
    device_cost: float | None = typer.Option(None, "--device-cost", help="What this machine "
                                             "costs per hour (USD), for the tuned model's cost "
                                             "per request and the break-even."),
    base: list[str] = typer.Option([], "--base", help="Assess each of these base models "
                                   "(repeatable) and name the cheapest that meets --target "
                                   "(or whose verdict is to fine-tune)."),
    overwrite: bool = typer.Option(False, help="Start again instead of resuming."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: "
                                   "eval.max_examples=100"),
) -> None:
    """Should we fine-tune, and is more data worth it? Baselines, learning curve, cost, verdict."""
    from tunelab.api import assess as run_assessment
    from tunelab.config import load_config
    from tunelab.experiments.assess import parse_fractions, parse_seeds, parse_shots

    cfg = load_config(config, _overrides(set_))
    chosen = parse_fractions(fractions)
    try:
        run_assessment(cfg, shots=parse_shots(shots), fractions=chosen,
                       seeds=None if seeds is None else parse_seeds(seeds, chosen),
                       target=target, baselines=baseline,
                       baseline_shots=None if baseline_shots is None else parse_shots(
                           baseline_shots), prices=price,
                       device_cost_per_hour=device_cost, bases=base, overwrite=overwrite,
                       console=console)
    except KeyboardInterrupt:
        raise Interrupted("the assessment was interrupted", where=f"{cfg.run_dir}-assess",
                          fix="run the same tunelab assess command again: finished runs and "
                          "evaluations are kept, an interrupted run resumes from its last "
                          "checkpoint") from None


@app.command()
def report(
    run: Path = typer.Argument(..., help="A run directory."),
    output: Path | None = typer.Option(None, help="Where to write (default RUN/report.html)."),
) -> None:
    """Write one self-contained HTML report: loss curves, metrics, sensitivity, examples."""
    from tunelab.report.html import write_report

    path = write_report(run, output=output)  # a RunError when RUN is not a run directory
    console.print(f"Report written to {path}")


@app.command("config")
def config_(
    key: str | None = typer.Argument(None, help="A field (train.lr) or a section (train); "
                                     "every field when left out. Or import (see --from)."),
    file: Path | None = typer.Argument(None, help="import: the other tool's config file."),
    explain: bool = typer.Option(False, "--explain", help="Print type, default and meaning."),
    from_: str | None = typer.Option(None, "--from", help="import: the tool that wrote FILE: "
                                     "axolotl, trl or llamafactory."),
    output: Path | None = typer.Option(None, "-o", "--output", help="import: the tunelab "
                                       "config to write (default FILE's NAME.tunelab.yaml)."),
    force: bool = typer.Option(False, "--force", help="import: overwrite --output."),
) -> None:
    """Explain config fields (tunelab config --explain [KEY]), or convert another tool's config
    (tunelab config import --from axolotl|trl|llamafactory FILE [-o OUT])."""
    from tunelab.config import explain as explain_fields
    from tunelab.config import render_explanation

    if key == "import":
        _import_config(from_, file, output, force)
        return
    if not explain:
        raise ConfigError("tunelab config explains fields (--explain) or imports another "
                          "tool's config (import)", where="tunelab config",
                          fix=f"add --explain: tunelab config --explain {key or '[KEY]'}, or "
                          "tunelab config import --from axolotl FILE")
    console.print(render_explanation(explain_fields(key)), markup=False, highlight=False,
                  soft_wrap=True)


def _import_config(tool: str | None, file: Path | None, output: Path | None,
                   force: bool) -> None:
    """Translate, validate as tunelab will read it, write, then show what was carried over."""
    from rich.table import Table

    from tunelab.config import config_from_dict
    from tunelab.importers import TOOLS, default_output, import_config

    if tool is None or file is None:
        raise ConfigError("tunelab config import needs the tool (--from) and the file",
                          where="tunelab config import",
                          fix=f"tunelab config import --from {'|'.join(TOOLS)} FILE [-o OUT]")
    out = output or default_output(file)
    if out.exists() and not force:
        raise ConfigError(f"{out} exists", where="tunelab config import -o",
                          fix="pass --force to overwrite it, or -o another path")
    imported = import_config(tool, file, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_from_dict(imported.config, source=f"{out} (imported from {file})",
                     base_dir=out.parent)
    out.write_text(imported.yaml())
    table = Table(title=f"{TOOLS[tool]} {file} → {out}")
    for column in (TOOLS[tool], "tunelab", "", "why / what differs"):
        table.add_column(column, overflow="fold")
    for row in imported.rows:
        table.add_row(row.source, row.target or "—", row.kind, row.note)
    console.print(table)
    console.print(f"Wrote {out}. Check it (tunelab data check {out}), then: tunelab train {out}")


@app.command()
def export(
    run: Path = typer.Argument(..., help="A run directory made by tunelab train."),
    to: str = typer.Option(..., "--to", help="merged (HF folder), gguf (llama.cpp / Ollama) "
                           "or adapter (PEFT, checked for vLLM)."),
    out: Path | None = typer.Option(None, help="Folder to create (default RUN/export/KIND)."),
    quant: str = typer.Option("f16", help="GGUF tensor type: f16, bf16, q8_0, q4_0 or q4_1."),
    max_lora_rank: int = typer.Option(16, help="vLLM --max-lora-rank to check the adapter "
                                      "against."),
    check: bool = typer.Option(True, help="Reload the export and compare its logits."),
) -> None:
    """Export a run: merged weights, a GGUF file with an Ollama Modelfile, or the adapter."""
    from tunelab.api import export as export_run
    from tunelab.ship.export import render_export

    result = export_run(run, to=to, out=out, quant=quant, check=check,
                        max_lora_rank=max_lora_rank)
    render_export(result, console)


@app.command()
def serve(
    runs: list[str] | None = typer.Argument(None, help="Run directories whose adapters to "
                                            "serve; NAME=RUN serves a run under another model "
                                            "name. With none, --base alone is served."),
    base: str | None = typer.Option(None, help="Base model (default: the one the runs were "
                                    "trained on); with no runs, the model served: a folder, "
                                    "GGUF file, hub id or embedded:NAME."),
    api_key: str | None = typer.Option(None, envvar="TUNELAB_API_KEY",
                                       help="Require 'Authorization: Bearer KEY'."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    engine: str = typer.Option("own", help="What generates: own (tunelab's, no extra "
                               "dependency), llama.cpp (llama-server on GGUF exports of the "
                               "base and adapters) or vllm (vllm serve; CUDA). The API is "
                               "the same."),
) -> None:
    """Serve runs through an OpenAI-compatible API: one base, each run's adapter by name (or,
    with --base and no runs, a bare base model)."""
    try:
        from tunelab.ship.serve import serve as run_server
    except ModuleNotFoundError as error:
        raise ConfigError(f"tunelab serve needs the package {error.name}, which is not "
                          "installed", where="tunelab serve",
                          fix='pip install -e ".[serve]" (FastAPI and uvicorn)') from None
    run_server(runs or [], base=base, api_key=api_key, host=host, port=port, console=console,
               engine=engine)


@app.command("chat")
def chat_(
    run: Path = typer.Argument(..., help="A run directory made by tunelab train."),
    system: str | None = typer.Option(None, help="A system prompt for the conversation."),
    max_new_tokens: int = typer.Option(256, min=1, help="Most new tokens per reply."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: int | None = typer.Option(None, help="Seed for sampling."),
    base: bool = typer.Option(False, help="Chat with the base model, without the adapter."),
) -> None:
    """Chat with a run's model in the terminal (or with piped lines); /reset, /exit."""
    from tunelab.ship.chat import chat

    chat(run, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
         top_p=top_p, seed=seed, base=base)


@app.command()
def sweep(
    sweep_file: Path | None = typer.Argument(None, help="Sweep YAML: base config, space, "
                                             "trials, objective."),
    workers: int = typer.Option(1, min=1, help="Local worker processes."),
    join: str | None = typer.Option(None, help="Add one worker to a running sweep: its "
                                    "directory or its storage URL."),
    storage: str | None = typer.Option(None, help="An Optuna RDB URL (e.g. postgresql://...) "
                                       "instead of the journal file, for workers on several "
                                       "machines."),
    repeat_best: int = typer.Option(0, help="Retrain the best configuration with K more "
                                    "seeds, to measure the noise between seeds."),
) -> None:
    """Sweep hyperparameters and data formats: trials are runs judged on validation data; the
    best and the base config are compared on the test split."""
    from tunelab.api import sweep as run_sweep
    from tunelab.experiments.sweep import run_worker

    try:
        if join is not None:
            run_worker(join, console=console)
            return
        if sweep_file is None:
            raise ConfigError("give a sweep file, or --join SWEEP_DIR", where="tunelab sweep",
                              fix="tunelab sweep examples/sentiment/sweep.yaml --workers 2")
        run_sweep(sweep_file, workers=workers, storage=storage, repeat_best=repeat_best,
                  console=console)
    except KeyboardInterrupt:
        raise Interrupted("the sweep was interrupted; the running trials are marked failed and "
                          "queued again", where=str(join or sweep_file),
                          fix="continue with tunelab sweep --join SWEEP_DIR") from None


@app.command()
def compare(
    paths: list[Path] = typer.Argument(..., help="Run directories and sweep directories."),
    output: Path | None = typer.Option(None, help="The HTML page to write (default: "
                                       "SWEEP/compare.html for one sweep, else compare.html)."),
) -> None:
    """Rank runs by their objective with intervals, diff the best config against the base, plot
    metric against cost, and (for sweeps) hyperparameter importance, on one HTML page."""
    from tunelab.experiments.compare import compare_runs, render_comparison, write_comparison

    comparison = compare_runs(paths)
    render_comparison(comparison, console)
    path = write_comparison(comparison, output)
    console.print(f"Comparison written to {path}")


@app.command("env")
def env_(json_out: bool = typer.Option(False, "--json", help="Print JSON instead.")) -> None:
    """Versions, accelerators, machine and cache, as one block to paste into a bug report."""
    from tunelab.environment import collect, render

    env = collect()
    console.print(json.dumps(env.to_dict(), indent=2) if json_out else render(env),
                  markup=False, highlight=False, soft_wrap=True)


@app.command("init")
def init_(
    folder: Path | None = typer.Argument(None, help="Where to write (default ./NAME)."),
    example: str = typer.Option(..., "--example", help="A shipped example: sentiment, ner, "
                                "translation, qa, summarisation, arithmetic, sentiment/chat, ..."),
    force: bool = typer.Option(False, help="Write into a folder that is not empty."),
) -> None:
    """Start from a shipped example: its configs and data, written to a folder of your own."""
    from tunelab.examples_init import init_example

    written = init_example(example, folder, force=force)
    console.print(f"Wrote {len(written.files)} files to {written.folder}", markup=False,
                  highlight=False, soft_wrap=True)  # paths whole, to be copied
    for command, paths in (("train", written.configs), ("sweep", written.sweeps)):
        for path in paths:
            console.print(f"  tunelab {command} {path}", markup=False, highlight=False,
                          soft_wrap=True)


def _trained_on_chat(run: Path) -> bool:
    from tunelab.run import RunDir

    manifest = RunDir(run).read_manifest()
    return manifest is not None and manifest.data_report.get("format") == "chat"


def entry() -> None:
    """The ``tunelab`` command: a training command re-executes itself under jemalloc first
    where ``train.allocator`` asks for it and it is installed (``tunelab/allocator.py``)."""
    from tunelab.allocator import preload

    preload(sys.argv)
    main()


def main() -> None:
    """Entry point: run the app; a TunelabError becomes one paragraph and its exit code."""
    # peft still calls a transformers property that warns on every model load; not the user's
    # problem and not actionable for them.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated")
    # bitsandbytes (imported by peft when installed) warns at import that an optional faster
    # CPU kernel package is missing; the CPU path works without it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        app()  # standalone: usage errors and --help print and exit by themselves
    except TunelabError as error:
        width = min(100, error_console.width)
        # Paths stay whole (no break at their hyphens, and rich does not fold them again), so
        # they can be copied from the message.
        text = textwrap.fill(f"{error.kind}: {error.render()}", width=width,
                             break_on_hyphens=False, break_long_words=False)
        error_console.print(text, style="red", markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":  # python -m tunelab.cli: the same entry as the tunelab command
    entry()
