"""Checkpoints on the tiny model: checksummed, damaged ones named and skipped, a full disk
stopping the run with a clear error and the last checkpoint intact; resumes stay bit-identical.

The SIGKILL drill (20 runs killed at random moments, inside checkpoint writes too) is a script,
``scripts/crash_drills.py``, not a test: it takes minutes.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_config, quiet
from rich.console import Console
from safetensors.torch import load_file

from tunelab.config import Config, load_config
from tunelab.errors import RunError
from tunelab.train.checkpoint import CHECKSUMS, damage, list_checkpoints
from tunelab.train.loop import train

ADAPTER = Path("adapter") / "adapter_model.safetensors"
# Dropout on: an exact resume needs the random generators' states as well as the weights.
SHORT = {"max_steps": 6, "save_every": 2, "keep_checkpoints": 2, "samples": 1}


def recording() -> tuple[Console, io.StringIO]:
    """A console whose output the test reads; wide, so that no path is folded."""
    output = io.StringIO()
    return Console(file=output, width=400), output


@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_model_dir) -> dict:
    """The uninterrupted run's adapter tensors."""
    folder = tmp_path_factory.mktemp("whole")
    result = train(make_config(folder, tiny_model_dir, **SHORT), console=quiet())
    return load_file(result.run_dir / ADAPTER)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model_dir) -> Path:
    """A run stopped after 4 of its 6 steps: checkpoints step-2 and step-4."""
    folder = tmp_path_factory.mktemp("stopped")
    result = train(make_config(folder, tiny_model_dir, **SHORT), stop_after_steps=4,
                   console=quiet())
    assert [p.name for p in list_checkpoints(result.run_dir / "checkpoints")] == \
        ["step-2", "step-4"]
    return result.run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def saved_config(run_dir: Path) -> Config:
    """The run's own resolved config, as ``tunelab train --resume`` reads it."""
    return load_config(run_dir / "config.yaml")


def assert_same_adapter(run_dir: Path, whole: dict) -> None:
    resumed = load_file(run_dir / ADAPTER)
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[name], whole[name]) for name in whole)


def test_checkpoint_lists_its_files_for_sha256sum(stopped):
    checkpoint = stopped / "checkpoints" / "step-4"
    listed = (checkpoint / CHECKSUMS).read_text().splitlines()
    assert sorted(line.split("  ")[1] for line in listed) == sorted(
        p.name for p in checkpoint.iterdir() if p.name != CHECKSUMS)
    check = subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=checkpoint, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert damage(checkpoint) is None


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("file", "harm", "said"), [
    ("__0_0.distcp", _truncate, "__0_0.distcp ({size:,} bytes) is not the file that was saved"),
    ("__0_0.distcp", Path.unlink, "__0_0.distcp is missing"),
    ("scheduler.pt", Path.unlink, "scheduler.pt is missing"),
    ("__0_0.distcp", _flip_byte, "__0_0.distcp ({size:,} bytes) is not the file that was saved"),
], ids=["truncated-weights", "missing-weights", "missing-schedule", "changed-byte"])
def test_damaged_newest_checkpoint_is_named_and_the_one_before_resumes(
        stopped, whole, tmp_path, file, harm, said):
    run_dir = copy_of(stopped, tmp_path)
    newest = run_dir / "checkpoints" / "step-4"
    harm(newest / file)
    size = (newest / file).stat().st_size if (newest / file).exists() else 0
    console, output = recording()
    result = train(saved_config(run_dir), resume=run_dir, console=console)
    text = output.getvalue()
    assert f"checkpoint {newest} is damaged ({said.format(size=size)}" in text
    assert "Resuming" in text and "from step-2 (step 2 of 6)" in text
    assert (run_dir / "checkpoints" / "damaged-step-4" / "trainer_state.json").is_file()
    assert result.steps == 6
    assert_same_adapter(run_dir, whole)


def test_every_checkpoint_damaged_is_a_clear_error(stopped, tmp_path):
    run_dir = copy_of(stopped, tmp_path)
    for step in (2, 4):
        _truncate(run_dir / "checkpoints" / f"step-{step}" / "__0_0.distcp")
    console, output = recording()
    with pytest.raises(RunError, match="no complete checkpoint to resume from: every "
                       "checkpoint is damaged") as raised:
        train(saved_config(run_dir), resume=run_dir, console=console)
    assert "--overwrite" in raised.value.fix
    for step in (2, 4):
        assert f"checkpoint {run_dir / 'checkpoints' / f'step-{step}'} is damaged" in \
            output.getvalue()


