"""Peak memory, tokens/s and validation loss of the sentiment example under each memory setting.

Each row runs ``tunelab train examples/sentiment/config.yaml`` (the command users run:
SmolLM2-135M, LoRA r=16 on every linear layer, 2,048-token micro-batches, 20 optimizer steps)
in a fresh process with a few ``--set`` overrides, the rows alternating, and reads the run's
manifest: the peak RSS of the process (VmHWM), the training tokens/s, the validation loss after
training, and the planner's predicted peak for that configuration.

    python benchmarks/train_memory.py                      # before / default / low
    python benchmarks/train_memory.py --rows before default tuned-allocator low \
        checkpointing-only allocator-only                  # every lever
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance  # benchmarks/provenance.py, beside this script

from tunelab.allocator import without_malloc_settings

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "sentiment" / "config.yaml"
# Row -> the overrides that make it; "before" is the training loop as it was before issue 13.
ROWS = {
    "before": ["method.shared_dropout=false", "train.allocator=system"],
    "glibc": ["train.allocator=system"],
    "default": [],
    "unfused": ["train.fused_swiglu=false"],
    "tuned-allocator": ["train.allocator=tuned"],
    "low": ["train.memory=low"],
    "low-glibc": ["train.memory=low", "train.allocator=tuned"],
    "checkpointing-only": ["train.gradient_checkpointing=true", "train.allocator=system"],
    "allocator-only": ["method.shared_dropout=false", "train.allocator=tuned"],
}
TITLES = {
    "before": "before issue 13 (peft's dropout per projection, glibc defaults)",
    "glibc": "shared LoRA dropout, glibc defaults (the default where jemalloc is not installed)",
    "default": "default (shared LoRA dropout, fused SwiGLU, train.allocator: auto → "
               "{allocator})",
    "unfused": "default with transformers' MLP (train.fused_swiglu: false)",
    "tuned-allocator": "shared LoRA dropout + tuned glibc (train.allocator: tuned)",
    "low": "train.memory: low (activation checkpointing, allocator auto → {allocator})",
    "low-glibc": "train.memory: low with tuned glibc (where jemalloc is not installed)",
    "checkpointing-only": "shared LoRA dropout + activation checkpointing, glibc defaults",
    "allocator-only": "tuned glibc alone (peft's dropout)",
}


def start_row(name: str, workdir: Path, extra: list[str]) -> tuple[subprocess.Popen, float]:
    """Start one `tunelab train` of the example under row ``name`` (output in workdir/name)."""
    overrides = [f"output_dir={workdir}", f"name={name}", *ROWS[name], *extra]
    command = [sys.executable, "-m", "tunelab", "train", str(CONFIG), "--overwrite",
               *[arg for pair in overrides for arg in ("--set", pair)]]
    environment = without_malloc_settings(dict(os.environ))  # the CLI chooses per row
    log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 -- the child writes it until it ends
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                            env=environment), os.getloadavg()[0]


def finish_row(name: str, workdir: Path, process: subprocess.Popen, load_before: float) -> dict:
    """Wait for a row's run; what its manifest measured, and the CPU time the process used."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(workdir / f'{name}.log').read_text()[-4000:]}")
    manifest = json.loads((workdir / name / "manifest.json").read_text())
    allocator = manifest.get("allocator") or {"name": "system"}
    return {"row": name, "title": TITLES[name].format(allocator=allocator.get("name", "system")),
            "overrides": ROWS[name],
            "measured_peak_rss_bytes": manifest["measured_peak_rss_bytes"],
            "predicted_peak_bytes": manifest["plan"].get("predicted_peak_bytes"),
            "tokens_per_second": manifest["tokens_per_second"],
            "val_loss_before": manifest["val_loss_before"],
            "val_loss_after": manifest["val_loss_after"], "steps": manifest["steps"],
            "train_s": manifest["train_s"], "wall_s": manifest["wall_s"],
            "allocator": allocator,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        default=["before", "default", "low"])
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds")
    parser.add_argument("--parallel", action="store_true",
                        help="run a round's rows at once: peak memory and loss do not depend "
                        "on the load, tokens/s does (then compare CPU time, not tokens/s)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop each run after N optimizer steps (the peak comes in the "
                        "first steps; the validation loss is then that of N steps)")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory-cpu.json")
    parser.add_argument("--keep", nargs="+", default=[], metavar="ROW[=AS]",
                        help="rows of the --out file measured earlier to keep beside the new "
                        "ones (renamed AS when the row's meaning was renamed since); each keeps "
                        "the command and commit that measured it")
    args = parser.parse_args(argv)
    kept = keep_rows(args.out, args.keep)
    extra = [] if args.max_steps is None else [f"train.max_steps={args.max_steps}"]
    origin, runs = provenance(), []
    with tempfile.TemporaryDirectory(prefix="tunelab-memory-") as tmp:
        for round_number in range(args.repeats):
            rows = []
            if args.parallel:
                started = {name: start_row(name, Path(tmp), extra) for name in args.rows}
                rows = [finish_row(name, Path(tmp), *started[name]) for name in args.rows]
            else:
                for name in args.rows:
                    rows.append(finish_row(name, Path(tmp), *start_row(name, Path(tmp), extra)))
            for row in rows:
                row.update(round=round_number, parallel=args.parallel,
                           command=origin["command"], git_commit=origin["git_commit"])
                runs.append(row)
                print(f"{row['row']:22s} peak {row['measured_peak_rss_bytes'] / 2**30:5.2f} GiB "
                      f"(predicted {row['predicted_peak_bytes'] / 2**30:5.2f})  "
                      f"{row['tokens_per_second']:6.1f} tokens/s  {row['cpu_s']:.0f} CPU s  "
                      f"val loss {row['val_loss_before']:.4f} -> {row['val_loss_after']:.4f}",
                      flush=True)
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(kept + runs, key=lambda run: list(ROWS).index(run["row"]))
    args.out.write_text(json.dumps({"benchmark": "train_memory", "config": str(
        CONFIG.relative_to(REPO)), **origin, "runs": ordered}, indent=1) + "\n")
    print(f"wrote {args.out}")


def keep_rows(path: Path, keep: list[str]) -> list[dict]:
    """The runs of ``path`` whose row is named in ``keep`` (``ROW`` or ``ROW=AS``), each with
    the command and commit that measured it."""
    if not keep:
        return []
    earlier = json.loads(path.read_text())
    renames = dict(entry.partition("=")[::2] for entry in keep)
    runs = []
    for run in earlier["runs"]:
        if run["row"] in renames:
            name = renames[run["row"]] or run["row"]
            runs.append({"command": earlier["command"], "git_commit": earlier["git_commit"],
                         **run, "row": name, "title": TITLES[name].format(allocator="system")
                         if name != run["row"] else run["title"]})
    missing = set(renames) - {run["row"] for run in earlier["runs"]}
    if missing:
        raise SystemExit(f"{path} has no row {', '.join(sorted(missing))}")
    return runs


if __name__ == "__main__":
    main()
