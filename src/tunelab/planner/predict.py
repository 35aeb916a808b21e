"""The plan of a run: memory, time and advice for a config, before any weight is loaded.

``plan(config)`` reads the model's dimensions from its ``config.json`` (``AutoConfig``), counts
the data's tokens exactly as ``train()`` will (``data/prepare.py``), lays out every micro-batch
of the run (``data/schedule.py``) and predicts peak memory (``memory.py``) and tokens/s and wall
time (``speed.py``). A calibration (``train/calibrate.py``) instead runs a few real steps in a
subprocess; ``plan`` scales by what they measured.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from tunelab.config import Config
from tunelab.errors import ConfigError
from tunelab.model.adapters import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.planner.advice import advise
from tunelab.planner.memory import memory_settings, per_rank_memory, predict_memory
from tunelab.planner.setting import resolve_setting, trainable_params
from tunelab.planner.shape import ModelShape
from tunelab.planner.speed import predict_time
from tunelab.planner.workload import TokenCounts, count_tokens, describe_data, micro_batches


@dataclass
class Plan:
    """A run's predicted cost; ``to_dict()`` is what ``tunelab plan --json`` writes.

    ``memory`` and ``time`` are the predictions (``memory.predict_memory``,
    ``speed.predict_time``); their headline figures are properties.
    """

    config: str
    model: dict[str, Any]
    device: dict[str, Any]
    setting: dict[str, Any]
    data: dict[str, Any]
    memory: dict[str, Any]
    time: dict[str, Any]
    calibration: dict[str, Any] | None = None
    fits: bool = True
    memory_settings: dict[str, Any] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)
    memory_per_rank: dict[str, Any] | None = None  # nproc > 1

    @property
    def predicted_peak_bytes(self) -> int:
        return self.memory["predicted_peak_bytes"]

    @property
    def predicted_tokens_per_second(self) -> float:
        return self.time["predicted_tokens_per_second"]

    @property
    def predicted_wall_s(self) -> float:
        return self.time["predicted_wall_s"]

    def to_dict(self) -> dict[str, Any]:
        found = asdict(self)
        if found["memory_per_rank"] is None:
            del found["memory_per_rank"]
        return found


def plan(config: Config, *, calibration: dict | None = None,
         memory_budget_bytes: int | None = None, nproc: int = 1,
         strategy: str = "ddp", allocator: str | None = None) -> Plan:
    """Predict peak memory (broken down), tokens/s and wall time of ``train(config)``.

    Tokenizes the data as ``train()`` will; reads the model's ``config.json`` only.
    ``memory_budget_bytes`` replaces the device's available memory when judging the fit.
    ``calibration`` is what a few real steps of the config measured
    (``tunelab.train.calibrate.calibrate_run``): its tokens/s replaces the predicted rate, its
    peak memory is reported beside the prediction. ``nproc`` ranks (torchrun) under
    ``strategy`` (ddp or fsdp) add each rank's memory (``per_rank_memory``). ``allocator``
    (jemalloc, tuned, system): the malloc the run gets; by default the one the ``tunelab``
    command would give it (``allocator.choose``).
    """
    from tunelab.model.load import load_tokenizer

    counts = count_tokens(config, load_tokenizer(config.model.path, config.model.gguf_file))
    return plan_counts(config, counts, calibration=calibration,
                       memory_budget_bytes=memory_budget_bytes, nproc=nproc, strategy=strategy,
                       allocator=allocator)


def plan_counts(config: Config, counts: TokenCounts, *, calibration: dict | None = None,
                memory_budget_bytes: int | None = None, nproc: int = 1,
                strategy: str = "ddp", allocator: str | None = None) -> Plan:
    """``plan`` for data already tokenized (``TokenCounts.from_tokenized``), as in ``train()``."""
    from tunelab.model.load import resolve_device, resolve_dtype

    if OBJECTIVES[config.method.objective].rollouts:
        raise ConfigError(
            f"tunelab plan does not predict {config.method.objective} runs: their time goes "
            "mostly to sampling answers, which the planner does not model yet",
            where="method.objective", fix="train a few steps (--set train.max_steps=3) and read "
            "rollout_s and step_s in the run's metrics.jsonl")
    shape, resolved = _model_shape(config)
    batches = micro_batches(counts, config)
    layout = describe_data(counts, batches, config, resolved)
    device = resolve_device(config.model.device)
    dtype = str(resolve_dtype(config.model.dtype, device)).removeprefix("torch.")
    setting = resolve_setting(config, device.type, dtype, allocator)
    result = Plan(
        config=config.name,
        model={"path": config.model.path, "resolved": resolved, **asdict(shape),
               "params": shape.params, "trainable_params": trainable_params(shape, setting)},
        device=_describe_device(device.type, memory_budget_bytes),
        setting=asdict(setting), data=asdict(layout),
        memory=predict_memory(shape, batches, setting, layout),
        time=predict_time(shape, layout, batches, setting, config))
    if calibration is not None:
        _apply_calibration(result, calibration)
    budget = result.device["budget_bytes"]
    result.fits = max(result.predicted_peak_bytes,
                      result.memory.get("measured_peak_bytes", 0)) <= budget
    result.memory_settings = memory_settings(
        shape, batches, setting, layout, budget,
        allocator_follows_memory=config.train.allocator == "auto")
    result.advice = advise(result.memory, budget, shape, counts, setting, config, layout)
    if nproc > 1:
        result.memory_per_rank = per_rank_memory(
            result.memory["breakdown_bytes"], nproc=nproc, strategy=strategy,
            full=not METHODS[setting.kind].adapter,
            block_bytes=shape.layer_params * setting.element_bytes,
            root_bytes=(shape.params - shape.num_layers * shape.layer_params)
            * setting.element_bytes)
    return result


def _model_shape(config: Config) -> tuple[ModelShape, str]:
    """The model's dimensions from its config.json, and the folder it was read from."""
    from transformers import AutoConfig

    from tunelab.model.load import resolve_model_path

    resolved = resolve_model_path(config.model.path, config.model.gguf_file)
    try:
        return ModelShape.from_config(AutoConfig.from_pretrained(resolved)), resolved
    except (OSError, ValueError, AttributeError) as error:
        raise ConfigError(f"cannot read the model's dimensions from {resolved}: {error}",
                          where="model.path",
                          fix="point model.path at a causal LM folder with a config.json") from None


def _apply_calibration(result: Plan, calibration: dict) -> None:
    """Scale the time by the calibration run's rate; set its peak memory beside the prediction."""
    result.calibration = calibration
    timing, rate = result.time, calibration["tokens_per_second"]
    if rate <= 0:
        return
    scale = rate / timing["predicted_tokens_per_second"]
    timing.update(predicted_tokens_per_second=rate, train_s=timing["train_s"] / scale,
                  eval_s=timing["eval_s"] / scale, source="calibration run",
                  training_efficiency=timing["training_efficiency"] * scale)
    timing["predicted_wall_s"] = timing["train_s"] + timing["eval_s"] + timing["load_s"]
    memory = result.memory
    memory["measured_peak_bytes"] = calibration["measured_peak_bytes"]
    memory["prediction_error"] = (memory["predicted_peak_bytes"]
                                  / calibration["measured_peak_bytes"] - 1)


def _describe_device(device: str, budget: int | None) -> dict:
    """The device: name, memory, and the budget the fit is judged against."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        available = free
    else:
        name = _cpu_name()
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        available = _mem_available() or total
    return {"type": device, "name": name, "cpu_cores": os.cpu_count(), "memory_bytes": total,
            "available_bytes": available,
            "budget_bytes": budget if budget is not None else available}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
