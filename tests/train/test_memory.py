"""Training memory: the allocators (jemalloc preloaded by the CLI, glibc tuned), and
train.memory: low trains the same model as the default from the CLI, with the allocator and the
peak in the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_config
from safetensors.torch import load_file

from tunelab import allocator
from tunelab.errors import ConfigError

# glibc's default raises its mmap threshold to the size of a freed mmap-ed block (up to 32 MB)
# and its trim threshold to twice that: a later, smaller block comes from the heap and stays
# resident after it is freed. The tuned allocator keeps the thresholds fixed and unmaps it.
STRANDED = """
import sys, torch
from tunelab.allocator import tune_allocator

def rss():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS"))

if sys.argv[1] == "tuned":
    assert tune_allocator() is not None
first = torch.ones(24 * 2**18)      # 24 MB: mmap-ed; freeing it raises glibc's threshold
del first
before = rss()
block = torch.ones(16 * 2**18)      # 16 MB: now below the threshold
del block
print(rss() - before)
"""


def stranded_bytes(allocator: str) -> int:
    completed = subprocess.run([sys.executable, "-c", STRANDED, allocator], capture_output=True,
                               text=True, timeout=300,
                               env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert completed.returncode == 0, completed.stderr[-2000:]
    return int(completed.stdout.strip().splitlines()[-1])


def test_tuned_allocator_returns_a_freed_block_that_glibc_keeps():
    assert stranded_bytes("system") > 12 * 2**20
    assert stranded_bytes("tuned") < 4 * 2**20


# Three steps on 60 reviews, one sample: enough to compare two runs' adapters.
SHORT = {"sizes": (60, 10), "max_steps": 3, "samples": 1, "max_new_tokens": 2}


def cli_train(config: Path, *overrides: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", config,
         *[arg for pair in overrides for arg in ("--set", pair)]],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_low_memory_trains_the_same_adapter_from_the_cli(tmp_path, tiny_model_dir):
    """Activation checkpointing recomputes the forward pass, shared dropout masks included: the
    adapter equals the default run's."""
    default = write_config(tmp_path, tiny_model_dir, name="default", **SHORT)
    low = write_config(tmp_path, tiny_model_dir, name="low", memory="low", **SHORT)
    cli_train(default)
    cli_train(low)
    runs = tmp_path / "runs"
    manifests = {name: json.loads((runs / name / "manifest.json").read_text())
                 for name in ("default", "low")}
    for manifest in manifests.values():
        assert manifest["status"] == "finished"
        assert manifest["measured_peak_rss_bytes"] > 0
    if allocator.find_jemalloc():  # the CLI preloads it for both
        assert manifests["default"]["allocator"]["name"] == "jemalloc"
        assert manifests["low"]["allocator"] == manifests["default"]["allocator"]
    else:
        assert manifests["default"]["allocator"] == {"name": "system"}  # glibc's defaults
        assert manifests["low"]["allocator"]["mmap_threshold_bytes"] > 0
    saved = yaml.safe_load((runs / "low" / "config.yaml").read_text())
    assert saved["train"]["memory"] == "low"
    weights = [load_file(runs / name / "adapter" / "adapter_model.safetensors")
               for name in ("default", "low")]
    assert weights[0].keys() == weights[1].keys()
    for key, tensor in weights[0].items():
        assert (tensor - weights[1][key]).abs().max() < 1e-5, key
    assert manifests["low"]["val_loss_after"] == pytest.approx(
        manifests["default"]["val_loss_after"], abs=1e-5)


JEMALLOC = "libjemalloc.so.2"


@pytest.fixture
def jemalloc_installed(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: JEMALLOC)


