"""Fitting a LoRA into a serving stack's rank: sums of branches, exact low-rank factorisation, padding.

A personalised user is a sum of branches (the merged anchors and the stacked adapter), each on its own
modules; its update on a module is the sum of whatever branches sit there, of rank up to the sum of
their ranks. Servers (vLLM) take one rank per adapter, from a fixed set, up to a cap. Here:

- :func:`combine` sums branches exactly (factors concatenated, modules of either branch kept);
- :func:`truncate` gives the best rank-k approximation of ``B @ A`` (Eckart-Young) without ever forming
  the (out, in) matrix: QR of ``B`` and of ``A^T``, SVD of the small (r, r) core, O((in + out) r^2);
- :func:`pad` adds zero rows/columns (exact: ``[B 0] [A; 0] = B A``);
- :func:`fit_rank` does all of it for a whole LoRA and reports kept energy and relative error per module.

Pure tensor functions (no files): ``files.peft_format`` writes the result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mta_ray.core.lora import Lora, LoraPair

SERVED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ranks vLLM accepts for ``--max-lora-rank`` (its ``MaxLoRARanks``); an exported adapter's rank is one."""


class Fit(NamedTuple):
    """How one module's update was fitted into the served rank."""

    rank: int
    """Rank of the update before fitting (sum of its branches' ranks)."""
    kept_energy: float
    """``sum of kept sigma^2 / sum of all sigma^2`` (1.0 when exact)."""
    rel_error: float
    """``||dW_fitted - dW||_F / ||dW||_F`` (0.0 when exact)."""


def combine(*loras: Lora) -> Lora:
    """One LoRA whose update on every module is the sum of the updates of the branches that adapt it.

    Unlike :func:`mta_ray.core.lora.stack`, the branches may adapt different modules (a bank on
    all linear layers, a stacked adapter on q/v only): a module of one branch keeps that branch's factors.
    """
    out: Lora = {}
    for name in sorted({n for lora in loras for n in lora}):
        pairs = [lora[name] for lora in loras if name in lora]
        out[name] = LoraPair(torch.cat([p.A for p in pairs], dim=0), torch.cat([p.B for p in pairs], dim=1))
    return out


def served_rank(needed: int, cap: int) -> int:
    """The smallest served rank that holds ``min(needed, cap)``; ``cap`` must itself be a served rank."""
    if cap not in SERVED_RANKS:
        raise ValueError(f"rank cap {cap} is not one of {list(SERVED_RANKS)}")
    return next(r for r in SERVED_RANKS if r >= min(max(needed, 1), cap))


def truncate(pair: LoraPair, rank: int) -> tuple[LoraPair, Fit]:
    """The best rank-``rank`` approximation of ``B @ A`` as factors, with its kept energy and error.

    ``B = Qb Rb``, ``A^T = Qa Ra``, so ``B A = Qb (Rb Ra^T) Qa^T``; the core's SVD ``U S V^T`` gives
    ``B A = (Qb U) S (Qa V)^T``, whose leading ``rank`` terms are the optimum in Frobenius and
    spectral norm. Computed in float64; ``sqrt(S)`` goes to each side so both factors share the scale.
    A pair of rank at most ``rank`` comes back unchanged (exact).
    """
    r = pair.A.shape[0]
    if r <= rank:
        return pair, Fit(r, 1.0, 0.0)
    A, B, kept, err = _truncate_many(pair.A[None], pair.B[None], rank)
    return LoraPair(A[0], B[0]), Fit(r, kept[0], err[0])


def _truncate_many(A: torch.Tensor, B: torch.Tensor, rank: int
                   ) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """:func:`truncate` of L same-shaped pairs at once: ``A`` (L, r, in), ``B`` (L, out, r)."""
    qb, rb = torch.linalg.qr(B.double())                     # (L, out, r'), (L, r', r)
    qa, ra = torch.linalg.qr(A.double().transpose(-1, -2))   # (L, in, r''), (L, r'', r)
    u, s, vh = torch.linalg.svd(rb @ ra.transpose(-1, -2))   # core (L, r', r'')
    energy = s.square()
    total, kept = energy.sum(-1), energy[:, :rank].sum(-1)   # (L,)
    root = s[:, :rank].sqrt()
    new_b = (qb @ u[:, :, :rank]) * root[:, None, :]                          # (L, out, k)
    new_a = root[:, :, None] * (vh[:, :rank] @ qa.transpose(-1, -2))          # (L, k, in)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    share = torch.where(total > 0, kept / safe, torch.ones_like(total))
    err = torch.where(total > 0, ((total - kept).clamp(min=0) / safe).sqrt(), torch.zeros_like(total))
    return new_a.to(A.dtype), new_b.to(B.dtype), share.tolist(), err.tolist()


def pad(pair: LoraPair, rank: int) -> LoraPair:
    """``pair`` with zero rows of A and zero columns of B up to ``rank`` (the update is unchanged)."""
    extra = rank - pair.A.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {pair.A.shape[0]} down to {rank}")
    if extra == 0:
        return pair
    return LoraPair(torch.cat([pair.A, pair.A.new_zeros(extra, pair.A.shape[1])], dim=0),
                    torch.cat([pair.B, pair.B.new_zeros(pair.B.shape[0], extra)], dim=1))


def fit_rank(lora: Lora, cap: int) -> tuple[Lora, int, dict[str, Fit]]:
    """Every module at one served rank ``<= cap``: exact (padded) where it fits, truncated where not.

    Returns the fitted LoRA, its rank (the smallest served rank holding every module's
    ``min(rank, cap)``), and each module's :class:`Fit`. Modules of one shape (a kind of layer in every
    block) are factorised together, as one batch.
    """
    rank = served_rank(max((p.A.shape[0] for p in lora.values()), default=1), cap)
    out, fits = {}, {}
    groups: dict[tuple, list[str]] = {}
    for name, pair in lora.items():
        if pair.A.shape[0] <= rank:
            out[name], fits[name] = pad(pair, rank), Fit(pair.A.shape[0], 1.0, 0.0)
        else:
            groups.setdefault((tuple(pair.A.shape), tuple(pair.B.shape)), []).append(name)
    for names in groups.values():
        A, B, kept, err = _truncate_many(torch.stack([lora[n].A for n in names]),
                                         torch.stack([lora[n].B for n in names]), rank)
        for i, name in enumerate(names):
            out[name], fits[name] = LoraPair(A[i], B[i]), Fit(lora[name].A.shape[0], kept[i], err[i])
    return {name: out[name] for name in lora}, rank, fits


def update_error(fitted: LoraPair, exact: LoraPair) -> float:
    """``||B' A' - B A||_F / ||B A||_F``, from the factors (for tests and checks; forms both updates)."""
    want = exact.B.double() @ exact.A.double()
    got = fitted.B.double() @ fitted.A.double()
    norm = float(torch.linalg.matrix_norm(want))
    return float(torch.linalg.matrix_norm(got - want)) / norm if norm > 0 else 0.0
