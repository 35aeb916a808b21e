"""Crash drills: SIGKILL at random moments, a full disk, damaged checkpoints; each run is then
continued with ``tunelab train --resume`` and its adapter compared, byte for byte, with the
adapter of the same run never interrupted.

    python scripts/crash_drills.py                       # 20 kills, 2 full disks, 4 damages
    python scripts/crash_drills.py --kills 4 --out /tmp/drills.json   # a quick look
    python scripts/crash_drills.py --smoke   # 1 damaged checkpoint, 1 kill: 4 runs, ~a minute

Every run is the real CLI (``python -m tunelab train``) on a tiny Llama built from a config (the
test suite's, ``tests/conftest.py``) with LoRA dropout on, so an exact resume also needs the
random generators' states. Half the kills land at a moment drawn uniformly over the run's life
(from its run directory's creation to its end); the other half are aimed at a checkpoint write:
the drill watches ``checkpoints/`` for a ``.step-N.tmp`` folder and kills within the next
fraction of a second, and afterwards records what the kill left behind. The full disk is a
20 MiB tmpfs (``mount -t tmpfs``, so root) filled to a checkpoint and a half's room, or filled
by another program later, while the run is at its final adapter. Writes
``benchmarks/results/crash-drills-cpu.json`` with its provenance; the README quotes it.

``--smoke`` (for the test suite) runs the reference, one damaged checkpoint and one kill, each
resumed: four real ``tunelab train`` processes, as a drill has to be (a kill needs a process
to kill, and a bit-identical resume the same kernels as the reference); no full disk (it needs
a tmpfs mount). The result goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import smoke  # noqa: E402
from provenance import provenance  # noqa: E402

from tunelab.train.checkpoint import damage, list_checkpoints  # noqa: E402

ADAPTER = Path("adapter") / "adapter_model.safetensors"
STEPS, SAVE_EVERY = 8, 2
TRAIN = {"max_steps": STEPS, "save_every": SAVE_EVERY, "keep_checkpoints": 2, "lr": 1e-2,
         "batch_tokens": 128, "max_seq_len": 64, "samples": 1, "max_new_tokens": 2, "seed": 0}
# One thread: the drill runs beside other work on a shared machine, and every run (reference,
# killed, resumed) must use the same kernels to be comparable bit for bit.
# Wide lines, so that a path in a message is never folded.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "COLUMNS": "400"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILL drills to run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--phases", default="disk,damage,kill",
                        help="which drills, in this order (comma-separated)")
    parser.add_argument("--reuse", type=Path, help="the scratch folder of a drill still "
                        "running: its tiny model, data and reference run (saves a run)")
    parser.add_argument("--out", type=Path, help="result file (default "
                        "benchmarks/results/crash-drills-cpu.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="one damaged checkpoint and one kill, the result in a temporary "
                             "folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.kills, args.phases = 1, "damage,kill"
        args.out = smoke.result_path(args.out, "crash-drills-cpu.json")
    args.out = args.out or ROOT / "benchmarks" / "results" / "crash-drills-cpu.json"
    result = {**provenance(), "workload": {
        "model": "tiny Llama from tests/conftest.py (2 layers, hidden 32), LoRA r 4, dropout 0.1",
        "train": TRAIN}}
    with tempfile.TemporaryDirectory(prefix="tunelab-drills-") as scratch:
        work = args.reuse or Path(scratch)
        if args.reuse:
            model_dir, data = work / "tiny-model", {"train": str(work / "train.jsonl"),
                                                    "validation": str(work / "validation.jsonl")}
            reference = reused_reference(work / "reference" / "runs" / "reference")
        else:
            model_dir = smoke.tiny_model(work / "tiny-model")
            data = _write_data(work)
            reference = reference_run(work, model_dir, data)
        result["reference"] = reference
        print(f"reference: {reference['wall_s']:.1f} s, adapter sha256 "
              f"{reference['adapter_sha256'][:12]}", flush=True)
        # The result file is rewritten after each drill, so a drill stopped early still leaves
        # what it measured.
        for phase in args.phases.split(","):
            if phase == "disk":
                result["disk_full"] = disk_full_drills(work, model_dir, data, reference)
            elif phase == "damage":
                result["damaged_checkpoint"] = damage_drills(work, reference,
                                                             first_only=args.smoke)
            else:
                kill_phase(result, args, work, model_dir, data, reference)
            _write(result, args.out)
    print(f"written to {args.out}")
    return 0


def kill_phase(result: dict, args, work: Path, model_dir: Path, data: dict,
               reference: dict) -> None:
    rng, kills = random.Random(args.seed), []
    for index in range(args.kills):
        kills.append(kill_drill(work, model_dir, data, reference, index, rng,
                                name=f"kill-s{args.seed}-{index:02d}"))
        result["sigkill"] = summarise(kills, planned=args.kills)
        _write(result, args.out)
    print(json.dumps(result["sigkill"]["summary"], indent=2), flush=True)


def reused_reference(run_dir: Path) -> dict:
    """Another drill's reference run; its life is the manifest's wall time (from the data's
    preparation to the end), as the start-up before the run directory is not timed there."""
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    return {"run_dir": str(run_dir), "reused": True,
            "wall_s": json.loads((run_dir / "manifest.json").read_text())["wall_s"],
            "run_dir_created_s": 0.0, "adapter_sha256": sha256(run_dir / ADAPTER),
            "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.iterdir()),
            "adapter_bytes": sum(f.stat().st_size for f in (run_dir / "adapter").iterdir())}


def _write(result: dict, path: Path) -> None:
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


# --- runs --------------------------------------------------------------------------------------


def _write_data(work: Path) -> dict:
    """The test suite's review data: 120 training and 30 validation lines."""
    words = {"positive": ["good", "great", "fine", "lovely", "fun"],
             "negative": ["bad", "awful", "boring", "dull", "poor"]}
    files = {}
    for split, count, seed in (("train", 120, 0), ("validation", 30, 1)):
        draw = random.Random(seed)
        path = work / f"{split}.jsonl"
        with open(path, "w") as handle:
            for _ in range(count):
                label = draw.choice(["positive", "negative"])
                handle.write(json.dumps({"text": f"the movie was {draw.choice(words[label])}",
                                         "label": label}) + "\n")
        files[split] = str(path)
    return files


