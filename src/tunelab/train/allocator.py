"""glibc malloc set for training: freed activations go back to the system instead of into holes.

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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys

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
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")
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
