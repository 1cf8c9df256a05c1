"""The multi-slot LoRA path against the formula it computes, values and gradients.

Reference, row by row: y[n] = W x[n] + b + B_m[s] A_m[s] x[n] + scale * B_a[s] A_a[s] x[n], s = rows[n].
The engine computes siblings that read one input together (one GEMM, one down-projection, a block-
diagonal up-projection added in place), and per slot rather than per row when rows come in equal runs.
"""

import pytest
import torch

from mta_ray.engine import lora_kernels
from mta_ray.engine.lora_kernels import lora_ops
from mta_ray.engine.multilora import (SlotRouter, _concatenated, equal_runs, inject, restore, set_merged, set_stacked,
                                      slot_linear, slot_linear_backward, target_module_names)
from tests.tiny import random_lora, tiny_llama, tiny_qwen2

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
KERNELS = ["bmm", "triton"]
"""How the LoRA branches are computed (``lora_kernel``): every path below must hold with each."""


def _skip_unless_runs(kernel, device="cpu"):
    if kernel == "triton" and not lora_kernels.runs_on(device):
        pytest.skip(f"the Triton kernels do not run on {device} here (triton missing, or its interpreter too old)")


def _reference(x, rows, W, b, A, B):
    """Per row, one slot's factors: the formula, one matrix-vector product at a time."""
    out = []
    for n, s in enumerate(rows.tolist()):
        y = x[n] @ W.T + (b if b is not None else 0)
        out.append(y + (x[n] @ A[s].T) @ B[s].T)
    return torch.stack(out)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(4))
def test_slot_linear_matches_the_formula_with_its_gradients(device, seed, kernel):
    """Random shapes; runs of equal length (some slots hold no row) and the same rows routed row by row."""
    _skip_unless_runs(kernel, device)
    g = torch.Generator().manual_seed(seed)
    S, per_run, T, d_in, d_out, K = 5, int(torch.randint(1, 4, (1,), generator=g)), 7, 24, 40, 6
    slots_used = torch.randperm(S, generator=g)[:3]                      # two slots have no rows
    rows = slots_used.repeat_interleave(per_run)
    x = torch.randn(len(rows), T, d_in, generator=g, dtype=torch.float64)
    W, b = torch.randn(d_out, d_in, generator=g, dtype=torch.float64), torch.randn(d_out, generator=g, dtype=torch.float64)
    A, B = torch.randn(S, K, d_in, generator=g, dtype=torch.float64), torch.randn(S, d_out, K, generator=g, dtype=torch.float64)
    x, W, b, A, B, rows = (t.to(device) for t in (x, W, b, A, B, rows))
    dy = torch.randn(len(rows), T, d_out, generator=g, dtype=torch.float64).to(device)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        y = fn(*leaves)
        y.backward(dy)
        return y.detach(), [t.grad for t in leaves]

    want, want_grads = grads(lambda x, A, B: _reference(x, rows, W, b, A, B))
    runs, length = equal_runs(rows.tolist())
    assert length == per_run and runs == slots_used.tolist()
    for router_runs in (torch.tensor(runs, device=device), None):
        router = SlotRouter()
        router.route(rows, router_runs, length)
        router.ops = lora_ops(kernel)
        got, got_grads = grads(lambda x, A, B: slot_linear(x, W, b, A, B, router))
        assert torch.allclose(got, want, atol=1e-10)
        for g_got, g_want in zip(got_grads, want_grads):
            assert torch.allclose(g_got, g_want, atol=1e-10)
        assert got_grads[1][[s for s in range(S) if s not in runs]].abs().sum() == 0  # empty slots: no gradient


def test_equal_runs_finds_the_per_slot_layout_or_declines():
    assert equal_runs([3, 3, 0, 0, 2, 2]) == ([3, 0, 2], 2)
    assert equal_runs([4]) == ([4], 1)
    assert equal_runs([1, 1, 0]) is None        # a run of 2 beside a run of 1: rows are gathered one by one
    assert equal_runs([1, 0, 1]) == ([1, 0, 1], 1)


def _loaded(factory, slots, shared_inputs, targets=("all-linear",)):
    """A float64 model (so that two summation orders agree to ~1e-12) with random factors in every slot."""
    model = factory().double()
    names = target_module_names(model, ["all-linear"])
    stacked_names = target_module_names(model, list(targets))
    router, layers = inject(model, list(targets), slots=slots, rank=2, merged_rank=4, scale=2.0,
                            merged_targets=["all-linear"], shared_inputs=shared_inputs)
    for s in range(slots):
        set_merged(layers, s, random_lora(model, names, 4, s))
        set_stacked(layers, s, random_lora(model, stacked_names, 2, 50 + s, scale=0.3))
    return model, router, layers


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2])       # Qwen2: q/k/v carry biases
@pytest.mark.parametrize("targets", [("all-linear",), ("q_proj", "v_proj")])
def test_shared_inputs_compute_what_separate_linears_compute(factory, targets):
    """q/k/v and gate/up computed together give the logits and factor gradients of one linear at a time,
    with k left out of the stacked adapter too; restore leaves a model that computes as before."""
    ids = torch.randint(0, 96, (4, 6))
    rows = torch.tensor([2, 2, 0, 0])
    out = {}
    for shared in (False, True):
        model, router, layers = _loaded(factory, 3, shared, targets)
        groups = {id(layer.shared) for layer in layers.values() if layer.shared is not None}
        assert len(groups) == (4 if shared else 0)                         # 2 decoder layers x (qkv, gate/up)
        router.route(rows, torch.tensor([2, 0]) if shared else None, 2)
        logits = model(ids).logits
        logits.square().sum().backward()
        out[shared] = logits.detach(), {n: l.lora_A.grad.clone() for n, l in layers.items() if l.lora_A.shape[1]}
        restore(model, layers)
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, factory().double()(ids).logits, atol=1e-10)
    assert torch.allclose(out[True][0], out[False][0], atol=1e-10)
    for name, grad in out[False][1].items():
        assert torch.allclose(out[True][1][name], grad, rtol=1e-9, atol=1e-10), name


