"""Fused kernels compute the same function as transformers' modules."""

import pytest
import torch

from mta_ray.engine.fused import apply_fused, rotary, static_last_dims
from tests.tiny import tiny_gemma, tiny_llama, tiny_qwen2


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_gemma])
def test_fused_model_matches_eager_and_undo_restores(factory):
    model = factory()
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
        undo = apply_fused(model, compile=False)
        got = model(ids).logits
        undo()
        back = model(ids).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(back, want)


@pytest.mark.slow
def test_compiled_kernels_match_and_train():
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    undo = apply_fused(model, compile=True)
    try:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb).logits
        assert torch.allclose(out, want, atol=1e-5)
        out.sum().backward()
        assert emb.grad is not None and torch.isfinite(emb.grad).all()
    finally:
        undo()


@pytest.mark.slow
def test_compiled_kernels_keep_widths_static_and_rows_dynamic():
    """One compile serves every batch and sequence length; a new head width compiles anew (a symbolic width
    made the slices' index arithmetic several times slower than memory bandwidth on a GPU)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    rope = static_last_dims(torch.compile(rotary, backend=counter, dynamic=True))

    def call(batch, heads, seq, width):
        q, k = torch.randn(batch, heads, seq, width), torch.randn(batch, 1, seq, width)
        cos, sin = torch.randn(batch, seq, width), torch.randn(batch, seq, width)
        got = rope(q, k, cos, sin)
        for g, w in zip(got, rotary(q, k, cos, sin)):
            assert torch.allclose(g, w, atol=1e-6)

    call(2, 4, 9, 16)
    call(3, 4, 5, 16)
    call(4, 4, 13, 16)  # (not 1: torch specialises sizes of 1)
    assert counter.frame_count == 1
    call(2, 4, 9, 32)
    assert counter.frame_count == 2
    call(3, 4, 7, 32)
    assert counter.frame_count == 2
