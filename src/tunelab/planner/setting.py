"""What a prediction depends on, resolved from the config and the device (``Setting``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tunelab.allocator import choose as choose_allocator
from tunelab.config import Config
from tunelab.model.adapters import METHODS
from tunelab.planner.shape import ModelShape, adapter_params


@dataclass
class Setting:
    """What the prediction depends on, resolved from the config and the device."""

    device: str
    weight_dtype: str
    element_bytes: int
    mask_bytes: int
    kind: str
    r: int
    dropout: float
    targets: str | list[str]
    checkpointing: bool
    chunk_tokens: int
    eager: bool
    shared_dropout: bool = False  # method.shared_dropout
    fused_swiglu: bool = False  # train.fused_swiglu
    allocator: str = "system"  # jemalloc | tuned | system (tunelab/allocator.py: choose)


def resolve_setting(config: Config, device: str, weight_dtype: str,
                    allocator: str | None = None) -> Setting:
    """The setting ``config`` trains under on ``device`` with weights in ``weight_dtype``."""
    element = 4 if weight_dtype == "float32" else 2
    method, train_cfg = config.method, config.train
    return Setting(device=device, weight_dtype=weight_dtype, element_bytes=element,
                   mask_bytes=1 if device == "cuda" or method.shared_dropout else element,
                   kind=method.kind, r=method.r,
                   dropout=method.dropout, targets=method.targets,
                   checkpointing=train_cfg.checkpointing,
                   chunk_tokens=train_cfg.loss_chunk_tokens,
                   eager=config.model.attn_implementation == "eager",
                   shared_dropout=method.shared_dropout,
                   fused_swiglu=train_cfg.fused_swiglu,
                   allocator=allocator or choose_allocator(train_cfg.allocator,
                                                           train_cfg.memory))


def trainable_params(shape: ModelShape, setting: Setting) -> int:
    """Parameters that get gradients and AdamW state: the adapter's, or every weight."""
    if not METHODS[setting.kind].adapter:
        return shape.params
    return adapter_params(shape, kind=setting.kind, r=setting.r, targets=setting.targets)


def replace_setting(setting: Setting, **changes: Any) -> Setting:
    """``setting`` with ``changes`` (what the advice and the memory settings try)."""
    return Setting(**{**asdict(setting), **changes})
