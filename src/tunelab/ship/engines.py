"""The engines ``tunelab serve --engine`` picks: own (``ship/engine.py``), llama.cpp, vllm.

Each other engine is loaded here into what ``serve.create_app`` takes: the tokenizer the front
renders and counts with, the served models (the same names as the own engine's), and an object
with Engine's interface.
"""

from __future__ import annotations

from tunelab.errors import ConfigError

ENGINES = ("own", "llama.cpp", "vllm")


def load_engine(name: str, runs: list[str], *, base: str | None = None, console=None):
    """(tokenizer, served models, engine) for ``name`` (llama.cpp or vllm) serving ``runs``."""
    if name == "llama.cpp":
        from tunelab.ship.llamacpp import load_llama_cpp

        return load_llama_cpp(runs, base=base, console=console)
    if name == "vllm":
        from tunelab.ship.vllm_engine import load_vllm

        return load_vllm(runs, base=base, console=console)
    raise ConfigError(f"unknown engine {name!r}", where="--engine",
                      fix=f"use one of: {', '.join(ENGINES)}")