def test_concatenated_weights_become_views_and_are_reused():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    before = [attn.q_proj.weight.clone(), attn.k_proj.weight.clone(), attn.v_proj.weight.clone()]
    whole = _concatenated([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(whole, torch.cat(before))
    assert attn.k_proj.weight.data_ptr() == whole.data_ptr() + before[0].numel() * whole.element_size()
    again = _concatenated([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert again.data_ptr() == whole.data_ptr()                             # back to back already: no copy


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seed", range(3))
def test_hand_written_backward_matches_autograd(seed, kernel):
    """``slot_linear_backward`` (used where the input is recomputed, not kept) against autograd."""
    _skip_unless_runs(kernel)
    g = torch.Generator().manual_seed(seed)
    S, T, d_in, d_out, K = 4, 5, 16, 12, 3
    rows = torch.tensor([1, 1, 3, 3]) if seed else torch.tensor([2, 0, 2])
    x = torch.randn(len(rows), T, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    A = torch.randn(S, K, d_in, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(S, d_out, K, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(len(rows), T, d_out, generator=g, dtype=torch.float64)
    router = SlotRouter()
    runs = equal_runs(rows.tolist())
    router.route(rows, torch.tensor(runs[0]) if runs else None, runs[1] if runs else 0)
    router.ops = lora_ops(kernel)
    slot_linear(x, W, None, A, B, router).backward(dy)
    dx, dA, dB = slot_linear_backward(dy, x.detach(), W, A.detach(), B.detach(), router)
    for got, want in ((dx, x.grad), (dA, A.grad), (dB, B.grad)):
        assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("targets,compiled,checkpointing", [
    (("all-linear",), False, False), (("q_proj", "v_proj"), False, False), (("all-linear",), False, True),
    pytest.param(("all-linear",), True, False, marks=pytest.mark.slow)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_gated_mlp_keeps_logits_and_gradients(targets, compiled, checkpointing, kernel, monkeypatch):
    """The fused model (gate/up as one GEMM; the down projection's input and the normed inputs of q/k/v
    and gate/up recomputed in backward, not kept) computes the logits and factor gradients of the plain
    multi-slot model, eager or compiled (as on a GPU), with activation checkpointing too (the recomputed
    inputs are saved tensors, which checkpointing drops and restores)."""
    from mta_ray.engine import multilora
    from mta_ray.engine.fused import GatedDown, apply_fused

    _skip_unless_runs(kernel)
    calls = []   # the kernels must really run on the Triton path (a lost router.ops would pass otherwise)
    for name in ("down", "up_add_", "up"):
        original = getattr(lora_kernels, name)
        monkeypatch.setattr(lora_kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    recomputed = []
    for fn in (multilora._RecomputedDown, GatedDown):
        original = fn.backward
        monkeypatch.setattr(fn, "backward", staticmethod(
            lambda ctx, *g, _f=original, _n=fn.__name__: recomputed.append(_n) or _f(ctx, *g)))
    ids = torch.randint(0, 96, (4, 6))
    out = {}
    for fused in (False, True):
        model, router, layers = _loaded(tiny_llama, 3, True, targets)
        undo = apply_fused(model, compile=compiled) if fused else None
        if checkpointing:
            model.train()  # transformers checkpoints only in training mode (the tiny models have no dropout)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        router.route(torch.tensor([2, 2, 0, 0]), torch.tensor([2, 0]), 2)
        router.ops = lora_ops(kernel if fused else "bmm")   # the plain model on the reference path
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        logits.square().sum().backward()
        out[fused] = logits.detach(), emb.grad, {n: (l.lora_A.grad.clone(), l.lora_B.grad.clone())
                                                 for n, l in layers.items() if l.lora_A.shape[1]}
        if undo:
            undo()
    # compiled: the norms run in float32 (as transformers') in their own summation order
    rel = 1e-5 if compiled else 1e-12

    def close(got, want):
        return float((got - want).norm() / want.norm()) < rel

    # 2 decoder layers: q/k/v and gate/up (where trained) from the norm's input, down from gate/up (it always
    # carries the merged branch here)
    want = {"_RecomputedDown": 4 if targets == ("all-linear",) else 2, "GatedDown": 2}
    assert {n: recomputed.count(n) for n in want} == want
    assert (set(calls) == {"down", "up_add_", "up"}) if kernel == "triton" else not calls
    assert close(out[True][0], out[False][0]) and close(out[True][1], out[False][1])
    for name, (dA, dB) in out[False][2].items():
        assert close(out[True][2][name][0], dA) and close(out[True][2][name][1], dB), name
