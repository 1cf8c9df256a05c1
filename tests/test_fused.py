"""Fused kernels compute the same function as transformers' modules."""

import pytest
import torch

from mta_ray.engine.fused import apply_fused
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
