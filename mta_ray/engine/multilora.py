"""A linear layer that serves S user slots at once.

Each wrapped linear keeps the frozen base weight (shared by all users) and, per
slot, a frozen merged branch (rank R, may be 0) and a trainable stacked branch
(rank r). Every row of the batch is computed with its own slot's factors by
batched matmuls; there is no Python loop over users in the forward pass:

    y[n] = W0 x[n] + B_m[s] A_m[s] x[n] + scale * B_a[s] A_a[s] x[n],   s = rows[n]

Linears that read the same input (q/k/v, gate/up) form a :class:`SharedInput`:
one GEMM over their concatenated base weights, one down-projection with all
their branches' A factors (merged and trainable, every member), one up-projection
with a block-diagonal B added in place into that GEMM's output. When the batch is
runs of equal length, one run per slot (the trainer's layout), the factors are
taken per slot, not per row: each slot's rows are one long matrix, so nothing is
gathered or scattered per row and a factor's gradient is one batched matmul.

Trainable factors are kept in float32 (the optimizer's master copy) and cast
to the activations' dtype for compute, as PEFT does for bf16 models.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mta_ray.core.lora import Lora, LoraPair, adapts_all_linear
from mta_ray.engine.lora_kernels import BMM_OPS, BranchOps

# Autograd adds each factor's gradient in place into its view of the flat gradient (FlatFactors); a
# strided view cannot meet autograd's gradient "layout contract", which costs only the speed of that add.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linears that Llama-family decoders call on the very same input tensor."""


class SlotRouter:
    """Which slot each batch row uses; one router is shared by every layer of a model."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None  # (N,) long, or None = base model only
        self.runs: torch.Tensor | None = None  # (G,) slot of each run when rows are G equal runs, else None
        self.per_run = 0                       # rows in each run
        self.ops: BranchOps = BMM_OPS          # how the LoRA branches are computed (see lora_ops)

    def route(self, rows: torch.Tensor | None, runs: torch.Tensor | None = None, per_run: int = 0) -> None:
        """Route rows to slots; ``runs``/``per_run``: the same rows as ``len(runs)`` consecutive runs of
        ``per_run`` rows (see :func:`equal_runs`), which lets layers take factors per slot."""
        self.rows, self.runs, self.per_run = rows, runs, per_run if runs is not None else 0


def equal_runs(rows: Sequence[int]) -> tuple[list[int], int] | None:
    """``rows`` as consecutive runs of one slot each, all of one length: (slot of each run, run length);
    None when they are not (then layers gather factors row by row)."""
    runs: list[list[int]] = []
    for s in rows:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    lengths = {n for _, n in runs}
    if len(lengths) != 1:
        return None
    return [s for s, _ in runs], lengths.pop()


def _per_slot(x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor, router: SlotRouter):
    """(x as G matrices, each group's A and B, index of each group's slot): G = runs (per slot) or rows."""
    N, T = x3.shape[:2]
    if router.runs is not None and router.runs.shape[0] * router.per_run == N:
        G = router.runs.shape[0]
        return x3.reshape(G, N // G * T, -1), A.index_select(0, router.runs), B.index_select(0, router.runs), router.runs
    return x3, A.index_select(0, router.rows), B.index_select(0, router.rows), router.rows


def slot_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, router: SlotRouter) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` plus, for row n of slot s, ``B[s] A[s] x[n]``; A (S, K, in), B (S, out, K).

    The update goes into the GEMM's output in place (no full-width temporary); with equal runs each slot's
    rows are one (rows x tokens, in) matrix and factors are indexed per slot, not per row.
    """
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(1) if squeeze else x                                           # (N, T, in)
    xs, A, B, _ = _per_slot(x3, A, B, router)
    y = F.linear(xs, weight, bias)
    if A.shape[1]:
        ops = router.ops
        recompute = getattr(x, RECOMPUTE, None)
        if recompute is not None and torch.is_grad_enabled() and A.requires_grad:
            h = _RecomputedDown.apply(xs, A, ops, *recompute)                       # (G, p*T, K)
        else:
            h = ops.down(xs, A)
        y = ops.up_add_(y, h, B)
    y = y.reshape(*x3.shape[:2], -1)
    return y.squeeze(1) if squeeze else y


RECOMPUTE = "_mta_recompute"
"""Attribute of an activation that can be recomputed from tensors autograd keeps anyway: ``(fn, *args)``
with ``fn(*args)`` the activation, tensors first. A normed input carries it (``fused.FusedRMSNorm``), so
the down-projection keeps the norm's input rather than its output."""


