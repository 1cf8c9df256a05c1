"""PEFT's LoRA adapter format (``adapter_config.json`` + ``adapter_model.safetensors``) to and from our form.

Our form is :data:`mta_ray.core.lora.Lora`: scaling folded into B, so written adapters have
``lora_alpha == r`` and read ones get their ``alpha / r`` (or rsLoRA's ``alpha / sqrt(r)``) folded in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mta_ray.core.lora import Lora, LoraPair
from mta_ray.core.lowrank import SERVED_RANKS

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def save_peft(lora: Lora, path: str | Path, base_model: str = "", dtype: torch.dtype | None = None) -> Path:
    """Write a standard PEFT LoRA adapter (``adapter_config.json`` + safetensors).

    Scaling is folded into B, so ``lora_alpha == r`` for every module;
    modules of another rank go into ``rank_pattern``/``alpha_pattern``.
    """
    from peft import LoraConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ranks = {name: int(p.A.shape[0]) for name, p in lora.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {name: k for name, k in ranks.items() if k != r}
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted({n.rsplit(".", 1)[-1] for n in lora}),
        rank_pattern=dict(pattern), alpha_pattern=dict(pattern),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model or None,
    )
    config.save_pretrained(str(path))
    tensors = {}
    for name, p in lora.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = _contig(p.A, dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = _contig(p.B, dtype)
    save_file(tensors, str(path / ADAPTER_FILE))
    return path


def _contig(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.to(dtype) if dtype else t).contiguous()


def load_peft(path: str | Path) -> Lora:
    """Read a PEFT LoRA adapter into our form (scaling folded into B)."""
    path = Path(path)
    config = json.loads((path / CONFIG_FILE).read_text())
    tensors = load_file(str(path / ADAPTER_FILE))
    r, alpha = config["r"], config["lora_alpha"]
    rslora = config.get("use_rslora", False)
    lora: Lora = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len("base_model.model."):-len(".lora_A.weight")]
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        rank, a = r, alpha
        for pat, k in (config.get("rank_pattern") or {}).items():
            if re.match(rf"(^|.*\.){pat}$", name):
                rank = k
        for pat, k in (config.get("alpha_pattern") or {}).items():
            if re.match(rf"(^|.*\.){pat}$", name):
                a = k
        scale = a / (rank ** 0.5 if rslora else rank)
        lora[name] = LoraPair(A.float(), B.float() * scale)
    return lora


def served_problems(path: str | Path, max_lora_rank: int) -> list[str]:
    """What would stop vLLM from loading the adapter at ``path`` with ``--max-lora-rank max_lora_rank``.

    Mirrors vLLM's checks (``vllm/lora/peft_helper.py``, ``vllm/config/lora.py``): rank one of its ranks and
    at most the server's cap; one rank and one alpha for every module (vLLM ignores ``rank_pattern`` and
    ``alpha_pattern``); no ``modules_to_save``; ``bias`` ``none``; no DoRA; a real base model name.
    """
    config = json.loads((Path(path) / CONFIG_FILE).read_text())
    problems = []
    r = config.get("r")
    if r not in SERVED_RANKS or r > max_lora_rank:
        problems.append(f"r={r} is not a served rank <= {max_lora_rank} ({list(SERVED_RANKS)})")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern are set (vLLM ignores them)")
    if config.get("modules_to_save"):
        problems.append("modules_to_save is set")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r}, not 'none'")
    if config.get("use_dora"):
        problems.append("use_dora is set")
    base = config.get("base_model_name_or_path") or ""
    if not base or base.startswith(("pypi:", "random:")):
        problems.append(f"base_model_name_or_path {base!r} is not a model a server can load")
    with safe_open(str(Path(path) / ADAPTER_FILE), framework="pt") as f:
        bad = [k for k in f.keys() if k.endswith(".lora_A.weight") and f.get_slice(k).get_shape()[0] != r]
    if bad:
        problems.append(f"{len(bad)} modules have a rank other than r={r} (e.g. {bad[0]})")
    return problems
