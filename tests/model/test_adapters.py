"""A training that quantises nothing does not load bitsandbytes (peft would, when installed)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import importlib.util, sys
from tunelab.model.adapters import without_bitsandbytes
print(without_bitsandbytes(sys.argv[1]))
import peft
from transformers import LlamaConfig, LlamaForCausalLM
from tunelab.model.adapters import apply_method
model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     vocab_size=64))
model = apply_method(model, kind=sys.argv[1], r=2, alpha=4, dropout=0.0,
                     targets="all-linear", rslora=False)
print(sum(p.numel() for p in model.parameters() if p.requires_grad) > 0,
      sys.modules.get("bitsandbytes") is not None, importlib.util.find_spec("bitsandbytes"))
"""


def run(kind: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", CHILD, kind], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_lora_trains_without_bitsandbytes_loaded():
    took_effect, trainable, loaded, spec = run("lora")
    assert (took_effect, trainable, loaded, spec) == ("True", "True", "False", "None")


def test_qlora_keeps_bitsandbytes_importable():
    assert run("qlora")[0] == "False"
