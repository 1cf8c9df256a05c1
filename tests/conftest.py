"""Shared fixtures: the real LaMP-2 file from ../shared (skipped when absent), a tiny model, a demo run per module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_LAMP2 = ROOT.parent / "shared" / "data" / "lamp2-movie-tagging-72users.json"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray a test starts binds and talks on loopback only (Ray otherwise uses the machine's own address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture
def lamp2_file() -> Path:
    if not SHARED_LAMP2.is_file():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_LAMP2


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One GGUF conversion cache for the whole session (MTA_RAY_CACHE overrides)."""
    path = Path(os.environ.get("MTA_RAY_CACHE") or tmp_path_factory.mktemp("mta_cache"))
    os.environ["MTA_RAY_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, model_cache):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mta_ray.config import ModelConfig
    from mta_ray.files.models import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=True))
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory, request):
    """One demo run on the tiny model for a test module, sized by that module's ``SMALL`` overrides."""
    from mta_ray.cli import main

    out = tmp_path_factory.mktemp("run")
    demo = str(ROOT / "configs" / "demo.yaml")
    assert main(["run", demo, "--out", str(out), f"model.base={tiny_model_dir}", *request.module.SMALL]) == 0
    yield out
    import ray
    ray.shutdown()