def write_config(folder: Path, name: str, model_dir: Path, data: dict,
                 output_dir: Path | None = None) -> Path:
    """The drill's config file: the same training for every run, only the name differs."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"name": name, "output_dir": str(output_dir or folder / "runs"),
              "model": {"path": str(model_dir)},
              "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
              "data": {**data, "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
              "train": TRAIN}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tunelab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunelab", "train", *args], env=ENVIRONMENT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*args: str) -> dict:
    """Run ``tunelab train ARGS`` to its end: exit code and output."""
    process = tunelab(*args)
    stdout, stderr = process.communicate()
    return {"rc": process.returncode, "stdout": stdout, "stderr": stderr}


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def reference_run(work: Path, model_dir: Path, data: dict) -> dict:
    """The uninterrupted run: its adapter's sha256 and how long its life takes."""
    config = write_config(work / "reference", "reference", model_dir, data)
    run_dir = work / "reference" / "runs" / "reference"
    started = time.monotonic()
    process = tunelab(str(config))
    created_s = _wait_for(lambda: (run_dir / "config.yaml").is_file(), process) - started
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{stdout}\n{stderr}")
    checkpoint = list_checkpoints(run_dir / "checkpoints")[-1]
    return {"run_dir": str(run_dir), "wall_s": round(time.monotonic() - started, 2),
            "run_dir_created_s": round(created_s, 2),
            "adapter_sha256": sha256(run_dir / ADAPTER),
            "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint.iterdir()),
            "adapter_bytes": sum(f.stat().st_size for f in (run_dir / "adapter").iterdir())}


def _wait_for(condition, process: subprocess.Popen, poll_s: float = 0.002) -> float:
    """Poll until ``condition()`` holds (or the process ended); the moment it held."""
    while not condition() and process.poll() is None:
        time.sleep(poll_s)
    return time.monotonic()


# --- SIGKILL -----------------------------------------------------------------------------------


