"""The gated MLP's ``silu(gate) * up`` keeping two tensors for the backward pass, not three.

SiLU-gated MLPs (Llama, Mistral, Qwen2/3, Phi-3, SmolLM2, ...) compute
``down(silu(gate(x)) * up(x))``.
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

from tunelab.model.architecture import spec_for


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


def _gate_up_forward(self, x: torch.Tensor) -> torch.Tensor:
    # Phi-3: one projection whose halves are gate and up; both stay views of its output
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(SwiGLU.apply(gate, up))


_FORWARDS = {"gated": (("gate_proj", "up_proj", "down_proj"), "act_fn", _gated_forward),
             "fused_gate_up": (("gate_up_proj", "down_proj"), "activation_fn", _gate_up_forward)}


def fuse_gated_activations(model: nn.Module) -> int:
    """Give every SiLU-gated MLP of ``model`` the saving forward; how many were changed.

    Which MLPs those are comes from the family's ``ArchitectureSpec``: separate gate and up
    projections (Llama, Mistral, Qwen) or Phi-3's fused ``gate_up_proj``, each with a SiLU.
    GELU MLPs (Gemma) and mixtures of experts keep their forward, and the planner counts them
    unfused (``ModelShape.gated_silu``).
    """
    kind = spec_for(model.config).mlp_kind
    if kind not in _FORWARDS:
        return 0
    names, act_name, forward = _FORWARDS[kind]
    fused = 0
    for module in model.modules():
        if (all(hasattr(module, name) for name in names)
                and isinstance(getattr(module, act_name, None), (nn.SiLU, SiLUActivation))):
            module.forward = types.MethodType(forward, module)
            fused += 1
    return fused
