"""AdamW for many independent users at once: one row of a (S, P) tensor per user, a step for some rows.

Each row has its own learning rate, step count and gradient-norm clip, and the arithmetic is torch's
``AdamW`` (with ``clip_grad_norm_`` before it), so a user stepped here moves exactly as it would alone.
The whole step is a handful of kernels over the stepping rows: the multi-slot trainer's optimizer.
"""

from __future__ import annotations

from typing import Sequence

import torch


def adamw_coefficients(lrs: Sequence[float], steps: Sequence[int], betas: tuple[float, float]) -> torch.Tensor:
    """(k, 3) host tensor of each stepping row's ``[lr, 1 - b1^t, sqrt(1 - b2^t)]`` for its step ``t``
    (1-based): computed on the host and copied to the device in one go."""
    b1, b2 = betas
    return torch.tensor([[lr, 1 - b1 ** t, (1 - b2 ** t) ** 0.5] for lr, t in zip(lrs, steps)],
                        dtype=torch.float32)


@torch.no_grad()
def adamw_rows_(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                rows: torch.Tensor, coefficients: torch.Tensor, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 0.0) -> None:
    """One AdamW step of ``rows`` of ``params`` (S, P) in place; their gradients are then zeroed.

    ``rows``: (k,) long on the device; ``coefficients``: :func:`adamw_coefficients` on the device.
    ``max_grad_norm > 0`` clips each row's gradient to that L2 norm first (``clip_grad_norm_`` per user).
    """
    b1, b2 = betas
    lr, bias1, bias2_sqrt = coefficients[:, 0:1], coefficients[:, 1:2], coefficients[:, 2:3]   # (k, 1) each
    g = grads.index_select(0, rows)                                                              # (k, P)
    if max_grad_norm > 0:
        norm = g.pow(2).sum(1, keepdim=True).sqrt()
        g.mul_((max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
    m = exp_avg.index_select(0, rows).lerp_(g, 1 - b1)
    v = exp_avg_sq.index_select(0, rows).mul_(b2).addcmul_(g, g, value=1 - b2)
    exp_avg.index_copy_(0, rows, m)
    exp_avg_sq.index_copy_(0, rows, v)
    w = params.index_select(0, rows)
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    denom = v.sqrt_().div_(bias2_sqrt).add_(eps)
    w.sub_(m.div_(denom).mul_(lr / bias1))
    params.index_copy_(0, rows, w)
    grads.index_fill_(0, rows, 0.0)
