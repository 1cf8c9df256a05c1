"""The Triton LoRA-branch kernels against torch's batched matmuls, values and gradients.

Random shapes, including groups of zero rows, rank 0, a rank that is not a power of two, an input wider
than one reduction chunk and factors read through transposed views. On CPU the kernels run in Triton's
interpreter (float64 kept exact, bfloat16 multiplied in float32); on a GPU, compiled.
"""

import pytest
import torch

pytest.importorskip("triton")

from mta_ray.engine import lora_kernels  # noqa: E402
from mta_ray.engine.lora_kernels import BMM_OPS, lora_ops  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [  # groups, rows per group, out, rank, in; ranks up to a 128-wide tile, and one past it (batched matmuls)
    (3, 50, 70, 12, 40), (2, 0, 8, 4, 8), (1, 33, 130, 36, 100), (4, 7, 9, 1, 300), (2, 5, 9, 0, 7),
    (2, 17, 40, 72, 33), (1, 6, 10, 150, 20)]


@pytest.fixture(params=DEVICES)
def device(request):
    if not lora_kernels.runs_on(request.param):
        pytest.skip(f"the kernels do not run on {request.param} here (Triton's interpreter before 3.9)")
    return request.param


def _branch(ops, x, A, B, base):
    """``base + (x A^T) B^T`` with ``ops``, the update added in place into a copy of ``base``."""
    return ops.up_add_(base.clone(), ops.down(x, A), B)


def _values_and_grads(ops, leaves, dy):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    y = _branch(ops, *leaves)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_compute_the_branch_and_its_gradients_like_batched_matmuls(device, shape):
    G, M, N, K, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    dtype = torch.float64 if device == "cpu" else torch.float32   # float32 on CUDA: the dots' own precision

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(device, dtype)

    x, base, dy = rand(G, M, D), rand(G, M, N), rand(G, M, N)
    A = rand(G, D, K).transpose(1, 2)                     # a transposed view, as the backward passes them
    B = rand(G, N, K)
    want, want_grads = _values_and_grads(BMM_OPS, (x, A, B, base), dy)
    got, got_grads = _values_and_grads(lora_ops("triton"), (x, A, B, base), dy)
    tol = 1e-10 if dtype == torch.float64 else 1e-4       # float32 (no TF32) in another summation order
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    for name, g_got, g_want in zip("x A B base".split(), got_grads, want_grads):
        assert torch.allclose(g_got, g_want, atol=tol, rtol=tol), name
    h = rand(G, M, K)
    assert torch.allclose(lora_ops("triton").up(h, B), BMM_OPS.up(h, B), atol=tol, rtol=tol)


def test_bfloat16_branches_stay_within_bfloat16_rounding(device):
    """The engine's dtype: the kernels accumulate in float32 and round once, as cuBLAS does."""
    g = torch.Generator().manual_seed(0)
    G, M, N, K, D = 2, 40, 96, 12, 64
    x, A = torch.randn(G, M, D, generator=g), torch.randn(G, K, D, generator=g) / D ** 0.5
    B, base = torch.randn(G, N, K, generator=g) / K ** 0.5, torch.randn(G, M, N, generator=g)
    exact = _branch(BMM_OPS, x.double(), A.double(), B.double(), base.double())
    got = _branch(lora_ops("triton"), *(t.to(device, torch.bfloat16) for t in (x, A, B, base)))
    err = (got.double().cpu() - exact).abs().max().item()
    assert err < 0.05 * exact.abs().max().item()          # bf16 keeps 8 bits: the inputs' rounding dominates


def test_gradients_of_broadcast_and_strided_outputs(device):
    """Autograd may hand the backward an expanded (stride-0) or non-contiguous gradient."""
    g = torch.Generator().manual_seed(1)
    G, M, N, K, D = 2, 9, 20, 5, 24
    leaves = [torch.randn(*s, generator=g, dtype=torch.float64).to(device)
              for s in ((G, M, D), (G, K, D), (G, N, K), (G, M, N))]
    for dy in (torch.ones(1, 1, 1, dtype=torch.float64, device=device).expand(G, M, N),
               torch.randn(G, N, M, generator=g, dtype=torch.float64).to(device).transpose(1, 2)):
        want, want_grads = _values_and_grads(BMM_OPS, leaves, dy)
        got, got_grads = _values_and_grads(lora_ops("triton"), leaves, dy)
        assert torch.allclose(got, want, atol=1e-10)
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(got_grads, want_grads))


def test_an_unknown_kernel_name_is_refused():
    with pytest.raises(ValueError, match="lora_kernel must be one of"):
        lora_ops("cublas")
    assert lora_kernels.available()
