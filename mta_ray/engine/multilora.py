"""A linear layer that serves S user slots at once.

Each wrapped linear keeps the frozen base weight (shared by all users) and, per
slot, a frozen merged branch (rank R, may be 0) and a trainable stacked branch
(rank r). Every row of the batch is computed with its own slot's factors by
batched matmuls; there is no Python loop over users in the forward pass:

    y[n] = W0 x[n] + B_m[s] A_m[s] x[n] + scale * B_a[s] A_a[s] x[n],   s = rows[n]

Trainable factors are kept in float32 (the optimizer's master copy) and cast
to the activations' dtype for compute, as PEFT does for bf16 models.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mta_ray.core.lora import Lora, LoraPair, adapts_all_linear

# Autograd adds each factor's gradient in place into its view of the flat gradient (FlatFactors); a
# strided view cannot meet autograd's gradient "layout contract", which costs only the speed of that add.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")


class SlotRouter:
    """Which slot each batch row uses; one router is shared by every layer of a model."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # (N,) long, or None = base model only


class MultiSlotLinear(nn.Module):
    def __init__(self, base: nn.Linear, router: SlotRouter, slots: int, rank: int,
                 merged_rank: int = 0, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.router = router
        self.scale = scale
        self.dropout = dropout
        dev = base.weight.device
        out_f, in_f = base.out_features, base.in_features
        # rank 0: a layer that carries only the merged branch (the bank adapts more modules than the
        # stacked adapter); its empty factors take no part in training.
        self.lora_A = nn.Parameter(torch.zeros(slots, rank, in_f, device=dev), requires_grad=rank > 0)  # (S, r, in)
        self.lora_B = nn.Parameter(torch.zeros(slots, out_f, rank, device=dev), requires_grad=rank > 0)  # (S, out, r)
        dt = base.weight.dtype
        self.register_buffer("merged_A", torch.zeros(slots, merged_rank, in_f, device=dev, dtype=dt),
                             persistent=False)                                      # (S, R, in)
        self.register_buffer("merged_B", torch.zeros(slots, out_f, merged_rank, device=dev, dtype=dt),
                             persistent=False)                                      # (S, out, R)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.router.rows
        if rows is None:
            return y
        squeeze = x.dim() == 2
        if squeeze:
            x, y = x.unsqueeze(1), y.unsqueeze(1)
        A = self.lora_A.to(x.dtype)                                                 # (S, r, in)
        B = self.lora_B.to(x.dtype) * self.scale                                    # (S, out, r)
        if A.shape[1] and self.dropout > 0 and torch.is_grad_enabled():
            # dropout on the trainable branch's input only; the merged branch then sees x itself
            h = torch.bmm(F.dropout(x, self.dropout, training=True), A.index_select(0, rows).transpose(1, 2))
            y = y + torch.bmm(h, B.index_select(0, rows).transpose(1, 2))
            A, B = self.merged_A, self.merged_B
        elif not A.shape[1]:  # a merged branch only (a module of the bank's, not of the stacked adapter)
            A, B = self.merged_A, self.merged_B
        elif self.merged_A.shape[1]:  # one pass over x for both branches
            A = torch.cat([self.merged_A, A], dim=1)                                # (S, R+r, in)
            B = torch.cat([self.merged_B, B], dim=2)                                # (S, out, R+r)
        if A.shape[1]:
            h = torch.bmm(x, A.index_select(0, rows).transpose(1, 2))              # (N, T, R+r)
            y = torch.baddbmm(y, h, B.index_select(0, rows).transpose(1, 2))       # (N, T, out)
        return y.squeeze(1) if squeeze else y


def target_module_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Paths of the linear layers to adapt: by last name, or ``all-linear`` (all but the LM head)."""
    targets = list(targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if adapts_all_linear(targets) or name.rsplit(".", 1)[-1] in targets:
            names.append(name)
    if not names:
        raise ValueError(f"no linear layers match target_modules={targets}")
    return names


def inject(model: nn.Module, targets: Iterable[str], slots: int, rank: int, merged_rank: int = 0,
           scale: float = 1.0, dropout: float = 0.0,
           merged_targets: Iterable[str] | None = None) -> tuple[SlotRouter, dict[str, MultiSlotLinear]]:
    """Replace the target linears of ``model`` in place by :class:`MultiSlotLinear` layers.

    ``targets``: the modules of the trainable (stacked) branch; ``merged_targets``: those of the frozen
    merged branch (default: the same). The merged LoRA covers the bank's modules and the stacked adapter
    its own, which may differ: layers get rank 0 for a branch they do not carry.
    """
    router = SlotRouter()
    layers = {}
    trainable = set(target_module_names(model, targets))
    merged: set[str] = set()
    if merged_rank:
        merged = set(target_module_names(model, merged_targets)) if merged_targets is not None else trainable
    for name in [n for n, m in model.named_modules() if n in trainable | merged]:  # model order
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MultiSlotLinear(getattr(parent, child), router, slots, rank if name in trainable else 0,
                                merged_rank if name in merged else 0, scale, dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    return router, layers


def restore(model: nn.Module, layers: dict[str, MultiSlotLinear]) -> None:
    """Undo :func:`inject`: put the plain base linears back."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)


class FlatFactors:
    """Every layer's trainable factors as views of one slot-major (S, P) float32 tensor, their gradients
    as views of another.

    A per-slot optimizer then updates the slots that step with a handful of kernels over (k, P) rows
    instead of a dozen per factor tensor (an 8B model with all seven linears adapted has 448 of them,
    and launching their kernels one by one kept the GPU waiting on the host). Autograd adds each
    factor's gradient into its view in place: the views are set as ``.grad`` before any backward.
    """

    def __init__(self, layers: dict[str, MultiSlotLinear]):
        layers = {name: layer for name, layer in layers.items() if layer.lora_A.shape[1]}  # merged-only: none
        params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
        slots, device = params[0].shape[0], params[0].device
        sizes = [p[0].numel() for p in params]
        self.data = torch.empty(slots, sum(sizes), device=device)
        self.grad = torch.zeros_like(self.data)
        self.spans: list[tuple[int, int, torch.Size]] = []
        """(start, end, per-slot shape) of each factor in a slot's row, layer by layer, A then B."""
        start = 0
        with torch.no_grad():
            for p, n in zip(params, sizes):
                view = self.data[:, start:start + n].view(p.shape)
                view.copy_(p.data)
                p.data = view
                p.grad = self.grad[:, start:start + n].view(p.shape)
                self.spans.append((start, start + n, p.shape[1:]))
                start += n
        self.layers = layers

    def init_row(self, generator: torch.Generator) -> torch.Tensor:
        """A slot's row (P,) on the host with PEFT's default init: A ~ kaiming-uniform(a=sqrt(5)),
        B = 0 (training starts at the base); loading a slot is then one copy, not one per layer."""
        row = torch.zeros(self.data.shape[1])
        for a0, a1, shape in self.spans[::2]:  # the A factors, (r, fan_in) each
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_ with a=sqrt(5)
            row[a0:a1].view(shape).uniform_(-bound, bound, generator=generator)
        return row

    def unpack(self, row: torch.Tensor, fold_scale: bool = True) -> Lora:
        """A slot's row (P,), e.g. copied to the host, as a Lora (scaling folded into B)."""
        out = {}
        for k, (name, layer) in enumerate(self.layers.items()):
            (a0, a1, a_shape), (b0, b1, b_shape) = self.spans[2 * k], self.spans[2 * k + 1]
            s = layer.scale if fold_scale else 1.0
            out[name] = LoraPair(row[a0:a1].view(a_shape).clone(), row[b0:b1].view(b_shape) * s)
        return out


# --------------------------------------------------------------------------- slot I/O

def _write_slot(A_all: torch.Tensor, B_all: torch.Tensor, slot: int, pair: LoraPair | None) -> None:
    """Put one (A, B) pair into a slot of (S, r, in) / (S, out, r) storage, zero-padding the rank."""
    A_all[slot].zero_()
    B_all[slot].zero_()
    if pair is None:
        return
    A, B = pair
    k = A.shape[0]
    if k > A_all.shape[1]:
        raise ValueError(f"adapter rank {k} exceeds the layer's capacity {A_all.shape[1]}")
    A_all[slot, :k].copy_(A, non_blocking=A.is_pinned())  # pinned: the host does not wait for the GPU
    B_all[slot, :, :k].copy_(B, non_blocking=B.is_pinned())


@torch.no_grad()
def set_merged(layers: dict[str, MultiSlotLinear], slot: int, lora: Lora | None) -> None:
    """Load a frozen merged LoRA (scaling folded in B) into one slot; None clears it.

    Every module of the LoRA must have a merged branch here: a module left out would silently change
    the user's model (the merged branch must cover all of the bank's modules).
    """
    missing = sorted(set(lora or {}) - {n for n, layer in layers.items() if layer.merged_A.shape[1]})
    if missing:
        raise ValueError(f"the merged LoRA adapts {len(missing)} module(s) with no merged branch here, "
                         f"e.g. {missing[0]}: inject with the bank's target modules as merged_targets")
    for name, layer in layers.items():
        _write_slot(layer.merged_A, layer.merged_B, slot, lora.get(name) if lora else None)


@torch.no_grad()
def set_stacked(layers: dict[str, MultiSlotLinear], slot: int, raw: Lora) -> None:
    """Load raw (unscaled) trainable factors into one slot; modules it lacks get zeros."""
    missing = sorted(set(raw) - {n for n, layer in layers.items() if layer.lora_A.shape[1]})
    if missing:
        raise ValueError(f"the stacked adapter adapts {len(missing)} module(s) with no trainable branch "
                         f"here, e.g. {missing[0]}")
    for name, layer in layers.items():
        _write_slot(layer.lora_A, layer.lora_B, slot, raw.get(name))
