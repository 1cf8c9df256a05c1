"""LoRA math as pure tensor functions: merges, folding, PEFT import/export.

A LoRA here is a ``dict`` from a target module's path (e.g.
``model.layers.0.self_attn.q_proj``) to a :class:`LoraPair` ``(A, B)`` with
``A: (r, in)`` and ``B: (out, r)``; the scaling ``alpha / r`` is folded into
``B``, so the weight update is exactly ``B @ A``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class LoraPair(NamedTuple):
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r), scaling folded in


Lora = dict[str, LoraPair]


def scaled(lora: Lora, scale: float) -> Lora:
    """Multiply every update ``B A`` by ``scale`` (folded into B)."""
    return {name: LoraPair(p.A, p.B * scale) for name, p in lora.items()}


def staged(lora: Lora, dtype: torch.dtype, pin: bool) -> Lora:
    """``lora`` in ``dtype`` (pinned when ``pin``): prepared on the host, beside the GPU, so loading it
    into a GPU slot is a plain copy that does not make the host wait."""
    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        return t.pin_memory() if pin else t
    return {name: LoraPair(prep(p.A), prep(p.B)) for name, p in lora.items()}


def delta(pair: LoraPair) -> torch.Tensor:
    """The dense weight update ``B @ A`` (out, in)."""
    return pair.B @ pair.A


def _check_same_modules(loras: Sequence[Lora], weights: Sequence[float]) -> None:
    if len(loras) != len(weights) or not loras:
        raise ValueError(f"need one weight per LoRA, got {len(loras)} LoRAs and {len(weights)} weights")
    names = set(loras[0])
    for lora in loras[1:]:
        if set(lora) != names:
            raise ValueError("LoRAs to merge must adapt the same modules")


def merge_params(loras: Sequence[Lora], weights: Sequence[float]) -> Lora:
    """Parameter-space merge (reference code): ``A = sum w_i A_i``, ``B = sum w_i B_i``.

    Not equal to ``sum w_i B_i A_i``: cross terms ``B_i A_j`` appear.
    """
    _check_same_modules(loras, weights)
    out = {}
    for name in loras[0]:
        out[name] = LoraPair(sum(w * l[name].A for w, l in zip(weights, loras)),
                             sum(w * l[name].B for w, l in zip(weights, loras)))
    return out


def merge_delta(loras: Sequence[Lora], weights: Sequence[float]) -> Lora:
    """Exact merge ``sum w_i B_i A_i`` kept factored: ``B = [w_1 B_1 .. w_K B_K]``, ``A = [A_1; ..; A_K]``.

    The rank is the sum of the ranks (K * r).
    """
    _check_same_modules(loras, weights)
    out = {}
    for name in loras[0]:
        out[name] = LoraPair(torch.cat([l[name].A for l in loras], dim=0),
                             torch.cat([w * l[name].B for w, l in zip(weights, loras)], dim=1))
    return out


def merge(loras: Sequence[Lora], weights: Sequence[float], space: str) -> Lora:
    if space == "params":
        return merge_params(loras, weights)
    if space == "delta":
        return merge_delta(loras, weights)
    raise ValueError(f"unknown merge space {space!r}")


def stack(*loras: Lora) -> Lora:
    """One LoRA whose update is the sum of the given ones' (e.g. merged + stacked), exactly."""
    return merge_delta(list(loras), [1.0] * len(loras))


def fold_into(model: torch.nn.Module, lora: Lora) -> None:
    """Add ``B @ A`` into each target module's weight in place (the paper's W0 + dW)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, pair in lora.items():
            weight = modules[name].weight
            A, B = pair.A.to(weight.device, torch.float32), pair.B.to(weight.device, torch.float32)
            weight += (B @ A).to(weight.dtype)


def rank_of(lora: Lora) -> int:
    return max((p.A.shape[0] for p in lora.values()), default=0)


# --------------------------------------------------------------------------- PEFT format

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
    import re

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
