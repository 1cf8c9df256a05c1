"""Triton kernels for the multi-slot LoRA branches: the down-projection and the in-place up-projection.

The reference path (``torch.bmm`` / ``baddbmm_``) ran the branches at 14.6% of GPU time on the 8B shape
(``bench/results/profile-llama3-8b-h100-shared-16f.txt``): ``baddbmm_`` averaged 484 us a call, about
twice what streaming its full-width output once in and once out takes at those shapes (an estimate from
the shapes). These kernels are written for the shapes of LoRA branches: the inner dimension of the
up-projection is the branches' rank (20-60; padded to a power of two of at least 16 for ``tl.dot``), so a
program loads its rows' ``h`` and its columns' ``B`` once and streams its tile of ``y`` through; the
down-projection reduces the input width in chunks into a (rows x rank) accumulator. Not measured on a GPU
yet: the trainer's default stays the batched matmuls (``lora_kernel="bmm"``).

Shapes follow :func:`mta_ray.engine.multilora.slot_linear`: G groups (slots, or rows), x (G, M, in),
A (G, K, in), h (G, M, K), B (G, out, K); any strides (transposed views are read as they lie).

On CPU the same kernel functions run in Triton's interpreter (how the tests check them without a GPU);
the interpreter's ``tl.dot`` mishandles bfloat16, so there half-precision tiles are multiplied in float32.
"""

from __future__ import annotations

import torch

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
        """y[g, m, n] (+)= sum_k h[g, m, k] B[g, n, k] for one (BM x BN) tile of y."""
        pid, g = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets of large batches
        n_blocks = (N + BN - 1) // BN
        om = (pid // n_blocks) * BM + tl.arange(0, BM)
        on = (pid % n_blocks) * BN + tl.arange(0, BN)
        ok = tl.arange(0, KP)
        h = tl.load(h_ptr + g * sh_g + om[:, None] * sh_m + ok[None, :] * sh_k,
                    mask=(om[:, None] < M) & (ok[None, :] < K), other=0.0)
        bt = tl.load(b_ptr + g * sb_g + on[None, :] * sb_n + ok[:, None] * sb_k,
                     mask=(on[None, :] < N) & (ok[:, None] < K), other=0.0)
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
              DOT_F32: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
              KP: tl.constexpr, ACC_F64: tl.constexpr = False):
        """h[g, m, k] = sum_d x[g, m, d] A[g, k, d] for BM rows of one group, reducing d in BD chunks."""
        pid, g = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: offsets of large batches
        om = pid * BM + tl.arange(0, BM)
        ok = tl.arange(0, KP)
        if ACC_F64:  # float64 tensors (tests on CPU) keep their precision
            acc = tl.full((BM, KP), 0.0, tl.float64)  # (tl.zeros is a jit function the interpreter cannot call)
        else:
            acc = tl.full((BM, KP), 0.0, tl.float32)
        for d0 in range(0, D, BD):
            od = d0 + tl.arange(0, BD)
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

    _TILES = [triton.Config({"BM": bm, "BN": bn}, num_warps=w)
              for bm, bn, w in ((64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4), (32, 256, 4))]
    _up_add_cuda = triton.autotune(_TILES, key=["N", "K"], restore_value=["y_ptr"])(triton.jit(_up_add))
    _down_cuda = triton.autotune(
        [triton.Config({"BM": bm, "BD": bd}, num_warps=w) for bm, bd, w in ((64, 64, 4), (128, 64, 8), (64, 128, 4))],
        key=["D", "K"])(triton.jit(_down))
    _up_add_cpu, _down_cpu = InterpretedFunction(_up_add), InterpretedFunction(_down)


def _half(t: torch.Tensor) -> bool:
    """Half-precision tiles are multiplied in float32 in the interpreter (its ``tl.dot`` mishandles them)."""
    return t.dtype in (torch.bfloat16, torch.float16)


def _padded(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def up_add_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, accumulate: bool = True) -> torch.Tensor:
    """``y += h @ B^T`` per group, in place (``accumulate=False``: ``y = h @ B^T``); returns ``y``."""
    G, M, N = y.shape
    K = h.shape[2]
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y if accumulate else y.zero_()
    args = (y, h, B, M, N, K, *y.stride(), *h.stride(), *B.stride())
    if y.is_cuda:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), G)  # noqa: E731
        _up_add_cuda[grid](*args, ACCUMULATE=accumulate, DOT_F32=False, IEEE=not _half(y), KP=_padded(K))
    else:
        _up_add_cpu[(triton.cdiv(M, 32) * triton.cdiv(N, 64), G)](*args, ACCUMULATE=accumulate, DOT_F32=_half(y),
                                                                   IEEE=False, BM=32, BN=64, KP=_padded(K))
    return y


def up(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``h @ B^T`` per group, a new (G, M, out) tensor."""
    return up_add_(h.new_empty(h.shape[0], h.shape[1], B.shape[1]), h, B, accumulate=False)


def down(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``x @ A^T`` per group: (G, M, in) x (G, K, in) -> (G, M, K)."""
    G, M, D = x.shape
    K = A.shape[1]
    h = x.new_empty(G, M, K)
    if M == 0 or K == 0:
        return h
    if D == 0:
        return h.zero_()
    args = (h, x, A, M, D, K, *h.stride(), *x.stride(), *A.stride())
    if x.is_cuda:
        _down_cuda[lambda meta: (triton.cdiv(M, meta["BM"]), G)](*args, DOT_F32=False, IEEE=not _half(x),
                                                                 KP=_padded(K))
    else:
        _down_cpu[(triton.cdiv(M, 32), G)](*args, DOT_F32=_half(x), IEEE=False, BM=32, BD=32, KP=_padded(K),
                                           ACC_F64=x.dtype == torch.float64)
    return h
