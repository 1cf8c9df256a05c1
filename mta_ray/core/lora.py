"""LoRA math as pure tensor functions: merges, stacking, folding (PEFT's file format: ``files.peft_format``).

A LoRA here is a ``dict`` from a target module's path (e.g.
``model.layers.0.self_attn.q_proj``) to a :class:`LoraPair` ``(A, B)`` with
``A: (r, in)`` and ``B: (out, r)``; the scaling ``alpha / r`` is folded into
``B``, so the weight update is exactly ``B @ A``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class LoraPair(NamedTuple):
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r), scaling folded in


Lora = dict[str, LoraPair]


def scaled(lora: Lora, scale: float) -> Lora:
    """Multiply every update ``B A`` by ``scale`` (folded into B)."""
    return {name: LoraPair(p.A, p.B * scale) for name, p in lora.items()}


def staged(lora: Lora, dtype: torch.dtype, pin: bool) -> Lora:
    """``lora`` in ``dtype`` (pinned when ``pin``): prepared on the host, beside the GPU, so loading it
    into a GPU slot is a plain copy that does not make the host wait."""
    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        return t.pin_memory() if pin else t
    return {name: LoraPair(prep(p.A), prep(p.B)) for name, p in lora.items()}


def delta(pair: LoraPair) -> torch.Tensor:
    """The dense weight update ``B @ A`` (out, in)."""
    return pair.B @ pair.A


def _check_same_modules(loras: Sequence[Lora], weights: Sequence[float]) -> None:
    if len(loras) != len(weights) or not loras:
        raise ValueError(f"need one weight per LoRA, got {len(loras)} LoRAs and {len(weights)} weights")
    names = set(loras[0])
    for lora in loras[1:]:
        if set(lora) != names:
            raise ValueError("LoRAs to merge must adapt the same modules")


def merge_params(loras: Sequence[Lora], weights: Sequence[float]) -> Lora:
    """Parameter-space merge (reference code): ``A = sum w_i A_i``, ``B = sum w_i B_i``.

    Not equal to ``sum w_i B_i A_i``: cross terms ``B_i A_j`` appear.
    """
    _check_same_modules(loras, weights)
    out = {}
    for name in loras[0]:
        out[name] = LoraPair(sum(w * l[name].A for w, l in zip(weights, loras)),
                             sum(w * l[name].B for w, l in zip(weights, loras)))
    return out


def merge_delta(loras: Sequence[Lora], weights: Sequence[float]) -> Lora:
    """Exact merge ``sum w_i B_i A_i`` kept factored: ``B = [w_1 B_1 .. w_K B_K]``, ``A = [A_1; ..; A_K]``.

    The rank is the sum of the ranks (K * r).
    """
    _check_same_modules(loras, weights)
    out = {}
    for name in loras[0]:
        out[name] = LoraPair(torch.cat([l[name].A for l in loras], dim=0),
                             torch.cat([w * l[name].B for w, l in zip(weights, loras)], dim=1))
    return out


def merge(loras: Sequence[Lora], weights: Sequence[float], space: str) -> Lora:
    if space == "params":
        return merge_params(loras, weights)
    if space == "delta":
        return merge_delta(loras, weights)
    raise ValueError(f"unknown merge space {space!r}")


def stack(*loras: Lora) -> Lora:
    """One LoRA whose update is the sum of the given ones' (e.g. merged + stacked), exactly."""
    return merge_delta(list(loras), [1.0] * len(loras))


def fold_into(model: torch.nn.Module, lora: Lora) -> None:
    """Add ``B @ A`` into each target module's weight in place (the paper's W0 + dW)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, pair in lora.items():
            weight = modules[name].weight
            A, B = pair.A.to(weight.device, torch.float32), pair.B.to(weight.device, torch.float32)
            weight += (B @ A).to(weight.dtype)


def rank_of(lora: Lora) -> int:
    return max((p.A.shape[0] for p in lora.values()), default=0)


ALL_LINEAR = "all-linear"


def adapts_all_linear(targets: Sequence[str]) -> bool:
    """``target_modules`` names every linear layer but the LM head (PEFT's ``all-linear``)."""
    return ALL_LINEAR in targets


def peft_target_modules(targets: Sequence[str]) -> str | list[str]:
    """``target_modules`` as PEFT's ``LoraConfig`` takes it: the string ``all-linear`` or a list of names."""
    return ALL_LINEAR if adapts_all_linear(targets) else list(targets)
