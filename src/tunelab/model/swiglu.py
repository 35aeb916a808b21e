"""The gated MLP's ``silu(gate) * up`` keeping two tensors for the backward pass, not three.

Llama-style MLPs (Llama, Mistral, Qwen2, SmolLM2, ...) compute ``down(silu(gate(x)) * up(x))``.
Autograd keeps ``gate`` for the SiLU's backward and ``silu(gate)`` and ``up`` for the product's:
three ``[tokens × intermediate]`` tensors per layer, the largest part of a layer's activations
(SmolLM2-135M: 18 of 46 KB per token). ``SwiGLU`` keeps ``gate`` and ``up`` and recomputes
``silu(gate)`` in the backward pass, an elementwise pass that costs little beside the layer's
matmuls; the result and the gradients are the same functions of the inputs (the derivative of
SiLU written out as torch's own SiLU backward computes it). Liger Kernel's ``LigerSiLUMulFunction``
does the same on GPU.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up``, saving ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        sigmoid = torch.sigmoid(gate)
        grad_up = grad * (gate * sigmoid)
        grad_gate = grad * up * (sigmoid * (1 + gate * (1 - sigmoid)))
        return grad_gate, grad_up


def _gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_gated_activations(model: nn.Module) -> int:
    """Give every Llama-style MLP of ``model`` (``gate_proj``, ``up_proj``, ``down_proj`` and a
    SiLU ``act_fn``) the saving forward; how many were changed. Other activations (GELU MLPs)
    keep theirs."""
    fused = 0
    for module in model.modules():
        if (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
                and isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation))):
            module.forward = types.MethodType(_gated_forward, module)
            fused += 1
    return fused
