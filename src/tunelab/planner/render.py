"""A plan printed as a person reads it: the memory breakdown against the budget, time, advice."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tunelab.planner.memory import GIB, gib
from tunelab.planner.predict import Plan


def render_plan(plan: Plan, console: Console) -> None:
    """Print a plan as tables: the memory breakdown against the budget, time, advice."""
    memory, timing, data = plan.memory, plan.time, plan.data
    model, device = plan.model, plan.device
    console.print(f"[bold]{plan.config}[/]: {model['model_type']} "
                  f"{model['params'] / 1e6:,.0f}M parameters, "
                  f"{model['trainable_params'] / 1e6:,.2f}M trainable "
                  f"({plan.setting['kind']}) on {device['type']} ({device['name']})")
    table = Table(title="Predicted peak memory", show_footer=True)
    table.add_column("part", footer="total")
    table.add_column("GiB", justify="right", footer=f"{memory['predicted_peak_bytes'] / GIB:.2f}")
    for part, value in memory["breakdown_bytes"].items():
        table.add_row(part, f"{value / GIB:.2f}")
    console.print(table)
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    console.print(f"Budget {gib(device['budget_bytes'])}: {verdict}.  Heaviest micro-batch: "
                  f"{memory['peak_batch']['positions']:,} positions, "
                  f"{memory['peak_batch']['targets']:,} loss targets.")
    settings = plan.memory_settings
    peaks = settings["predicted_peak_bytes"]
    choice = (f"use train.memory: {settings['recommended']}" if settings["recommended"]
              else "neither fits")
    console.print(f"train.memory: default {gib(peaks['default'])}, low {gib(peaks['low'])} "
                  f"(activation checkpointing, slower); for "
                  f"{gib(settings['budget_bytes'])}: {choice}.")
    if "measured_peak_bytes" in memory:
        console.print(f"Calibration run peak: {gib(memory['measured_peak_bytes'])} "
                      f"(prediction {memory['prediction_error']:+.0%}).")
    console.print(f"Data: {data['train_examples']:,} examples, {data['train_tokens']:,} tokens "
                  f"({data['target_tokens']:,} targets); {data['steps']:,} steps, "
                  f"{data['run_tokens']:,} tokens in the run.")
    console.print(f"Time ({timing['source']}): {timing['predicted_tokens_per_second']:,.0f} "
                  f"tokens/s, training {_duration(timing['train_s'])}, evaluation "
                  f"{_duration(timing['eval_s'])}, total ≈ {_duration(timing['predicted_wall_s'])}"
                  f" ({timing['flops_per_token'] / 1e9:.2f} GFLOP/token).")
    if plan.memory_per_rank:
        per_rank = plan.memory_per_rank
        parts = ", ".join(f"{part} {value / GIB:.2f}" for part, value in
                          per_rank["breakdown_bytes"].items() if value)
        console.print(f"Per rank ({per_rank['nproc']} ranks, {per_rank['strategy']}): "
                      f"{gib(per_rank['predicted_peak_bytes'])} ({parts} GiB).")
    for line in plan.advice:
        console.print(f"[yellow]advice:[/] {line}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
