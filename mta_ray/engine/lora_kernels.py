"""How the multi-slot LoRA branches are computed: the down-projection and the in-place up-projection, by
torch's batched matmuls (``BranchOps``, the reference) or by Triton kernels (``TritonBranchOps``); the
router carries one (``lora_ops``).

The reference path (``torch.bmm`` / ``baddbmm_``) ran the branches at 14.7% of GPU time on the 8B shape
(``bench/results/profile-llama3-8b-h100-shared-16f.txt``): ``baddbmm_`` averaged 484 us a call, about
twice what streaming its full-width output once in and once out takes at those shapes (an estimate from
the shapes). These kernels are written for the shapes of LoRA branches: the inner dimension of the
up-projection is the branches' rank (20-60; padded to a power of two of at least 16 for ``tl.dot``), so a
program loads its rows' ``h`` and its columns' ``B`` once and streams its tile of ``y`` through; the
down-projection reduces the input width in chunks into a (rows x rank) accumulator. Measured on an H100
(``bench/results/README.md``): on the Llama-3-8B shape +5.8% users/hour in one run, equal in the next;
-8% on SmolLM2-135M; so the trainer's default stays the batched matmuls (``lora_kernel="bmm"``;
``adapt.lora_kernel`` in a run's config).

Shapes follow :func:`mta_ray.engine.multilora.slot_linear`: G groups (slots, or rows), x (G, M, in),
A (G, K, in), h (G, M, K), B (G, out, K); any strides (transposed views are read as they lie).

On CPU the same kernel functions run in Triton's interpreter (how the tests check them without a GPU);
the interpreter's ``tl.dot`` mishandles bfloat16, so there half-precision tiles are multiplied in float32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover - the reference path needs none of this
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    def _up_add(y_ptr, h_ptr, b_ptr, M, N, K, sy_g, sy_m, sy_n, sh_g, sh_m, sh_k, sb_g, sb_n, sb_k,
                ACCUMULATE: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, KP: tl.constexpr):
        """y[g, m, n] (+)= sum_k h[g, m, k] B[g, n, k] for one (BM x BN) tile of y; every (group, tile) is
        one program of a 1-d grid (a grid's second axis stops at 65,535)."""
        n_blocks = (N + BN - 1) // BN
        tiles = (M + BM - 1) // BM * n_blocks
        pid = tl.program_id(0).to(tl.int64)       # int64 offsets throughout: batches past 2**31 elements
        g, t = pid // tiles, pid % tiles
        om = (t // n_blocks) * BM + tl.arange(0, BM)
        on = (t % n_blocks) * BN + tl.arange(0, BN)
        ok = tl.arange(0, KP)
        h = tl.load(h_ptr + g * sh_g + om[:, None] * sh_m + ok[None, :] * sh_k,
                    mask=(om[:, None] < M) & (ok[None, :] < K), other=0.0)
        bt = tl.load(b_ptr + g * sb_g + on[None, :] * sb_n + ok[:, None] * sb_k,
                     mask=(on[None, :] < N) & (ok[:, None] < K), other=0.0)
        # (the same precision choice is spelled out again in _down: a @triton.jit helper would compile, but
        # the interpreter that runs these kernels on CPU cannot call one)
        if DOT_F32:
            h, bt = h.to(tl.float32), bt.to(tl.float32)
        if IEEE:  # float32 tensors: full precision, as torch's matmuls (no TF32)
            acc = tl.dot(h, bt, input_precision="ieee")
        else:
            acc = tl.dot(h, bt)
        mask = (om[:, None] < M) & (on[None, :] < N)
        yp = y_ptr + g * sy_g + om[:, None] * sy_m + on[None, :] * sy_n
        if ACCUMULATE:
            acc += tl.load(yp, mask=mask, other=0.0).to(acc.dtype)
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mask)

    def _down(h_ptr, x_ptr, a_ptr, M, D, K, sh_g, sh_m, sh_k, sx_g, sx_m, sx_d, sa_g, sa_k, sa_d,
              DOT_F32: tl.constexpr, IEEE: tl.constexpr, ACC_F64: tl.constexpr, BM: tl.constexpr,
              BD: tl.constexpr, KP: tl.constexpr):
        """h[g, m, k] = sum_d x[g, m, d] A[g, k, d] for BM rows of one group, reducing d in BD chunks."""
        tiles = (M + BM - 1) // BM
        pid = tl.program_id(0).to(tl.int64)
        g = pid // tiles
        om = (pid % tiles) * BM + tl.arange(0, BM)
        ok = tl.arange(0, KP)
        if ACC_F64:  # float64 tensors keep their precision (the loop-carried type must match the dots')
            acc = tl.full((BM, KP), 0.0, tl.float64)  # (tl.zeros is a jit function the interpreter cannot call)
        else:
            acc = tl.full((BM, KP), 0.0, tl.float32)
        for d0 in range(0, D, BD):
            od = d0 + tl.arange(0, BD).to(tl.int64)
            x = tl.load(x_ptr + g * sx_g + om[:, None] * sx_m + od[None, :] * sx_d,
                        mask=(om[:, None] < M) & (od[None, :] < D), other=0.0)
            at = tl.load(a_ptr + g * sa_g + ok[None, :] * sa_k + od[:, None] * sa_d,
                         mask=(ok[None, :] < K) & (od[:, None] < D), other=0.0)
            if DOT_F32:
                x, at = x.to(tl.float32), at.to(tl.float32)
            if IEEE:
                acc += tl.dot(x, at, input_precision="ieee")
            else:
                acc += tl.dot(x, at)
        tl.store(h_ptr + g * sh_g + om[:, None] * sh_m + ok[None, :] * sh_k, acc.to(h_ptr.dtype.element_ty),
                 mask=(om[:, None] < M) & (ok[None, :] < K))

    _up_add_cuda = triton.autotune(
        [triton.Config({"BM": bm, "BN": bn}, num_warps=w)
         for bm, bn, w in ((64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4), (32, 256, 4))],
        key=["N", "K"], restore_value=["y_ptr"])(triton.jit(_up_add))
    _down_cuda = triton.autotune(
        [triton.Config({"BM": bm, "BD": bd}, num_warps=w)
         for bm, bd, w in ((32, 128, 4), (64, 64, 4), (128, 64, 8), (64, 128, 4))],
        key=["D", "K"])(triton.jit(_down))
    _up_add_cpu, _down_cpu = InterpretedFunction(_up_add), InterpretedFunction(_down)

MAX_RANK = 128
"""Widest branch (summed ranks) a kernel takes in one tile; wider ones go to the batched matmuls (a
256-wide tile already needs most of an H100's shared memory)."""

INTERPRETER_SINCE = (3, 9)
"""Triton's interpreter runs these kernels on CPU from 3.9 on: older ones fail on numpy >= 2.4 (a loop
bound read from a 1-element array) and 3.5 leaves ``triton.language`` patched, breaking later compiles."""


def runs_on(device_type: str) -> bool:
    """Whether the kernels run on tensors of this device type: compiled on CUDA, interpreted on CPU."""
    if triton is None:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    return device_type == "cpu" and version >= INTERPRETER_SINCE


def _half(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


def _padded(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _precision(t: torch.Tensor) -> dict:
    """On CUDA: full-precision dots for float32/64 operands; in the interpreter half-precision tiles are
    multiplied in float32 (its ``tl.dot`` mishandles them)."""
    if t.is_cuda:
        return {"DOT_F32": False, "IEEE": not _half(t)}
    return {"DOT_F32": _half(t), "IEEE": False}


def up_add_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, accumulate: bool = True) -> torch.Tensor:
    """``y += h @ B^T`` per group, in place (``accumulate=False``: ``y = h @ B^T``); returns ``y``."""
    G, M, N = y.shape
    K = h.shape[2]
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y if accumulate else y.zero_()
    if K > MAX_RANK:
        return y.baddbmm_(h, B.transpose(1, 2), beta=1 if accumulate else 0)
    args = (y, h, B, M, N, K, *y.stride(), *h.stride(), *B.stride())
    meta = dict(ACCUMULATE=accumulate, KP=_padded(K), **_precision(h))
    if y.is_cuda:
        _up_add_cuda[lambda c: (G * triton.cdiv(M, c["BM"]) * triton.cdiv(N, c["BN"]),)](*args, **meta)
    else:
        _up_add_cpu[(G * triton.cdiv(M, 32) * triton.cdiv(N, 64),)](*args, BM=32, BN=64, **meta)
    return y


def up(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``h @ B^T`` per group, a new (G, M, out) tensor."""
    return up_add_(h.new_empty(h.shape[0], h.shape[1], B.shape[1]), h, B, accumulate=False)


def down(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x @ A^T`` per group: (G, M, in) x (G, K, in) -> (G, M, K)."""
    G, M, D = x.shape
    K = A.shape[1]
    if K > MAX_RANK:
        return torch.bmm(x, A.transpose(1, 2))
    h = x.new_empty(G, M, K)
    if M == 0 or K == 0:
        return h
    if D == 0:
        return h.zero_()
    args = (h, x, A, M, D, K, *h.stride(), *x.stride(), *A.stride())
    meta = dict(ACC_F64=x.dtype == torch.float64, KP=_padded(K), **_precision(x))
    if x.is_cuda:
        _down_cuda[lambda c: (G * triton.cdiv(M, c["BM"]),)](*args, **meta)
    else:
        _down_cpu[(G * triton.cdiv(M, 32),)](*args, BM=32, BD=32, **meta)
    return h


class BranchOps:
    """How the LoRA branches are computed, per group g (slot or row): ``down(x, A) = x A^T`` (G, M, in) x
    (G, K, in) -> (G, M, K); ``up_add_(y, h, B)``: ``y += h B^T`` in place, B (G, out, K), returns y;
    ``up(h, B) = h B^T``. The reference: torch's batched matmuls, differentiated by autograd as they are."""

    name = "bmm"

    @staticmethod
    def down(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, A.transpose(1, 2))

    @staticmethod
    def up_add_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return y.baddbmm_(h, B.transpose(1, 2))

    @staticmethod
    def up(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.bmm(h, B.transpose(1, 2))


class TritonBranchOps(BranchOps):
    """The same operations by this module's kernels (factor gradients stay
    batched matmuls: they reduce over rows into a small matrix)."""

    name = "triton"

    @staticmethod
    def down(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        return _KernelDown.apply(x, A)

    @staticmethod
    def up_add_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return _KernelUpAdd.apply(y, h, B)

    @staticmethod
    def up(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return up(h, B)


class _KernelDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, A)
        return down(x, A)

    @staticmethod
    @once_differentiable  # raw kernels: a second derivative would silently lose terms
    def backward(ctx, dh):
        x, A = ctx.saved_tensors
        dx = up(dh, A.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dA = torch.bmm(dh.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        return dx, dA


class _KernelUpAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, B)
        return up_add_(y, h, B)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        h, B = ctx.saved_tensors
        dh = down(dy, B.transpose(1, 2)) if ctx.needs_input_grad[1] else None
        dB = torch.bmm(dy.transpose(1, 2), h) if ctx.needs_input_grad[2] else None
        return dy, dh, dB


BMM_OPS = BranchOps()
LORA_OPS = {ops.name: ops for ops in (BMM_OPS, TritonBranchOps())}
"""``lora_kernel`` names: ``bmm`` (the reference, the default) and ``triton``."""


def lora_ops(name: str) -> BranchOps:
    """The branch ops of a ``lora_kernel`` name; ``triton`` needs the triton package (CUDA torch has it).
    On CPU tensors the kernels run in Triton's interpreter: for tests, far too slow to train with."""
    if name not in LORA_OPS:
        raise ValueError(f"lora_kernel must be one of {sorted(LORA_OPS)}, not {name!r}")
    if name == "triton" and not available():
        raise ValueError("lora_kernel=triton needs the triton package (pip install triton)")
    return LORA_OPS[name]
