"""Fused elementwise kernels for training adapters through a frozen Hugging Face decoder.

Eager RMSNorm (fp32 upcast, pow, mean, rsqrt, two muls, two casts), SiLU·up and
rotary embeddings launch many small memory-bound kernels and save their fp32
intermediates for backward; on an 8B model they took ~40% of GPU time in the
multi-slot trainer (bench/results/profile-*-eager.txt). Here each becomes one
``torch.compile``d function (same formula as transformers' Llama/Qwen2 code),
shared by every layer so it compiles once.
"""

from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mta_ray.engine.multilora import RECOMPUTE, MultiSlotLinear, slot_linear, slot_linear_backward

RMSNORM_CLASSES = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast back, scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul_halves(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul of gate and up side by side in one tensor (a shared-input GEMM's output)."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]


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
        weight, eps = self.inner.weight, self.inner.variance_epsilon
        y = self.fn(x, weight, eps)
        if torch.is_grad_enabled():  # a multi-slot LoRA reading y recomputes it rather than keep it
            setattr(y, RECOMPUTE, (self.fn, x.detach(), weight, eps))
        return y


class GatedDown(torch.autograd.Function):
    """``down(silu(gate) * up)`` through a multi-slot down projection, from gate and up side by side.

    Keeps gate/up for backward (the SiLU's gradient needs them anyway) but not their product, which the
    down projection's LoRA gradient would otherwise hold: at intermediate width it is the largest
    activation of a decoder layer, and recomputing it in backward is one elementwise pass.
    """

    @staticmethod
    def forward(ctx, gate_up, A, B, down: MultiSlotLinear, act: Callable):
        router = copy.copy(down.router)  # the routing of this pass, whatever the router holds by backward
        with torch.no_grad():
            y = slot_linear(act(gate_up), down.base.weight, down.base.bias, A, B, router)
        ctx.save_for_backward(gate_up, A, B)
        ctx.down, ctx.act, ctx.router = down, act, router
        return y

    @staticmethod
    def backward(ctx, dy):
        gate_up, A, B = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate_up.detach().requires_grad_()
            product = ctx.act(leaf)
        d_product, dA, dB = slot_linear_backward(dy, product.detach(), ctx.down.base.weight, A, B, ctx.router)
        d_gate_up, = torch.autograd.grad(product, leaf, d_product)
        return d_gate_up, dA, dB, None, None


class FusedMLP(nn.Module):
    def __init__(self, mlp: nn.Module, fn: Callable, halves_fn: Callable):
        super().__init__()
        self.inner, self.fn, self.halves_fn = mlp, fn, halves_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        shared = getattr(m.gate_proj, "shared", None)
        if shared is None or shared.members != [m.gate_proj, m.up_proj]:
            return m.down_proj(self.fn(m.gate_proj(x), m.up_proj(x)))
        gate_up = shared.whole(x)  # one GEMM; its gradient comes back as one tensor, not two to concatenate
        down = m.down_proj
        if (isinstance(down, MultiSlotLinear) and down.router.rows is not None and down.rank and not down.dropout
                and down.shared is None and gate_up.dim() == 3):
            A, B = down.factors(gate_up.dtype)
            return GatedDown.apply(gate_up, A, B, down, self.halves_fn)
        return down(self.halves_fn(gate_up))


def static_last_dims(fn: Callable) -> Callable:
    """Compile for fixed last dimensions (batch, rows and sequence stay dynamic). With a symbolic width the
    index arithmetic of slices made the kernels far slower than memory bandwidth on an H100: the SiLU halves
    2.5-3.5x, rotary's ``rotate_half`` ~8x (911 us a call where streaming q and k takes ~110 us,
    ``profile-llama3-8b-h100-kernels-16ft.txt``). Widths are fixed per model: one compile each."""

    def call(*args: object, **kwargs: object) -> object:
        for a in args:
            if isinstance(a, torch.Tensor) and a.dim():
                torch._dynamo.mark_static(a, a.dim() - 1)
        return fn(*args, **kwargs)

    return call


def _is_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def apply_fused(model: nn.Module, compile: bool = True) -> Callable[[], None]:
    """Swap RMSNorm/MLP modules and the rotary function for fused ones; returns an undo function."""
    wrap = (lambda f: static_last_dims(torch.compile(f, dynamic=True))) if compile else (lambda f: f)
    norm_fn, mlp_fn, rope_fn, halves_fn = wrap(rms_norm), wrap(silu_mul), wrap(rotary), wrap(silu_mul_halves)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__ in RMSNORM_CLASSES:
                setattr(module, child_name, FusedRMSNorm(child, norm_fn))
                swapped.append((module, child_name, child))
            elif _is_silu_mlp(child):
                setattr(module, child_name, FusedMLP(child, mlp_fn, halves_fn))
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
