"""Install tunelab with the lowest versions its pyproject allows, in a fresh venv, and test it.

The floors in pyproject.toml are a promise: "these versions work". This script keeps it
honest. It creates a real virtual environment (no system site-packages), pins every direct
dependency to its floor (``name>=X`` → ``name==X``; pip resolves the rest), installs tunelab
as committed (HEAD's files, not the working tree; not editable) and runs a fast subset of
HEAD's tests (``-m "not slow"``) with that environment's Python. The result (what was asked,
what got installed, what passed) is written to scripts/results/lowest_versions.json.

torch is the exception: its floor is tried from local wheels only (``pip --no-index``), so
that pip never downloads a multi-GB CUDA build; where the floor is not on this machine the
lowest local torch is used instead, and the result file says so.

    python scripts/lowest_versions.py            # ~minutes; needs PyPI (or a local index)
    python scripts/lowest_versions.py --keep /tmp/lowest-venv
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "scripts" / "results" / "lowest_versions.json"
# A few modules across the stack, fast on tiny models: config, data reading and formats,
# tokenization, adapters (peft), packed attention (transformers' internals), the loss, the
# training loop and its checkpoints (torch.distributed.checkpoint), the CLI.
TESTS = ["tests/test_config.py", "tests/data/test_formats.py", "tests/data/test_readers.py",
         "tests/data/test_tokenize.py", "tests/model/test_adapters.py",
         "tests/model/test_varlen.py", "tests/train/test_loss.py",
         "tests/train/test_checkpoint.py", "tests/train/test_loop.py", "tests/test_cli.py"]
FALLBACK_TORCH = "2.13.0"  # the CPU wheel this project's machines hold locally


def floors(pyproject: Path) -> dict[str, str]:
    """``{name: floor}`` of every direct dependency with a ``>=`` bound."""
    found = {}
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*).*", requirement)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def pip(python: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the venv's pip; its output is kept for the log."""
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True,
                          check=check)


def choose_torch(python: Path, floor: str) -> tuple[str, str]:
    """The torch to install and why: the floor when a local wheel has it, else FALLBACK_TORCH."""
    local = pip(python, "install", "--dry-run", "--no-deps", "--no-index", f"torch=={floor}",
                check=False)
    if local.returncode == 0:
        return floor, f"torch=={floor} (the floor) from a local wheel"
    note = (f"torch=={floor} (the floor) cannot be installed here: no local wheel, and PyPI's "
            f"Linux wheels are CUDA builds with GBs of dependencies; used torch=={FALLBACK_TORCH}"
            " (local CPU wheel) instead, so torch's floor is untested by this run")
    return FALLBACK_TORCH, note


def committed_tree(target: Path) -> Path:
    """HEAD's files (``git archive``): the install is of the commit the result names, not of
    whatever the working tree holds at that moment."""
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def installed_versions(python: Path) -> dict[str, str]:
    listing = json.loads(pip(python, "list", "--format", "json").stdout)
    return {item["name"].lower(): item["version"] for item in listing}


def run_tests(python: Path, tests: list[str], tree: Path) -> dict:
    """pytest in the venv from the committed tree (tunelab imported from the venv: the tree's
    src/ is not on the path)."""
    started = time.monotonic()
    process = subprocess.run([str(python), "-m", "pytest", "-q", "-m", "not slow",
                              "-p", "no:cacheprovider", *tests], cwd=tree,
                             capture_output=True, text=True)
    counts = {kind: int(number) for number, kind in
              re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)",
                         process.stdout.splitlines()[-1] if process.stdout else "")}
    return {"modules": tests, "exit_code": process.returncode,
            "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
            "errors": counts.get("error", 0) + counts.get("errors", 0),
            "skipped": counts.get("skipped", 0), "deselected": counts.get("deselected", 0),
            "wall_s": round(time.monotonic() - started, 1),
            "tail": process.stdout.splitlines()[-15:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Create the venv here and keep it.")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    started = time.monotonic()
    venv = args.keep or Path(tempfile.mkdtemp(prefix="tunelab-lowest-"))
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    tree = committed_tree(venv / "source")
    wanted = floors(tree / "pyproject.toml")
    torch_floor = wanted.pop("torch")
    torch_version, torch_note = choose_torch(python, torch_floor)
    print(torch_note, flush=True)
    pins = [f"{name}=={version}" for name, version in sorted(wanted.items())]
    constraints = venv / "lowest-constraints.txt"
    install_started = time.monotonic()
    # torch alone from a local wheel first, then constrained to exactly that build, so pip
    # never replaces it (its own dependencies come with the rest)
    pip(python, "install", "-q", "--no-deps", "--no-index", f"torch=={torch_version}")
    local_torch = installed_versions(python)["torch"]
    constraints.write_text("\n".join([*pins, f"torch=={local_torch}"]) + "\n")
    installed = pip(python, "install", "-q", "-c", str(constraints),
                    str(tree), "pytest", check=False)
    install_s = round(time.monotonic() - install_started, 1)
    if installed.returncode != 0:
        print(installed.stdout[-3000:], installed.stderr[-3000:], sep="\n")
    versions = installed_versions(python)
    tests = run_tests(python, TESTS, tree) if installed.returncode == 0 else None
    result = {
        "python": platform.python_version(), "platform": platform.platform(),
        "commit": subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT,
                                 capture_output=True, text=True).stdout.strip(),
        "floors": {**wanted, "torch": torch_floor},
        "torch": {"installed": versions.get("torch"), "note": torch_note},
        "installed": {name: versions.get(name) for name in sorted({*wanted, "torch"})},
        "at_floor": sorted(name for name, floor in wanted.items()
                           if versions.get(name) and Version(versions[name]) == Version(floor)),
        "install_ok": installed.returncode == 0, "install_s": install_s,
        "install_error": None if installed.returncode == 0 else installed.stderr[-2000:],
        "tests": tests, "wall_s": round(time.monotonic() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(venv, ignore_errors=True)
    ok = bool(tests) and tests["exit_code"] == 0
    print(f"installed at floors: {', '.join(result['at_floor'])}; torch {versions.get('torch')}")
    if tests:
        print(f"tests: {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['errors']} errors in {tests['wall_s']} s; total {result['wall_s']} s")
    print(f"Result written to {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
