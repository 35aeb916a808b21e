"""Calibration for the planner: a few real training steps of a config, measured in a subprocess.

``tunelab plan --calibrate`` hands what they measured to the planner's ``plan``
(``planner/predict.py``), which scales its prediction by it. A fresh process, so the peak
memory is this config's alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
from rich.console import Console

from tunelab.config import Config, config_from_dict
from tunelab.data.schedule import run_schedule
from tunelab.peak_memory import measured_peak_bytes
from tunelab.train import distributed
from tunelab.train.loop import prepare
from tunelab.train.optim import build_optimization
from tunelab.train.step import forward_backward, update


def calibrate_run(config: Config, *, steps: int = 4) -> dict:
    """Run ``steps`` real optimiser steps of ``config`` in a fresh process; measured numbers.

    The first step is the one holding the run's largest micro-batch (for the memory peak); the
    others are the run's first steps, timed after the first (which pays one-off set-up costs).
    """
    completed = subprocess.run([sys.executable, "-m", "tunelab.train.calibrate"],
                               capture_output=True, text=True,
                               input=json.dumps({"config": config.model_dump(mode="json"),
                                                 "steps": steps}))
    if completed.returncode != 0:
        raise RuntimeError(f"calibration run failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure_steps(config: Config, steps: int) -> dict:
    """The steps themselves, in this process: tokens/s after the first, peak memory.

    The run's own schedule (``data/schedule.py``, the multitask mixture included) and the loop's
    own step (``train/step.py``), so the time measured is the time of the run's steps.
    """
    torch.manual_seed(config.train.seed)
    prepared = prepare(config, Console(quiet=True))
    device, cluster = prepared.device, distributed.Cluster()
    lengths = [len(ex.input_ids) for ex in prepared.train]
    schedule = run_schedule(config, lengths, prepared.train_tasks)
    groups = schedule.steps()
    heaviest = max(range(len(groups)), key=lambda g: max(
        sum(lengths[i] for i in batch) for batch in groups[g]))
    chosen = [groups[heaviest]] + [g for i, g in enumerate(groups) if i != heaviest]
    chosen = chosen[:max(2, steps)]
    step_model = distributed.wrap(prepared.model, cluster,
                                  chunk_tokens=config.train.loss_chunk_tokens)
    optimization = build_optimization(prepared.model, config.train,
                                      total_steps=schedule.total_steps)
    pad_id = prepared.tokenizer.pad_token_id or 0
    step_model.train()
    timed_s, timed_tokens = 0.0, 0
    for number, group in enumerate(chosen):
        started = time.perf_counter()
        batches = distributed.collate_share(prepared.train, group,
                                            packing=config.train.packing, pad_id=pad_id)
        losses = forward_backward(step_model, batches, device=device, cluster=cluster,
                                  max_grad_norm=config.train.max_grad_norm, step=number + 1,
                                  sources=lambda: [])
        update(optimization)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if number > 0:
            timed_s += time.perf_counter() - started
            timed_tokens += losses.tokens
    return {"steps": len(chosen), "timed_tokens": timed_tokens, "timed_s": timed_s,
            "tokens_per_second": timed_tokens / max(timed_s, 1e-9),
            "measured_peak_bytes": measured_peak_bytes(device.type),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    print(json.dumps(measure_steps(config_from_dict(request["config"]), request["steps"])))