class _RecomputedDown(torch.autograd.Function):
    """``h = x A^T`` (batched) keeping, for A's gradient, not x but what recomputes it: the normed input of
    q/k/v and of gate/up is recomputed from the norm's own input, and two hidden-width activations per layer
    are no longer held. Those inputs are saved with ``save_for_backward``, so activation checkpointing frees
    and restores them like any other saved tensor."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, A: torch.Tensor, ops: "BranchOps", fn: Callable, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(A, *tensors)
        ctx.ops, ctx.fn, ctx.shape = ops, fn, xs.shape
        ctx.rest = args[len(tensors):]
        return ops.down(xs, A)

    @staticmethod
    def backward(ctx, dh):
        A, *tensors = ctx.saved_tensors
        dx = ctx.ops.up(dh, A.transpose(1, 2)) if ctx.needs_input_grad[0] else None   # dh A
        with torch.no_grad():
            xs = ctx.fn(*tensors, *ctx.rest).reshape(ctx.shape)
        return (dx, torch.bmm(dh.transpose(1, 2), xs), None, None, *[None] * (len(tensors) + len(ctx.rest)))


def slot_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor,
                         B: torch.Tensor, router: SlotRouter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx, dA, dB) of :func:`slot_linear` (3-d x) for output gradient ``dy``, by hand: for a
    caller that recomputes ``x`` in its backward instead of keeping it (see ``fused.GatedDown``)."""
    xs, As, Bs, index = _per_slot(x, A, B, router)
    dys = dy.reshape(xs.shape[0], xs.shape[1], -1)
    dx = torch.matmul(dys, weight)                                                  # (G, p*T, in)
    dA, dB = torch.zeros_like(A), torch.zeros_like(B)
    if As.shape[1]:
        ops = router.ops
        h = ops.down(xs, As)
        dh = ops.down(dys, Bs.transpose(1, 2))                                      # dys Bs: (G, p*T, K)
        ops.up_add_(dx, dh, As.transpose(1, 2))                                     # dx += dh As
        dA.index_add_(0, index, torch.bmm(dh.transpose(1, 2), xs))
        dB.index_add_(0, index, torch.bmm(dys.transpose(1, 2), h))
    return dx.reshape(x.shape), dA, dB


