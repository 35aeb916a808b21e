"""tunelab: fine-tune large language models on your own data, from data files to a shipped model."""

from __future__ import annotations

__version__ = "0.1.0"


def evaluate(config, **options):
    """Evaluate the base and/or tuned model; see ``tunelab.eval.evaluate.evaluate``."""
    from tunelab.eval.evaluate import evaluate as run

    return run(config, **options)
