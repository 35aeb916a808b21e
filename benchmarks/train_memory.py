"""Peak memory, tokens/s and validation loss of the sentiment example under each memory setting.

Each row runs ``tunelab train examples/sentiment/config.yaml`` (the command users run:
SmolLM2-135M, LoRA r=16 on every linear layer, 2,048-token micro-batches, 20 optimizer steps)
in a fresh process with a few ``--set`` overrides, the rows alternating, and reads the run's
manifest: the peak RSS of the process (VmHWM), the training tokens/s, the validation loss after
training, and the planner's predicted peak for that configuration.

    python benchmarks/train_memory.py                      # before / default / low
    python benchmarks/train_memory.py --rows before default tuned-allocator low \
        checkpointing-only allocator-only                  # every lever
    python benchmarks/train_memory.py --smoke              # seconds: tiny model, in-process

``--smoke`` runs the rows ``before`` and ``default`` in seconds, for the test suite: on the
config shrunk by ``benchmarks/smoke.py`` (the test suite's tiny model, a few examples, two
steps), each ``tunelab train`` in this process (so the peak RSS is this process's and means
nothing; rows that tune glibc's malloc would tune it for the rest of the process), the result
in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import smoke  # benchmarks/smoke.py, beside this script
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


def train_arguments(name: str, config: Path, workdir: Path, extra: list[str]) -> list[str]:
    """``tunelab train``'s arguments for row ``name`` of ``config`` (output in workdir/name)."""
    overrides = [f"output_dir={workdir}", f"name={name}", *ROWS[name], *extra]
    return ["train", str(config), "--overwrite",
            *[arg for pair in overrides for arg in ("--set", pair)]]


def start_row(name: str, config: Path, workdir: Path,
              extra: list[str]) -> tuple[subprocess.Popen, float]:
    """Start one `tunelab train` of the example under row ``name`` (output in workdir/name)."""
    command = [sys.executable, "-m", "tunelab", *train_arguments(name, config, workdir, extra)]
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
    return row_record(name, workdir, usage.ru_utime + usage.ru_stime, load_before)


def row_in_process(name: str, config: Path, workdir: Path, extra: list[str]) -> dict:
    """One row's `tunelab train` in this process (--smoke), and its record."""
    load_before, cpu_before = os.getloadavg()[0], time.process_time()
    log = workdir / f"{name}.log"
    if smoke.tunelab(train_arguments(name, config, workdir, extra), log) != 0:
        raise SystemExit(f"{name} failed:\n{log.read_text()[-4000:]}")
    return row_record(name, workdir, time.process_time() - cpu_before, load_before)


def row_record(name: str, workdir: Path, cpu_s: float, load_before: float) -> dict:
    """What a finished row's manifest measured, with the CPU time its process used."""
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
            "cpu_s": round(cpu_s, 1),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS),
                        help="rows to run (default: before default low; --smoke: before default)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds")
    parser.add_argument("--parallel", action="store_true",
                        help="run a round's rows at once: peak memory and loss do not depend "
                        "on the load, tokens/s does (then compare CPU time, not tokens/s)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop each run after N optimizer steps (the peak comes in the "
                        "first steps; the validation loss is then that of N steps)")
    parser.add_argument("--out", type=Path, help="result file (default "
                        "results/memory-cpu.json; --smoke: a temporary folder)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: tiny model and data, in this process")
    parser.add_argument("--keep", nargs="+", default=[], metavar="ROW[=AS]",
                        help="rows of the --out file measured earlier to keep beside the new "
                        "ones (renamed AS when the row's meaning was renamed since); each keeps "
                        "the command and commit that measured it")
    args = parser.parse_args(argv)
    rows_chosen = args.rows or ["before", "default", *([] if args.smoke else ["low"])]
    out = (smoke.result_path(args.out, "memory-cpu.json") if args.smoke
           else args.out or RESULTS / "memory-cpu.json")
    kept = keep_rows(out, args.keep)
    extra = [] if args.max_steps is None else [f"train.max_steps={args.max_steps}"]
    origin, runs = provenance(), []
    with tempfile.TemporaryDirectory(prefix="tunelab-memory-") as tmp:
        workdir, config = Path(tmp), CONFIG
        if args.smoke:
            config = smoke.smoke_config(CONFIG, workdir / "config",
                                        smoke.tiny_model(workdir / "tiny-model"))
        for round_number in range(args.repeats):
            rows = []
            if args.smoke:
                rows = [row_in_process(name, config, workdir, extra) for name in rows_chosen]
            elif args.parallel:
                started = {name: start_row(name, config, workdir, extra) for name in rows_chosen}
                rows = [finish_row(name, workdir, *started[name]) for name in rows_chosen]
            else:
                for name in rows_chosen:
                    rows.append(finish_row(name, workdir,
                                           *start_row(name, config, workdir, extra)))
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
    out.parent.mkdir(parents=True, exist_ok=True)
    ordered = sorted(kept + runs, key=lambda run: list(ROWS).index(run["row"]))
    out.write_text(json.dumps({"benchmark": "train_memory", "config": str(
        CONFIG.relative_to(REPO)), **origin, "runs": ordered}, indent=1) + "\n")
    print(f"wrote {out}")


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
