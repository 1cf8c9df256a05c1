"""Storage precision of per-user adapters: symmetric int8 with one scale per rank component.

A stacked adapter is ``B A`` with ``A: (r, in)`` and ``B: (out, r)``. Row ``i`` of ``A`` and column ``i``
of ``B`` form rank component ``i``; each gets its own absmax scale, so the r x (in + out) int8 values
carry 2r scales (kept in bf16). A per-tensor scale would let one large component flatten the others;
a per-output-row scale of ``B`` would cost ``out`` scales, as many as ``B``'s values at rank 1.

``adapt.storage_precision: int8`` makes the adapter store write this (:mod:`mta_ray.files.store`), and
every reader gets the dequantised adapter back; :func:`stored_bytes` is what it writes per user, and the
study measures what it changes in the outputs against the bf16 twin.
"""

from __future__ import annotations

import torch

from mta_ray.core.lora import Lora, LoraPair

SCALE_BYTES = 2
"""Scales are kept in bf16."""
PRECISIONS = ("bfloat16", "int8")


def quantize_int8(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 values and one absmax scale per slice along ``dim`` (the rank components)."""
    other = 1 - dim
    scale = t.float().abs().amax(dim=other, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.bfloat16)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def roundtrip(lora: Lora, precision: str) -> Lora:
    """``lora`` as it reads back after storage in ``precision`` (``bfloat16``: the store's own format)."""
    if precision == "bfloat16":
        return {n: LoraPair(p.A.to(torch.bfloat16).float(), p.B.to(torch.bfloat16).float()) for n, p in lora.items()}
    if precision not in PRECISIONS:
        raise ValueError(f"unknown storage precision {precision!r}; known: {', '.join(PRECISIONS)}")
    out = {}
    for name, p in lora.items():
        A = dequantize_int8(*quantize_int8(p.A, dim=0))   # A: (r, in), one scale per row
        B = dequantize_int8(*quantize_int8(p.B, dim=1))   # B: (out, r), one scale per column
        out[name] = LoraPair(A, B)
    return out


def stored_bytes(params: int, components: int, precision: str) -> int:
    """Bytes of ``params`` adapter values with ``components`` rank components (sum of r over modules)."""
    if precision == "bfloat16":
        return 2 * params
    return params + 2 * components * SCALE_BYTES
