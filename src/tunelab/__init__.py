"""tunelab: fine-tune large language models on your own data, from data files to a shipped model.

The Python API (``tunelab/api.py``), one function per command::

    config = tunelab.load_config("examples/sentiment/config.yaml")
    tunelab.check_data(config); tunelab.plan(config)
    result = tunelab.finetune(config)
    tunelab.evaluate(config, run_dir=result.run_dir)
    run = tunelab.load_run(result.run_dir)

Names are imported on first use, so ``import tunelab`` loads neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Config", "Run", "assess", "check_data", "evaluate", "export", "finetune",
           "load_config", "load_run", "plan", "sweep"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tunelab import api

        return getattr(api, name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
