"""This process's peak memory, as the planner predicts it: read by the loop, the calibration
run and assess to set a measurement beside a prediction."""

from __future__ import annotations

import sys

# CUDA context and allocator slack outside max_memory_allocated; cuBLAS/cuDNN workspaces.
GPU_RUNTIME_BYTES = 600 * 2**20


def measured_peak_bytes(device_type: str) -> int:
    """This process's peak memory as the plan predicts it: on CPU the peak RSS of this process
    image (VmHWM; ``ru_maxrss`` is no good after fork+exec on Linux, where it starts at the
    parent's RSS), on GPU the allocator's peak plus the CUDA context allowance."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() + GPU_RUNTIME_BYTES
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image: /proc's VmHWM, else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
