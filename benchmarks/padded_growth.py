"""Peak RSS after every step of padded training under jemalloc, against the planner.

Padded batches (``train.packing: false``) change shape every step; jemalloc, with its dirty pages
kept (the CLI's setting), holds extents of earlier shapes. This trains the plan check's padded
configuration (``train_throughput.py --plan-check``: 113M Llama, LoRA, 4,096-token batches) for
10 steps in one process under the malloc the CLI gives it, reads the kernel's VmHWM after each
step, and records the planner's prediction without and with ``JEMALLOC_PADDED_RETENTION``:

    python benchmarks/padded_growth.py      # writes results/padded-growth-cpu.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance
from train_throughput import cli_environment, plan_check_configs

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 10
CONFIG = "bench 113M · LoRA · padded"

# The child trains; a thread notes VmHWM each time metrics.jsonl gains a step.
CHILD = r'''
import json, sys, threading, time
from pathlib import Path
from rich.console import Console
from tunelab.config import config_from_dict
from tunelab.train.loop import train
raw = json.loads(sys.argv[1])
metrics = Path(raw["output_dir"]) / raw["name"] / "metrics.jsonl"
per_step = []
def peak():
    with open("/proc/self/status") as status:
        return int(status.read().split("VmHWM:")[1].split()[0]) * 1024
def watch():
    while True:
        try:
            steps = [json.loads(l) for l in metrics.read_text().splitlines() if '"loss"' in l]
        except OSError:
            steps = []
        if len(steps) > len(per_step):
            per_step.append({"step": len(steps), "peak_rss_bytes": peak(),
                             "tokens": steps[-1]["tokens"]})
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
train(config_from_dict(raw), console=Console(quiet=True))
time.sleep(0.3)
print(json.dumps({"per_step": per_step, "final_peak_rss_bytes": peak()}))
'''


def main() -> None:
    from tunelab.config import config_from_dict
    from tunelab.model import plan as planner

    origin = provenance()
    with tempfile.TemporaryDirectory(prefix="tunelab-padded-growth-") as tmp:
        workdir = Path(tmp)
        raw = plan_check_configs(workdir, 0)[CONFIG]
        raw["train"]["max_steps"] = STEPS
        raw = {"name": "growth", "output_dir": str(workdir / "runs"), **raw}
        memory = planner.plan(config_from_dict(raw), allocator="jemalloc")["memory"]
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw)],
                              capture_output=True, text=True, env=cli_environment(raw))
        if done.returncode != 0:
            raise SystemExit(done.stderr[-4000:])
        measured = json.loads(done.stdout.strip().splitlines()[-1])
    retained = memory["breakdown_bytes"]["allocator"]
    live = memory["predicted_peak_bytes"] - retained
    for row in measured["per_step"]:
        print(f"step {row['step']:2d}: peak {row['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"({row['peak_rss_bytes'] - live:+,} bytes beyond the planner's live tensors)")
    print(f"planner: live {live / 2**30:.2f} GiB, with retention "
          f"{memory['predicted_peak_bytes'] / 2**30:.2f} GiB "
          f"(JEMALLOC_PADDED_RETENTION {planner.JEMALLOC_PADDED_RETENTION})")
    out = RESULTS / "padded-growth-cpu.json"
    out.write_text(json.dumps({
        "benchmark": "padded_growth", **origin, "configuration": CONFIG, "steps": STEPS,
        "predicted_live_bytes": live, "predicted_peak_bytes": memory["predicted_peak_bytes"],
        "predicted_activation_bytes": memory["breakdown_bytes"]["activations"],
        "retention_fraction": planner.JEMALLOC_PADDED_RETENTION, **measured}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
