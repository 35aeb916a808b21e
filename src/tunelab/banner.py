"""The lines ``train``, ``eval`` and ``assess`` print before they start: where they run, on what.

A run that was meant for a GPU and silently went to the CPU costs hours before anyone notices;
one line at the start (device, dtype, parameters, the plan's peak memory and time) and a
warning when ``model.device: auto`` found no accelerator make it visible at once. The plan's
numbers are the planner's own (the loop's ``state.plan``, or ``planner.predict.plan``): this
module formats them and never predicts anything itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Every parameter, the trainable ones, and the adapter's (LoRA / DoRA weights)."""
    total = trainable = adapter = 0
    for name, parameter in model.named_parameters():
        count = parameter.numel()
        total += count
        trainable += count if parameter.requires_grad else 0
        adapter += count if "lora_" in name else 0
    return {"total": total, "trainable": trainable, "adapter": adapter}


def _cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def describe_device(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (2 cores)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} ({_cpu_cores()} cores)" if device.type == "cpu" else str(device)


def fallback_warning(requested: str, device: torch.device, doing: str) -> str | None:
    """The warning for ``model.device: auto`` that ended on the CPU; None otherwise."""
    if requested != "auto" or device.type != "cpu":
        return None
    mps = getattr(torch.backends, "mps", None)
    seen = ("an Apple MPS device was found, but auto picks CUDA only (set model.device: mps "
            "to try it)" if mps is not None and mps.is_available()
            else "no CUDA or MPS device found")
    build = "" if torch.version.cuda else " (this torch is a CPU build)"
    return f"{seen}{build}; {doing} on CPU ({_cpu_cores()} cores)"


def _millions(count: int) -> str:
    return f"{count / 1e6:,.1f}M" if count >= 1e5 else f"{count:,}"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {rest} s" if minutes \
        else f"{rest} s"


def plan_line(plan: dict[str, Any] | None) -> str:
    """The planner's predicted peak memory and wall time, or why there is none."""
    if not plan or plan.get("predicted_peak_bytes") is None:
        reason = (plan or {}).get("error") or "the planner gave none for this config"
        return f"plan: no prediction ({reason.splitlines()[0][:160]})"
    peak_gib = plan["predicted_peak_bytes"] / 2**30
    wall = plan.get("predicted_wall_s")
    time_part = f", about {_duration(wall)}" if wall is not None else ""
    return f"plan: peak memory {peak_gib:.2f} GiB{time_part} (tunelab plan CONFIG for details)"


def _model_line(model: torch.nn.Module, *, training: bool) -> str:
    counts = parameter_counts(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if training:
        share = counts["trainable"] / max(counts["total"], 1)
        params = (f"{_millions(counts['trainable'])} of {_millions(counts['total'])} parameters "
                  f"trainable ({share:.2%})")
    else:
        adapter = f" (adapter {_millions(counts['adapter'])})" if counts["adapter"] else ""
        params = f"{_millions(counts['total'])} parameters{adapter}"
    return f"{dtype}, {params}"


def print_start(console: Console, command: str, model: torch.nn.Module, device: torch.device,
                requested_device: str, *, training: bool = False,
                plan: dict[str, Any] | None = None) -> None:
    """``tunelab COMMAND: device, dtype, parameters`` (and ``plan`` when training), then the
    CPU-fallback warning where ``model.device`` was auto."""
    line = f"tunelab {command}: {describe_device(device)}, {_model_line(model, training=training)}"
    if training:
        line += f"; {plan_line(plan)}"
    console.print(escape(line), highlight=False)
    warning = fallback_warning(requested_device, device, "training" if training else "running")
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def print_evaluation_start(console: Console, models: dict[str, tuple], requested_device: str
                           ) -> None:
    """The banner of ``tunelab eval``: the models it loaded (base and tuned share one when
    the tuned one is an adapter), with the device of the first."""
    loaded = {id(entry[0]): entry[0] for entry in models.values()}
    for number, model in enumerate(loaded.values()):
        device = next(model.parameters()).device
        # the fallback warning once: both models are on the one device
        print_start(console, "eval", model, device, requested_device if number == 0 else "")


def print_assessment_start(console: Console, config: Any) -> None:
    """The banner of ``tunelab assess``: device, dtype and parameters as the planner counts
    them for one training on all the data (the base is loaded later, by each arm)."""
    from tunelab.model.load import resolve_device, resolve_dtype
    from tunelab.planner.predict import plan

    device = resolve_device(config.model.device)
    dtype = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")
    try:
        planned = plan(config)
        params = (f"{_millions(planned.model['trainable_params'])} of "
                  f"{_millions(planned.model['params'])} parameters trainable")
        predicted = plan_line({"predicted_peak_bytes": planned.predicted_peak_bytes,
                               "predicted_wall_s": planned.predicted_wall_s})
        predicted = predicted.replace("plan:", "plan of one training on all the data:")
    except Exception as error:  # the banner only describes: it must never stop the command
        params, predicted = "parameters unknown", plan_line({"error": str(error)})
    console.print(escape(f"tunelab assess: {describe_device(device)}, {dtype}, {params}; "
                         f"{predicted}"), highlight=False)
    warning = fallback_warning(config.model.device, device, "training and evaluating")
    if warning:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