def kill_drill(work: Path, model_dir: Path, data: dict, reference: dict, index: int,
               rng: random.Random, name: str) -> dict:
    """Start a run, SIGKILL it, resume it, compare its adapter with the reference's."""
    config = write_config(work / name, name, model_dir, data)
    run_dir = work / name / "runs" / name
    aim = "a checkpoint write" if index % 2 else "any moment"
    attempts = 0
    while attempts < 3:  # a run that ended before its kill is started again
        attempts += 1
        shutil.rmtree(run_dir, ignore_errors=True)
        process = tunelab(str(config))
        if index % 2:
            step = SAVE_EVERY * rng.randint(1, (STEPS - 1) // SAVE_EVERY)
            temporary = run_dir / "checkpoints" / f".step-{step}.tmp"
            seen = _wait_for(temporary.exists, process, poll_s=0.0005)
            delay_s = rng.uniform(0.0, 0.05)
        else:
            seen = _wait_for(lambda: (run_dir / "config.yaml").is_file(), process)
            life_s = reference["wall_s"] - reference["run_dir_created_s"]
            delay_s = rng.uniform(0.0, 0.95 * life_s)
        time.sleep(max(0.0, seen + delay_s - time.monotonic()))
        killed = process.poll() is None
        if killed:
            process.send_signal(signal.SIGKILL)
        process.communicate()
        if killed:
            break
    else:
        return {"name": name, "aim": aim, "killed": False, "attempts": attempts}
    left = kill_left(run_dir)
    resumed_at = time.time()
    outcome = finish("--resume", str(run_dir))
    record = {"name": name, "aim": aim, "killed": True, "attempts": attempts,
              "kill_after_s": round(delay_s, 4), "left": left,
              "resume_rc": outcome["rc"], "resumed_from": _resumed_from(outcome["stdout"]),
              **_compare(run_dir, reference, resumed_at)}
    if outcome["rc"] != 0:
        record["resume_error"] = outcome["stderr"][-2000:]
    print(f"{name}: killed at {aim} (+{delay_s:.3f} s), left {left}; resumed "
          f"{record['resumed_from']}, rc {outcome['rc']}, identical {record['identical']}",
          flush=True)
    return record


def kill_left(run_dir: Path) -> str:
    """What a kill left: before any checkpoint, inside a checkpoint write, while deleting an
    old one, or between checkpoints."""
    folder = run_dir / "checkpoints"
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    if not run_dir.is_dir():
        return "no run directory"
    if any(n.startswith(".step-") for n in names):
        return "inside a checkpoint write"
    if any(n.startswith(".removing-") for n in names):
        return "inside an old checkpoint's removal"
    if not list_checkpoints(folder):
        return "before the first checkpoint"
    if (run_dir / "adapter").is_dir():
        return "after the last step (final adapter begun)"
    return "between checkpoints"


def _resumed_from(stdout: str) -> str:
    for line in stdout.splitlines():
        if line.startswith("Resuming "):
            return line.split(" from ")[1].split(" ")[0]
        if "starting it again from step 0" in line:
            return "step 0 (no checkpoint yet)"
    return "?"


def _compare(run_dir: Path, reference: dict, resumed_at: float) -> dict:
    """Is the adapter the resumed run wrote (after ``resumed_at``) the reference's, byte for
    byte? Every complete checkpoint left must match its checksums too."""
    adapter = run_dir / ADAPTER
    written = adapter.is_file() and adapter.stat().st_mtime >= resumed_at - 1
    identical = written and sha256(adapter) == reference["adapter_sha256"]
    damaged = [p.name for p in list_checkpoints(run_dir / "checkpoints") if damage(p)]
    return {"identical": bool(identical), "adapter_written_by_resume": bool(written),
            "damaged_checkpoints_after": damaged}


def summarise(kills: list[dict], planned: int) -> dict:
    killed = [k for k in kills if k["killed"]]
    passed = [k for k in killed if k["resume_rc"] == 0 and k["identical"]]
    return {"summary": {"planned": planned, "runs": len(kills), "killed": len(killed),
                        "resumed_bit_identical": len(passed),
                        "left": dict(Counter(k["left"] for k in killed)),
                        "resumed_from": dict(Counter(k["resumed_from"] for k in killed))},
            "runs": kills}


# --- disk full ---------------------------------------------------------------------------------


def disk_full_drills(work: Path, model_dir: Path, data: dict, reference: dict) -> list[dict]:
    """Runs whose output_dir is a nearly full 20 MiB tmpfs, then resumed once space is freed."""
    mount = work / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        return [{"passed": False, "not_run": f"mount -t tmpfs failed: {mounted.stderr.strip()}"}]
    checkpoint, adapter = reference["checkpoint_bytes"], reference["adapter_bytes"]
    last = f"step-{SAVE_EVERY * ((STEPS - 1) // SAVE_EVERY)}"
    # (room left at the start, room left once the last checkpoint is written): the disk fills
    # up as the run writes, or another program fills it while the run goes on.
    room = {"the second checkpoint": (int(1.6 * checkpoint), None),
            "the final adapter": (4 * checkpoint, (last, adapter // 2))}
    try:
        return [disk_full_drill(work, mount, model_dir, data, reference, index, what, *free)
                for index, (what, free) in enumerate(room.items())]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def _settled_at(checkpoints: Path, name: str) -> bool:
    """Checkpoint ``name`` is written and the older ones it replaces are deleted."""
    entries = [p.name for p in checkpoints.iterdir()] if checkpoints.is_dir() else []
    return name in entries and len(entries) == 2


def _fill(mount: Path, filler: Path, free_bytes: int) -> None:
    """Take up the tmpfs with ``filler`` until ``free_bytes`` are left."""
    size = shutil.disk_usage(mount).free - free_bytes
    subprocess.run(["fallocate", "-l", str(max(size, 4096)), str(filler)], check=True)


def disk_full_drill(work: Path, mount: Path, model_dir: Path, data: dict, reference: dict,
                    index: int, what: str, free_bytes: int,
                    later: tuple[str, int] | None) -> dict:
    name = f"full-{index}"
    config = write_config(work / name, name, model_dir, data, output_dir=mount / "runs")
    run_dir = mount / "runs" / name
    shutil.rmtree(mount / "runs", ignore_errors=True)
    for filler in mount.glob("filler-*"):
        filler.unlink()
    _fill(mount, mount / "filler-0", free_bytes)
    process = tunelab(str(config))
    if later is not None:
        checkpoint, free_later = later
        _wait_for(lambda: _settled_at(run_dir / "checkpoints", checkpoint), process)
        _fill(mount, mount / "filler-1", free_later)
    stdout, stderr = process.communicate()
    outcome = {"rc": process.returncode, "stdout": stdout, "stderr": stderr}
    error = outcome["stderr"]
    paragraph = error[error.find("training error:"):] if "training error:" in error else ""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    leftovers = [p.name for p in (run_dir / "checkpoints").glob(".*")] if run_dir.is_dir() else []
    record = {"name": name, "fails_at": what, "free_bytes": free_bytes,
              "filled_later": list(later) if later else None, "rc": outcome["rc"],
              "error": " ".join(paragraph.split()),
              "traceback": "Traceback" in error,
              "checkpoints_left": [p.name for p in checkpoints],
              "damaged_checkpoints": [p.name for p in checkpoints if damage(p)],
              "temporary_folders_left": leftovers}
    for filler in mount.glob("filler-*"):
        filler.unlink()
    resumed_at = time.time()
    resumed = finish("--resume", str(run_dir))
    record.update(resume_rc=resumed["rc"], resumed_from=_resumed_from(resumed["stdout"]),
                  **_compare(run_dir, reference, resumed_at))
    record["passed"] = bool(
        record["rc"] == 3 and not record["traceback"] and "No space left on device" in
        record["error"] and str(run_dir) in record["error"] and "Fix:" in record["error"]
        and checkpoints and not record["damaged_checkpoints"] and not leftovers
        and record["resume_rc"] == 0 and record["identical"])
    print(f"{name}: full at {what}: rc {record['rc']}, {record['error'][:160]}...; resumed "
          f"{record['resumed_from']}, identical {record['identical']}", flush=True)
    return record


# --- damaged checkpoints -----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))


DAMAGES = {
    "truncated weights (__0_0.distcp cut in half)": ("__0_0.distcp", _truncate),
    "missing file (scheduler.pt deleted)": ("scheduler.pt", Path.unlink),
    "one byte of the weights changed": ("__0_0.distcp", _flip_byte),
}


def damage_drills(work: Path, reference: dict, first_only: bool = False) -> list[dict]:
    """Damage the newest checkpoint of a copy of the reference run (its adapter removed), or
    both; ``--resume`` must name it and go on from the one before, or stop with a clear error
    (``first_only``: the first damage alone)."""
    kinds = list(DAMAGES)[:1] if first_only else list(DAMAGES)
    records = [damage_drill(work, reference, kind, [-1]) for kind in kinds]
    if first_only:
        return records
    records.append(damage_drill(work, reference, next(iter(DAMAGES)), [-1, -2]))
    return records


def damage_drill(work: Path, reference: dict, kind: str, which: list[int]) -> dict:
    name = f"damaged-{len(list(work.glob('damaged-*')))}"
    run_dir = work / name
    shutil.copytree(reference["run_dir"], run_dir)
    shutil.rmtree(run_dir / "adapter")
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    file, harm = DAMAGES[kind]
    for position in which:
        harm(checkpoints[position] / file)
    resumed_at = time.time()
    outcome = finish("--resume", str(run_dir))
    named = all(str(checkpoints[p]) in " ".join(outcome["stdout"].split()) for p in which)
    record = {"name": name, "damage": kind, "damaged": [checkpoints[p].name for p in which],
              "rc": outcome["rc"], "named_in_output": named,
              "resumed_from": _resumed_from(outcome["stdout"]),
              "warning": " ".join(line for line in outcome["stdout"].splitlines()
                                  if "damaged" in line)[:600],
              "traceback": "Traceback" in outcome["stderr"],
              **_compare(run_dir, reference, resumed_at)}
    if len(which) == len(checkpoints):  # nothing left to fall back to: a clear error
        record["error"] = " ".join(outcome["stderr"].split())[-600:]
        record["passed"] = bool(outcome["rc"] == 2 and not record["traceback"]
                                and "every checkpoint is damaged" in record["error"])
    else:
        fallback = checkpoints[min(which) - 1].name
        record["passed"] = bool(outcome["rc"] == 0 and named and record["identical"]
                                and record["resumed_from"] == fallback)
    print(f"{name}: {kind} in {record['damaged']}: rc {record['rc']}, resumed "
          f"{record['resumed_from']}, passed {record['passed']}", flush=True)
    return record


if __name__ == "__main__":
    sys.exit(main())
