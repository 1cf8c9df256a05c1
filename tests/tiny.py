"""Tiny random Hugging Face models for invariant tests (CPU, float32)."""

from __future__ import annotations

import torch


def tiny_llama(seed: int = 0, vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def tiny_qwen2(seed: int = 0, vocab: int = 96):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def tiny_gemma(seed: int = 0, vocab: int = 96):
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(seed)
    cfg = GemmaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = GemmaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def random_lora(model, names, rank: int, seed: int, scale: float = 0.05):
    from mta_ray.lora import LoraPair

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for n in names:
        lin = modules[n]
        out[n] = LoraPair(torch.randn(rank, lin.in_features, generator=g) * scale,
                          torch.randn(lin.out_features, rank, generator=g) * scale)
    return out
