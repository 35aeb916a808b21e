"""The malloc a training gets: jemalloc preloaded by the CLI where installed, else glibc's.

PyTorch's CPU tensors come from ``malloc``. glibc serves a large block from ``mmap`` (returned to
the system on ``free``) only above its mmap threshold, and raises that threshold to the size of
every ``mmap``-ed block freed, up to 32 MiB. After the first training step nearly every
activation is served from the heap, where the forward pass's short-lived temporaries and the
tensors saved for the backward pass interleave: the freed temporaries stay resident as holes
that the next, larger requests cannot use. For SmolLM2-135M LoRA that slack was ~2 GB of a
7.5 GB peak (the planner's ``GLIBC_FRAGMENTATION``). A fixed threshold (which also turns the
adjustment off) sends every large tensor to ``mmap``; only small objects stay on the heap.

``mallopt`` changes the running process, so ``train()`` applies it itself; the ``MALLOC_*``
environment variables a user sets by hand are left in charge.

jemalloc does better than both where it is installed (Debian/Ubuntu ``libjemalloc2``, conda
``jemalloc``): size-class slabs instead of one interleaved heap, and freed pages kept for reuse
instead of unmapped and faulted in again. It must be loaded before the process starts
(``LD_PRELOAD``), so the ``tunelab`` command re-executes itself under it for the commands that
train (``preload``), when ``train.allocator`` is ``auto`` or ``jemalloc``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from pathlib import Path

from tunelab.errors import ConfigError

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Tensors from this size up are mmap-ed: a hidden state of a 2,048-token micro-batch of a
# 576-wide model (SmolLM2-135M) is 4.7 MB. Smaller blocks stay on the heap, where they are fast.
# Every mmap-ed page costs a page fault when first written: on the sentiment example (3 steps)
# a 256 KiB threshold peaked at 3.98 GB for 229 CPU s, 4 MiB at 4.18 GB for 177 CPU s, glibc's
# defaults at 6.42 GB for 122 CPU s; 8 MiB and up saved nothing (6.50 GB).
MMAP_THRESHOLD_BYTES = 4 * 2**20
# Free memory at the top of the heap above this is returned to the system at once.
TRIM_THRESHOLD_BYTES = 16 * 2**20
# jemalloc's settings for training: dirty pages are kept for reuse (never purged, so never
# faulted in again); on the sentiment example (6 steps) its defaults (10 s decay) peaked at
# 3.86 GiB and 128 tokens/s, these at 4.05 GiB and 199 tokens/s, glibc's defaults at 6.20 GiB
# and 165 tokens/s.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# the commands that train (their first argument is the config)
TRAINING_COMMANDS = ("train", "assess", "sweep")
_REEXEC_MARK = "TUNELAB_ALLOCATOR_PRELOADED"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")
_state = {"tuned": False}  # mallopt's settings are the process's: so is this


def tune_allocator(*, mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES,
                   trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES) -> dict | None:
    """Fix glibc's mmap and trim thresholds for this process; the settings, or None if not set.

    Nothing is set off glibc, or when the environment already says how malloc should behave
    (``MALLOC_*``, ``GLIBC_TUNABLES``, or another allocator preloaded).
    """
    libc = _glibc()
    user = [name for name in USER_SETTINGS if os.environ.get(name)]
    if libc is None or user:
        return None
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_bytes)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes)
    _state["tuned"] = True
    return {"mmap_threshold_bytes": mmap_threshold_bytes,
            "trim_threshold_bytes": trim_threshold_bytes}


def for_training(setting: str, memory: str) -> dict:
    """Set this process's allocator up for a run (``train.allocator``, ``train.memory``) and
    say which it is, for the manifest: ``{"name": "jemalloc" | "tuned" | "system" |
    "external", ...its settings}``."""
    if setting == "jemalloc" and not jemalloc_loaded():
        installed = find_jemalloc()
        raise ConfigError(
            "train.allocator is jemalloc, but this process was not started under it"
            + ("" if installed else " and no libjemalloc is installed"),
            where="train.allocator",
            fix=("run the tunelab command (it preloads jemalloc itself), or start Python with "
                 f"LD_PRELOAD={installed} MALLOC_CONF={JEMALLOC_CONF}" if installed else
                 "install it (apt install libjemalloc2, or conda install jemalloc), or use "
                 "train.allocator: auto"))
    name = in_use(setting, memory)
    if name == "jemalloc":
        return {"name": name, "malloc_conf": os.environ.get("MALLOC_CONF")}
    if name == "tuned":
        settings = tune_allocator()
        return {"name": "tuned", **settings} if settings else {"name": "system"}
    return {"name": name}


def release_memory() -> None:
    """Give back what a finished phase (validation, sampling) left: garbage and free heap.

    Only once ``tune_allocator`` has run: the training steps' tensors then come from ``mmap``
    and cannot reuse what is left on the heap, so the leftovers would add to the peak.
    """
    if not _state["tuned"]:
        return
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def find_jemalloc() -> str | None:
    """The jemalloc library the dynamic loader would find (``libjemalloc.so.2``), or None."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("jemalloc")