def test_the_cli_preloads_jemalloc_for_training_commands_only(tmp_path, jemalloc_installed):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"name": "run", "train": {"memory": "low"}}))
    environment = allocator.preload_environment(
        ["tunelab", "train", str(config), "--overwrite"], {"PATH": "/usr/bin"})
    assert environment == {"PATH": "/usr/bin", "LD_PRELOAD": JEMALLOC,
                           "MALLOC_CONF": allocator.JEMALLOC_CONF,
                           "TUNELAB_ALLOCATOR_PRELOADED": "1"}
    for argv in (["tunelab", "eval", str(config)],  # not a training command
                 ["tunelab", "train", str(config), "--set", "train.allocator=system"],
                 ["tunelab", "train", str(config), "--set", "train.allocator=tuned"],
                 ["tunelab", "train", str(tmp_path / "missing.yaml")],  # train reports it
                 ["tunelab", "--help"]):
        assert allocator.preload_environment(argv, {}) is None, argv
    train = ["tunelab", "train", str(config)]
    for chosen in ({"LD_PRELOAD": "libtcmalloc.so"}, {"MALLOC_CONF": "narenas:1"},
                   {"MALLOC_ARENA_MAX": "2"}, {"TUNELAB_ALLOCATOR_PRELOADED": "1"}):
        assert allocator.preload_environment(train, chosen) is None, chosen  # no loop either
    # a run directory (--resume) and a sweep file are read for their config
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "run" / "config.yaml").write_text(config.read_text())
    (tmp_path / "sweep.yaml").write_text("base: run.yaml\nname: s\n")
    assert allocator.preload_environment(
        ["tunelab", "train", "--resume", str(tmp_path / "runs" / "run")], {}) is not None
    assert allocator.preload_environment(
        ["tunelab", "sweep", str(tmp_path / "sweep.yaml"), "--workers", "2"], {}) is not None


def test_auto_is_jemalloc_where_installed_else_glibc_by_memory_setting(monkeypatch):
    assert allocator.choose("auto", "default", jemalloc_available=True) == "jemalloc"
    assert allocator.choose("auto", "low", jemalloc_available=True) == "jemalloc"
    assert allocator.choose("auto", "default", jemalloc_available=False) == "system"
    assert allocator.choose("auto", "low", jemalloc_available=False) == "tuned"
    assert allocator.choose("tuned", "default", jemalloc_available=True) == "tuned"
    # a process not started under jemalloc gets glibc, by the memory setting
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    for name in allocator.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert allocator.in_use("auto", "low") == "tuned"
    assert allocator.in_use("auto", "default") == "system"
    assert allocator.in_use("system", "low") == "system"


def test_jemalloc_asked_for_without_it_loaded_is_a_config_error(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_loaded", lambda: False)
    for installed, fix in ((JEMALLOC, f"LD_PRELOAD={JEMALLOC}"), (None, "apt install")):
        monkeypatch.setattr(allocator, "find_jemalloc", lambda installed=installed: installed)
        with pytest.raises(ConfigError, match="train.allocator is jemalloc") as caught:
            allocator.for_training("jemalloc", "default")
        assert fix in caught.value.render()


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="libjemalloc is not installed")
def test_the_tunelab_command_trains_under_jemalloc(tmp_path, tiny_model_dir):
    """The real re-execution: the manifest says jemalloc, and the trained adapter is the one
    glibc's run trains."""
    config = write_config(tmp_path, tiny_model_dir, name="jemalloc", **SHORT)
    cli_train(config)
    cli_train(config, "name=glibc", "train.allocator=system")
    runs = tmp_path / "runs"
    manifests = {name: json.loads((runs / name / "manifest.json").read_text())
                 for name in ("jemalloc", "glibc")}
    assert manifests["jemalloc"]["allocator"] == {"name": "jemalloc",
                                                  "malloc_conf": allocator.JEMALLOC_CONF}
    assert manifests["glibc"]["allocator"] == {"name": "system"}
    weights = [load_file(runs / name / "adapter" / "adapter_model.safetensors")
               for name in ("jemalloc", "glibc")]
    for key, tensor in weights[0].items():
        assert (tensor == weights[1][key]).all(), key
