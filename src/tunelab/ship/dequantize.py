"""A QLoRA run's base as its adapter saw it: the NF4 weights de-quantised to float, for merging.

A QLoRA adapter was trained on top of the 4-bit base, so it corrects the 4-bit weights, not the
original float ones. Merging it into the original weights gives a model that never existed
during training (off by the whole quantisation error); merging it into the 4-bit weights rounds
the update away again. The faithful merge is into the de-quantised 4-bit weights: every
``Linear4bit`` becomes a float ``nn.Linear`` whose weight is exactly what the 4-bit layer
multiplied by, so base + adapter computes what was trained and the merged folder is ordinary
float safetensors that any tool loads. transformers' own ``PreTrainedModel.dequantize`` does
the replacement (and drops the quantisation config, so the saved folder loads without
bitsandbytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_run_for_merge(run_dir: str | Path) -> tuple[Any, Any, Any]:
    """Model (base + adapter), tokenizer and config of a run, ready to merge: for a 4-bit
    method (QLoRA) the base is the de-quantised NF4 base the adapter was trained on."""
    from tunelab.model.adapters import METHODS, load_tuned
    from tunelab.runs import load_run_base, load_run_model, open_run

    run_dir, config = open_run(run_dir, need_data=False)
    if not METHODS[config.method.kind].load_in_4bit:
        return load_run_model(run_dir)
    base, tokenizer = load_run_base(run_dir, config)  # the 4-bit base, as trained
    model = load_tuned(base.dequantize(), run_dir)
    model.eval()
    return model, tokenizer, config