def test_leftovers_of_a_killed_save_are_not_taken_for_checkpoints(stopped, whole, tmp_path):
    """A kill inside a save leaves ``.step-N.tmp``; one inside the clean-up, ``.removing-step-N``
    (renamed before it is deleted): neither is resumed from, the next save removes both."""
    run_dir = copy_of(stopped, tmp_path)
    checkpoints = run_dir / "checkpoints"
    half_written = shutil.copytree(checkpoints / "step-4", checkpoints / ".step-6.tmp")
    _truncate(half_written / "__0_0.distcp")
    shutil.copytree(checkpoints / "step-2", checkpoints / ".removing-step-0")
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-2", "step-4"]
    config = saved_config(run_dir)
    config.train.save_every = 1
    train(config, resume=run_dir, console=quiet())
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-5"]
    assert_same_adapter(run_dir, whole)


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_again(
        stopped, whole, tmp_path):
    run_dir = copy_of(stopped, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    console, output = recording()
    result = train(saved_config(run_dir), resume=run_dir, console=console)
    assert "stopped before its first checkpoint: starting it again from step 0" in \
        output.getvalue()
    assert result.steps == 6 and result.val_loss_before is not None
    assert_same_adapter(run_dir, whole)


def _mount_namespace() -> list[str] | None:
    """``unshare`` arguments that give a process its own mount namespace as (mapped) root:
    a tmpfs mounted there needs no root on the host and vanishes with the process. None where
    the kernel or the container forbids user namespaces."""
    command = ["unshare", "--user", "--map-root-user", "--mount"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True)
    except FileNotFoundError:
        return None
    return command if probe.returncode == 0 else None


def test_full_disk_stops_with_a_clear_error_and_the_run_resumes(stopped, whole, tmp_path,
                                                               tiny_model_dir):
    namespace = _mount_namespace()
    if namespace is None:
        pytest.skip("needs a mount namespace (unshare --user --mount) for a real full disk; "
                    "this kernel or container forbids unprivileged user namespaces; "
                    "scripts/crash_drills.py runs the same drill as root")
    checkpoint_bytes = sum(p.stat().st_size for p in (stopped / "checkpoints" / "step-2")
                           .iterdir())
    disk = tmp_path / "disk"
    config = make_config(tmp_path, tiny_model_dir, **SHORT).model_dump(mode="json")
    config["output_dir"] = str(disk / "runs")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    disk.mkdir()
    kept = tmp_path / "kept"
    # 20 MiB of tmpfs with room for the first checkpoint and half of the second; the run
    # directory is copied out before the namespace (and its tmpfs) ends.
    script = ('mount -t tmpfs -o size=20m tmpfs "$1" && '
              'fallocate -l $(( $(df -B1 --output=avail "$1" | tail -1) - $2 )) "$1/filler" && '
              '"$3" -m tunelab train "$4"; code=$?; cp -a "$1/runs" "$5"; exit $code')
    finished = subprocess.run(
        [*namespace, "sh", "-c", script, "sh", str(disk), str(int(1.5 * checkpoint_bytes)),
         sys.executable, str(config_path), str(kept)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    error = " ".join(finished.stderr.split())
    run_dir = disk / "runs" / "reviews"
    assert finished.returncode == 3, finished.stderr
    assert "Traceback" not in finished.stderr
    assert (f"training error: {run_dir}: could not write {run_dir}/checkpoints/step-4: No space "
            f"left on device; the run stops here and the last complete checkpoint is "
            f"{run_dir}/checkpoints/step-2. Fix: free space on the disk that holds {run_dir}"
            ) in error
    assert f"then tunelab train --resume {run_dir}" in error
    left = kept / "reviews"
    assert sorted(p.name for p in (left / "checkpoints").iterdir()) == ["step-2"]
    assert damage(left / "checkpoints" / "step-2") is None
    result = train(saved_config(left), resume=left, console=quiet())
    assert result.steps == 6
    assert_same_adapter(left, whole)