def jemalloc_loaded() -> bool:
    """Whether jemalloc serves this process's ``malloc`` (it was preloaded)."""
    try:
        return "libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def choose(setting: str, memory: str, *, jemalloc_available: bool | None = None) -> str:
    """The allocator a run under ``train.allocator: setting`` gets from the ``tunelab``
    command: jemalloc, tuned (glibc with fixed thresholds) or system (the C library's
    defaults). auto: jemalloc where it is installed, else tuned for ``train.memory: low`` and
    system for the default."""
    if setting != "auto":
        return setting
    if jemalloc_available is None:
        jemalloc_available = find_jemalloc() is not None
    if jemalloc_available:
        return "jemalloc"
    return "tuned" if memory == "low" else "system"


def in_use(setting: str, memory: str) -> str:
    """What this process can still honour of ``choose(setting, memory)``: jemalloc only if it
    was preloaded (``tunelab.train()`` called from Python without it gets glibc: tuned for
    low, else the defaults); ``external`` when the environment set malloc up by hand."""
    if jemalloc_loaded():
        return "jemalloc"
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return "external"
    return choose("auto" if setting == "jemalloc" else setting, memory,
                  jemalloc_available=False)


def preload_environment(argv: list[str], environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute ``tunelab ARGV`` under so that jemalloc serves it, or None
    to run as is: not a training command, a config that does not ask for jemalloc (read with
    its ``--set`` overrides; one that cannot be read is left to the command to report),
    jemalloc not installed, or malloc already chosen (``LD_PRELOAD``, ``MALLOC_*``, or this
    is the re-executed process)."""
    words = [word for word in argv[1:] if not word.startswith("-")]
    if len(words) < 2 or words[0] not in TRAINING_COMMANDS:
        return None
    setting, memory = _allocator_settings(Path(words[1]), argv)
    if setting is None:
        return None
    return training_environment(setting, memory, environ)


def training_environment(setting: str, memory: str,
                         environ: dict[str, str]) -> dict[str, str] | None:
    """``environ`` as the ``tunelab`` command changes it for a run under ``train.allocator:
    setting`` and ``train.memory: memory``: jemalloc preloaded where ``choose`` picks it (None:
    unchanged)."""
    if choose(setting, memory) != "jemalloc":
        return None
    return jemalloc_environment(environ)


def without_malloc_settings(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` without any malloc choice (``USER_SETTINGS`` and tunelab's preload mark): a
    child process then gets the allocator its own settings choose."""
    return {key: value for key, value in environ.items()
            if key not in USER_SETTINGS and key != _REEXEC_MARK}


def jemalloc_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """``environ`` with jemalloc preloaded (and tunelab's settings for it), or None where it
    is not installed or malloc is already chosen (by hand, or by an earlier preload)."""
    library = find_jemalloc()
    if (library is None or environ.get(_REEXEC_MARK)
            or any(environ.get(name) for name in USER_SETTINGS)):
        return None
    return {**environ, "LD_PRELOAD": library, "MALLOC_CONF": JEMALLOC_CONF, _REEXEC_MARK: "1"}


def preload(argv: list[str]) -> None:
    """Re-execute this ``tunelab`` command under jemalloc when ``preload_environment`` says so
    (same process id, arguments and standard streams); return if not."""
    environment = preload_environment(argv, dict(os.environ))
    if environment is not None:
        os.execve(sys.executable, [sys.executable, "-m", "tunelab", *argv[1:]], environment)


def _allocator_settings(config: Path, argv: list[str]) -> tuple[str | None, str]:
    """``train.allocator`` and ``train.memory`` of a config file with argv's ``--set``s."""
    import yaml

    try:
        if config.is_dir():  # tunelab train --resume RUN
            config = config / "config.yaml"
        loaded = yaml.safe_load(config.read_text()) or {}
        if "base" in loaded and "train" not in loaded:  # a sweep file: its base config
            loaded = yaml.safe_load((config.parent / loaded["base"]).read_text()) or {}
        train = loaded.get("train") or {}
        setting, memory = train.get("allocator", "auto"), train.get("memory", "default")
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return None, "default"
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--set" and "=" in value:
            key, _, given = value.partition("=")
            if key.strip() == "train.allocator":
                setting = given.strip()
            elif key.strip() == "train.memory":
                memory = given.strip()
    if setting not in ("auto", "jemalloc"):
        return None, memory
    return setting, memory
