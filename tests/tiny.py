"""Tiny random Hugging Face models for invariant tests (CPU, float32)."""

from __future__ import annotations

import torch

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _tiny(config_cls: str, model_cls: str, seed: int, vocab: int, **extra):
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(vocab_size=vocab, **SIZES, **extra)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(cfg).eval()
    model.requires_grad_(False)
    return model


def tiny_llama(seed: int = 0, vocab: int = 96):
    return _tiny("LlamaConfig", "LlamaForCausalLM", seed, vocab, tie_word_embeddings=False)


def tiny_qwen2(seed: int = 0, vocab: int = 96):
    return _tiny("Qwen2Config", "Qwen2ForCausalLM", seed, vocab)


def tiny_gemma(seed: int = 0, vocab: int = 96):
    return _tiny("GemmaConfig", "GemmaForCausalLM", seed, vocab, head_dim=8)


def random_lora(model, names, rank: int, seed: int, scale: float = 0.05):
    from mta_ray.core.lora import LoraPair

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        lin = modules[n]
        out[n] = LoraPair(torch.randn(rank, lin.in_features, generator=g) * scale,
                          torch.randn(lin.out_features, rank, generator=g) * scale)
    return out
