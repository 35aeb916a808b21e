"""Peak RSS after every step of padded training under jemalloc, against the planner.

Padded batches (``train.packing: false``) change shape every step; jemalloc, with its dirty pages
kept (the CLI's setting), holds extents of earlier shapes. This trains the plan check's padded
configuration (``train_throughput.py --plan-check``: 113M Llama, LoRA, 4,096-token batches) for
10 steps in one process under the malloc the CLI gives it, reads the kernel's VmHWM after each
step, and records the planner's prediction without and with ``JEMALLOC_PADDED_RETENTION``:

    python benchmarks/padded_growth.py          # writes results/padded-growth-cpu.json
    python benchmarks/padded_growth.py --smoke  # seconds: the tiny model, 2 steps, in-process

``--smoke`` trains the padded configuration on a model as small as the test suite's for two
steps in this process (under this process's malloc, so its peaks mean nothing) and writes the
result to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import smoke
from provenance import provenance
from train_throughput import cli_environment, plan_check_configs

from tunelab.peak_memory import peak_rss_bytes
from tunelab.planner.memory import JEMALLOC_PADDED_RETENTION
from tunelab.planner.predict import plan

RESULTS = Path(__file__).resolve().parent / "results"
STEPS, SMOKE_STEPS = 10, 2
CONFIG = "bench 113M · LoRA · padded"


def peaks_per_step(raw: dict) -> dict:
    """Train ``raw`` (a config dict) in this process, noting VmHWM each time metrics.jsonl
    gains a step (a thread polls it), and the peak at the end."""
    from rich.console import Console

    from tunelab.config import config_from_dict
    from tunelab.train.loop import train

    metrics = Path(raw["output_dir"]) / raw["name"] / "metrics.jsonl"
    per_step, done = [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                steps = [json.loads(line) for line in metrics.read_text().splitlines()
                         if '"loss"' in line]
            except OSError:
                steps = []
            if len(steps) > len(per_step):
                per_step.append({"step": len(steps), "peak_rss_bytes": peak_rss_bytes(),
                                 "tokens": steps[-1]["tokens"]})
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    train(config_from_dict(raw), console=Console(quiet=True))
    time.sleep(0.3)  # the watcher's last look at the metrics
    done.set()
    watcher.join()
    return {"per_step": per_step, "final_peak_rss_bytes": peak_rss_bytes()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: tiny model, 2 steps, in this process, "
                             "the result in a temporary folder")
    parser.add_argument("--out", type=Path, help="result file (default "
                        "results/padded-growth-cpu.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a config dict to train, as JSON
    args = parser.parse_args(argv)
    if args.child:
        return print(json.dumps(peaks_per_step(json.loads(args.child))))
    from tunelab.config import config_from_dict

    origin = provenance()
    steps = SMOKE_STEPS if args.smoke else STEPS
    with tempfile.TemporaryDirectory(prefix="tunelab-padded-growth-") as tmp:
        workdir = Path(tmp)
        raw = plan_check_configs(workdir, 0, tiny_only=args.smoke)[CONFIG]
        raw["train"]["max_steps"] = steps
        raw = {"name": "growth", "output_dir": str(workdir / "runs"), **raw}
        memory = plan(config_from_dict(raw), allocator="jemalloc").memory
        measured = peaks_per_step(raw) if args.smoke else in_subprocess(raw)
    retained = memory["breakdown_bytes"]["allocator"]
    live = memory["predicted_peak_bytes"] - retained
    for row in measured["per_step"]:
        print(f"step {row['step']:2d}: peak {row['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"({row['peak_rss_bytes'] - live:+,} bytes beyond the planner's live tensors)")
    print(f"planner: live {live / 2**30:.2f} GiB, with retention "
          f"{memory['predicted_peak_bytes'] / 2**30:.2f} GiB "
          f"(JEMALLOC_PADDED_RETENTION {JEMALLOC_PADDED_RETENTION})")
    name = "padded-growth-cpu.json"
    out = smoke.result_path(args.out, name) if args.smoke else args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "padded_growth", **origin, "configuration": CONFIG, "steps": steps,
        "predicted_live_bytes": live, "predicted_peak_bytes": memory["predicted_peak_bytes"],
        "predicted_activation_bytes": memory["breakdown_bytes"]["activations"],
        "retention_fraction": JEMALLOC_PADDED_RETENTION, **measured}, indent=1) + "\n")
    print(f"wrote {out}")


def in_subprocess(raw: dict) -> dict:
    """``peaks_per_step(raw)`` in a fresh process under the malloc the CLI gives the config."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(raw)],
                          capture_output=True, text=True, env=cli_environment(raw))
    if done.returncode != 0:
        raise SystemExit(done.stderr[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
