"""Calibration for the planner: a few real training steps of a config, measured in a subprocess.

``tunelab plan --calibrate`` hands what they measured to ``model/plan.py``'s ``plan``, which
scales its prediction by it. A fresh process, so the peak memory is this config's alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch
from rich.console import Console

from tunelab.config import Config, config_from_dict
from tunelab.data.packing import collate
from tunelab.model.plan import measured_peak_bytes
from tunelab.train.loop import autocast, prepare, run_micro_batches
from tunelab.train.loss import batch_loss_sum
from tunelab.train.optim import build_optimizer, clip_gradients


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
    """The steps themselves, in this process: tokens/s after the first, peak memory."""
    torch.manual_seed(config.train.seed)
    prepared = prepare(config, Console(quiet=True))
    model, device, accum = prepared.model, prepared.device, config.train.grad_accum
    lengths = [len(ex.input_ids) for ex in prepared.train]
    micro = run_micro_batches(lengths, config)
    groups = [micro[i:i + accum] for i in range(0, len(micro), accum)]
    heaviest = max(range(len(groups)), key=lambda g: max(
        sum(lengths[i] for i in batch) for batch in groups[g]))
    chosen = [groups[heaviest]] + [g for i, g in enumerate(groups) if i != heaviest]
    chosen = chosen[:max(2, steps)]
    optimizer = build_optimizer(model, lr=config.train.lr, weight_decay=config.train.weight_decay)
    pad_id = prepared.tokenizer.pad_token_id or 0
    model.train()
    timed_s, timed_tokens = 0.0, 0
    for number, group in enumerate(chosen):
        started = time.perf_counter()
        batches = [collate([prepared.train[i] for i in indices], packing=config.train.packing,
                           pad_id=pad_id) for indices in group]
        n_target = sum(batch.n_target_tokens for batch in batches)
        for batch in batches:
            with autocast(device):
                loss = batch_loss_sum(model, batch.to(device),
                                      chunk_tokens=config.train.loss_chunk_tokens)
            (loss / n_target).backward()
        clip_gradients(model, config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if number > 0:
            timed_s += time.perf_counter() - started
            timed_tokens += sum(batch.n_tokens for batch in batches)
    return {"steps": len(chosen), "timed_tokens": timed_tokens, "timed_s": timed_s,
            "tokens_per_second": timed_tokens / max(timed_s, 1e-9),
            "measured_peak_bytes": measured_peak_bytes(device.type),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    print(json.dumps(measure_steps(config_from_dict(request["config"]), request["steps"])))