class _SplitLast(torch.autograd.Function):
    """A tensor's last-dimension blocks as tensors of their own; their gradients come back as one
    concatenation (not one zero-padded full-width gradient per block summed, as slicing would give).

    Copies, not views: attention keeps v for backward, and a view would keep all of q/k/v alive with it.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, sizes: tuple[int, ...]):
        ctx.sizes = sizes
        return tuple(part.contiguous() for part in y.split(sizes, dim=-1))

    @staticmethod
    def backward(ctx, *grads):
        return torch.cat(_zeros_for_missing(grads, ctx.sizes), dim=-1), None


def _zeros_for_missing(grads: Sequence[torch.Tensor | None], widths: Sequence[int]) -> list[torch.Tensor]:
    """Gradients of outputs split along the last dimension, zeros (of that output's width) for those no
    later op used; at least one is present (autograd calls backward only then)."""
    like = next(g for g in grads if g is not None)
    return [g if g is not None else like.new_zeros(*like.shape[:-1], n) for g, n in zip(grads, widths)]


class MultiSlotLinear(nn.Module):
    def __init__(self, base: nn.Linear, router: SlotRouter, slots: int, rank: int,
                 merged_rank: int = 0, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.router = router
        self.scale = scale
        self.dropout = dropout
        self.shared: SharedInput | None = None
        """The group of linears reading this one's input, when it has one (set by :func:`inject`)."""
        self.bound: tuple[torch.Tensor, torch.Tensor] | None = None
        """This pass's trainable factors in compute dtype, views of one cast of every layer's (FlatFactors.bind)."""
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

    @property
    def rank(self) -> int:
        """Columns of both branches together."""
        return self.merged_A.shape[1] + self.lora_A.shape[1]

    def branches(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The branches this layer carries, merged first: (A (S, k, in), B (S, out, k)), the trainable one
        in ``dtype`` with the scale in B (the empty merged one when it carries none)."""
        parts = [(self.merged_A, self.merged_B)] if self.merged_A.shape[1] or not self.lora_A.shape[1] else []
        if self.lora_A.shape[1]:
            a, b = self._trainable(dtype)
            parts.append((a, b * self.scale))
        return parts

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches as one: A (S, R+r, in) and B (S, out, R+r) in ``dtype``, the scale in B."""
        parts = self.branches(dtype)
        if len(parts) == 1:
            return parts[0]
        return torch.cat([a for a, _ in parts], dim=1), torch.cat([b for _, b in parts], dim=2)

    def _trainable(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable factors (A, B) in ``dtype``: this pass's bound views when they are of that dtype
        (under autocast or with some linears kept in float32 they may not be), else a cast of the layer's."""
        if self.bound is not None and self.bound[0].dtype == dtype:
            return self.bound
        return self.lora_A.to(dtype), self.lora_B.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.output(self, x)
        if self.router.rows is None:
            return self.base(x)
        if self.dropout > 0 and self.lora_A.shape[1] and torch.is_grad_enabled():
            return self._forward_with_dropout(x)
        A, B = self.factors(x.dtype)
        return slot_linear(x, self.base.weight, self.base.bias, A, B, self.router)

    def _forward_with_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on the trainable branch's input only (as PEFT); the merged branch sees x itself."""
        rows = self.router.rows
        squeeze = x.dim() == 2
        x3 = x.unsqueeze(1) if squeeze else x
        a, b = self._trainable(x.dtype)
        A, B = a.index_select(0, rows), (b * self.scale).index_select(0, rows)
        y = slot_linear(x3, self.base.weight, self.base.bias, self.merged_A, self.merged_B, self.router)
        h = torch.bmm(F.dropout(x3, self.dropout, training=True), A.transpose(1, 2))
        y = torch.baddbmm(y, h, B.transpose(1, 2))
        return y.squeeze(1) if squeeze else y


class SharedInput:
    """Sibling linears called on the same input tensor (q/k/v; gate/up), computed together on the first
    member's call: one GEMM over their concatenated weights (the members' weights become views of it),
    one down-projection with all their A factors, one in-place up-projection with a block-diagonal B.
    The other members' calls with that same tensor take their slice of the result.

    The concatenation is taken once, at :func:`inject`: moving or re-casting the model while layers are
    injected would leave it behind (the trainer never does; restore first). After :func:`restore` the
    members' weights stay views of one storage (``safetensors.save_file`` of a raw state dict refuses
    shared tensors; ``save_pretrained`` handles them)."""

    def __init__(self, members: list[MultiSlotLinear]):
        self.members = members
        self.sizes = tuple(m.out_features for m in members)
        self.weight = _concatenated([m.base.weight for m in members])
        biases = [m.base.bias for m in members]
        self.bias = _concatenated(biases) if all(b is not None for b in biases) else None
        if any(b is not None for b in biases) and self.bias is None:
            raise ValueError("linears sharing an input must all have a bias or none")
        self._x: torch.Tensor | None = None
        self._outputs: dict[int, torch.Tensor] = {}

    def output(self, member: MultiSlotLinear, x: torch.Tensor) -> torch.Tensor:
        k = self.members.index(member)
        if self._x is not x or k not in self._outputs:
            parts = _SplitLast.apply(self._compute(x), self.sizes)
            self._x, self._outputs = x, dict(enumerate(parts))
        out = self._outputs.pop(k)
        if not self._outputs:
            self._x = None  # all taken: hold no activations between calls
        return out

    def clear(self) -> None:
        """Drop outputs not yet taken (a pass that ended early, or a member not called with this input)."""
        self._x, self._outputs = None, {}

    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's output, concatenated along the last dimension (for a caller that takes them
        together, like the fused gated MLP)."""
        return self._compute(x)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        router = self.members[0].router
        if router.rows is None:
            return F.linear(x, self.weight, self.bias)
        A, B = self.factors(x.dtype)
        return slot_linear(x, self.weight, self.bias, A, B, router)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A (S, K, in): every member's branches side by side; B (S, sum out, K) block-diagonal. Each
        branch is copied once, straight into place (not first joined per member)."""
        per_member = [m.branches(dtype) for m in self.members]
        A = torch.cat([a for parts in per_member for a, _ in parts], dim=1)
        B = A.new_zeros(A.shape[0], sum(self.sizes), A.shape[1])
        o = k = 0
        for parts, n in zip(per_member, self.sizes):
            for _, b in parts:
                B[:, o:o + n, k:k + b.shape[2]] = b
                k += b.shape[2]
            o += n
        return A, B


def _concatenated(params: list[torch.Tensor]) -> torch.Tensor:
    """The parameters stacked along dim 0 as one tensor, the parameters made views of it (no copy when
    they already lie back to back in one storage, as after an earlier :func:`inject`)."""
    first = params[0]
    shape = (sum(p.shape[0] for p in params), *first.shape[1:])
    ptr, contiguous = first.data_ptr(), True
    for p in params:
        contiguous &= p.is_contiguous() and p.data_ptr() == ptr and p.dtype == first.dtype
        ptr += p.numel() * p.element_size()
    if contiguous and all(p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for p in params):
        return torch.as_strided(first.data, shape, first.stride())
    whole = torch.cat([p.data for p in params], dim=0)
    start = 0
    for p in params:
        p.data = whole[start:start + p.shape[0]]
        start += p.shape[0]
    return whole


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
           scale: float = 1.0, dropout: float = 0.0, merged_targets: Iterable[str] | None = None,
           shared_inputs: bool = True) -> tuple[SlotRouter, dict[str, MultiSlotLinear]]:
    """Replace the target linears of ``model`` in place by :class:`MultiSlotLinear` layers.

    ``targets``: the modules of the trainable (stacked) branch; ``merged_targets``: those of the frozen
    merged branch (default: the same). The merged LoRA covers the bank's modules and the stacked adapter
    its own, which may differ: layers get rank 0 for a branch they do not carry.

    ``shared_inputs`` (without dropout): siblings that read one input (:data:`SHARED_INPUTS`) are
    computed together (:class:`SharedInput`), a sibling no branch targets included (both ranks 0).
    """
    router = SlotRouter()
    trainable = set(target_module_names(model, targets))
    merged: set[str] = set()
    if merged_rank:
        merged = set(target_module_names(model, merged_targets)) if merged_targets is not None else trainable
    groups = _shared_input_groups(model, trainable | merged) if shared_inputs and not dropout else []
    wrapped = trainable | merged | {name for group in groups for name in group}
    layers = {}
    for name in [n for n, _ in model.named_modules() if n in wrapped]:  # model order
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MultiSlotLinear(getattr(parent, child), router, slots, rank if name in trainable else 0,
                                merged_rank if name in merged else 0, scale, dropout)
        setattr(parent, child, layer)
        layers[name] = layer
    for group in groups:
        shared = SharedInput([layers[name] for name in group])
        for name in group:
            layers[name].shared = shared
    return router, layers


def _shared_input_groups(model: nn.Module, adapted: set[str]) -> list[list[str]]:
    """Paths of sibling linears that read one input (:data:`SHARED_INPUTS`), where any of them is adapted
    and all have one input width, dtype and device."""
    groups = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        for names in SHARED_INPUTS:
            linears = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, nn.Linear) for m in linears):
                continue
            paths = [prefix + n for n in names]
            alike = {(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in linears}
            if len(alike) == 1 and adapted & set(paths):
                groups.append(paths)
    return groups


def restore(model: nn.Module, layers: dict[str, MultiSlotLinear]) -> None:
    """Undo :func:`inject`: put the plain base linears back (weights of a shared input stay views of
    their concatenation: same values, and the next inject reuses it without a copy)."""
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
        layer.shared = None


class FlatFactors:
    """Every layer's trainable factors as views of one slot-major (S, P) float32 tensor, their gradients
    as views of another.

    A per-slot optimizer then updates the slots that step with a handful of kernels over (k, P) rows
    instead of a dozen per factor tensor (an 8B model with all seven linears adapted has 448 of them,
    and launching their kernels one by one kept the GPU waiting on the host). Autograd adds each
    factor's gradient into its view in place: the views are set as ``.grad`` before any backward.
    """

    def __init__(self, all_layers: dict[str, MultiSlotLinear]):
        layers = {name: layer for name, layer in all_layers.items() if layer.lora_A.shape[1]}  # merged-only: none
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
        self.all_layers = list(all_layers.values())

    def bind(self, dtype: torch.dtype) -> None:
        """For one forward/backward: every layer computes with views of one cast of the flat factors, whose
        gradient comes back as one (S, P) tensor added once into :attr:`grad` (not a cast and a strided
        gradient add per factor: 448 of each on an 8B model with every linear adapted)."""
        leaf = self.data.detach().requires_grad_()
        leaf.grad = self.grad  # autograd adds into it in place
        views = _FactorViews.apply(leaf, dtype, tuple(self.spans))
        for k, layer in enumerate(self.layers.values()):
            layer.bound = (views[2 * k], views[2 * k + 1])

    def unbind(self) -> None:
        """End of a pass: drop the bound views and any shared-input outputs a member never took."""
        for layer in self.all_layers:
            layer.bound = None
            if layer.shared is not None:
                layer.shared.clear()

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


class _FactorViews(torch.autograd.Function):
    """The flat factors cast once to the compute dtype, as one view per factor; the views' gradients are
    concatenated back into one (S, P) gradient."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, dtype: torch.dtype, spans: tuple):
        ctx.spans, ctx.dtype = spans, flat.dtype
        cast = flat.to(dtype, copy=True)
        return tuple(cast[:, a:b].view(-1, *shape) for a, b, shape in spans)

    @staticmethod
    def backward(ctx, *grads):
        rows = [g.reshape(g.shape[0], -1) if g is not None else None for g in grads]
        parts = _zeros_for_missing(rows, [b - a for a, b, _ in ctx.spans])
        flat = parts[0].new_empty(parts[0].shape[0], ctx.spans[-1][1], dtype=ctx.dtype)
        return torch.cat(parts, dim=1, out=flat), None, None  # cast while concatenating: no bf16 copy


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
