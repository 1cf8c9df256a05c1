"""Fused elementwise kernels for training adapters through a frozen Hugging Face decoder.

Eager RMSNorm (fp32 upcast, pow, mean, rsqrt, two muls, two casts), SiLU·up and
rotary embeddings launch many small memory-bound kernels and save their fp32
intermediates for backward; on an 8B model they took ~40% of GPU time in the
multi-slot trainer (bench/results/profile-*-eager.txt). Here each becomes one
``torch.compile``d function (same formula as transformers' Llama/Qwen2 code),
shared by every layer so it compiles once.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

RMSNORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb for Llama-style models."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module, fn: Callable):
        super().__init__()
        self.inner, self.fn = norm, fn

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.inner.weight, self.inner.variance_epsilon)


class FusedMLP(nn.Module):
    def __init__(self, mlp: nn.Module, fn: Callable):
        super().__init__()
        self.inner, self.fn = mlp, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        return m.down_proj(self.fn(m.gate_proj(x), m.up_proj(x)))


def _is_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def apply_fused(model: nn.Module, compile: bool = True) -> Callable[[], None]:
    """Swap RMSNorm/MLP modules and the rotary function for fused ones; returns an undo function."""
    wrap = (lambda f: torch.compile(f, dynamic=True)) if compile else (lambda f: f)
    norm_fn, mlp_fn, rope_fn = wrap(rms_norm), wrap(silu_mul), wrap(rotary)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__ in RMSNORM_CLASSES:
                setattr(module, child_name, FusedRMSNorm(child, norm_fn))
                swapped.append((module, child_name, child))
            elif _is_silu_mlp(child):
                setattr(module, child_name, FusedMLP(child, mlp_fn))
                swapped.append((module, child_name, child))
    modeling = sys.modules.get(type(model).__module__)
    original_rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if original_rope is not None and getattr(modeling, "rotate_half", None) is not None:
        modeling.apply_rotary_pos_emb = rope_fn

    def undo() -> None:
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)
        if original_rope is not None:
            modeling.apply_rotary_pos_emb = original_rope

    return undo
