"""What the benchmarks share: the device, models to measure, synthetic users, the PEFT one-at-a-time baseline.

The baseline runs users as OPPU's code does: one at a time with plain PEFT (the user's merged LoRA
folded into W0, a new PEFT LoRA, AdamW, the Hugging Face loss over all logits).
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mta_ray.config import Config, LoraTrainConfig, variant_parts
from mta_ray.core.lora import Lora, LoraPair, fold_into, merge_delta, merge_params, peft_target_modules, scaled
from mta_ray.engine.multilora import target_module_names
from mta_ray.engine.trainer import Example, Job, MultiSlotTrainer, plan_windows, user_seed

# Dense bf16 tensor-core peaks (no sparsity), by device-name substring, most specific first.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L20", 119.5e12)]

def device_name() -> tuple[str, str]:
    """("cuda" or "cpu", the device's name as results name it)."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name()
    return "cpu", platform.processor() or "cpu"


def host() -> dict[str, Any]:
    """The host's CPU model and cores: one-user-at-a-time baselines issue many small kernels, so the host
    sets part of their pace, and results from different lent machines need it to be compared."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count()}


def device_peak(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def build_model(cfg: Config, device: str) -> Any:
    """A frozen model to benchmark: a random-weight named shape, or the configured real base."""
    from mta_ray.files.models import SHAPES, load_base, random_model

    if cfg.bench.shape == "real":
        model, _ = load_base(cfg.model, device)
        return model
    if cfg.bench.shape not in SHAPES:
        raise ValueError(f"unknown bench.shape {cfg.bench.shape!r}; known: real, {', '.join(SHAPES)}")
    return random_model(cfg.bench.shape, torch.bfloat16 if device == "cuda" else torch.float32, device)


def target_shapes(model: Any, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(in, out) of each target linear layer by path (of the model as loaded: build jobs before a trainer
    wraps its layers)."""
    modules = dict(model.named_modules())
    return {n: (modules[n].in_features, modules[n].out_features) for n in target_module_names(model, targets)}


def random_anchors(model: Any, cfg: Config) -> list[Lora]:
    """``bench.anchors`` random rank-``bank.rank`` anchor LoRAs on the bank's modules (seeded)."""
    shapes, r = target_shapes(model, cfg.bank.target_modules), cfg.bank.rank
    g = torch.Generator().manual_seed(1234)
    return [{nm: LoraPair(torch.randn(r, i, generator=g) * 0.01, torch.randn(o, r, generator=g) * 0.01)
             for nm, (i, o) in shapes.items()} for _ in range(cfg.bench.anchors)]


def synthetic_jobs(model: Any, cfg: Config, n: int, offset: int = 0, merged: bool = True, items: int = 0,
                   space: str = "delta") -> list[Job]:
    """Users with ``items`` (default ``bench.history_items``) random-token examples of ``bench.prompt_tokens``
    tokens and (``merged``) a merged branch of ``bench.anchors`` anchors on the bank's modules, merged in
    ``space`` (params: rank ``bank.rank``; delta: K x that)."""
    b = cfg.bench
    vocab = model.config.vocab_size
    anchors = random_anchors(model, cfg) if merged else []
    weights = [1.0 / b.anchors] * b.anchors
    merge = merge_params if space == "params" else merge_delta
    shared = merge(anchors, weights) if merged else None  # one merged branch for all: same cost, 1/n the memory
    jobs = []
    for u in range(offset, offset + n):
        gu = torch.Generator().manual_seed(u)
        examples = []
        for _ in range(items or b.history_items):
            ids = torch.randint(0, vocab, (b.prompt_tokens,), generator=gu).tolist()
            p = b.prompt_tokens - b.target_tokens
            examples.append(Example(ids, [-100] * p + ids[p:]))
        # (the bank would give each user its own K; the cost is the same)
        jobs.append(Job(f"user{u:05d}", examples, merged=shared, seed=cfg.seed))
    return jobs


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def param_counts(model: Any) -> tuple[int, int]:
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def run_baseline(model: Any, jobs: list[Job], train: LoraTrainConfig, device: str) -> list[float]:
    """One user at a time with plain PEFT; returns each user's final step loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    finals = []
    for job in jobs:
        if job.merged is not None:
            fold_into(model, job.merged)                   # the paper's W0 + dW_merged
        peft_model = get_peft_model(model, LoraConfig(r=train.rank, lora_alpha=train.alpha, lora_dropout=0.0,
                                                      target_modules=peft_target_modules(train.target_modules)))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        windows = plan_windows(len(job.examples), train, user_seed(job.seed, job.user_id))
        sched = get_cosine_schedule_with_warmup(opt, math.ceil(len(windows) * train.warmup_ratio), len(windows))
        peft_model.train()
        loss_value = float("nan")
        for window in windows:
            for mb in window:
                batch = [job.examples[i] for i in mb]
                ids = torch.tensor([e.input_ids for e in batch], device=device)
                labels = torch.tensor([e.labels for e in batch], device=device)
                out = peft_model(input_ids=ids, labels=labels, use_cache=False)
                (out.loss / len(window)).backward()
                loss_value = out.loss.item()
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        state = {k: v.detach().to("cpu") for k, v in peft_model.state_dict().items() if "lora_" in k}
        assert state
        model = peft_model.unload()
        if job.merged is not None:
            fold_into(model, scaled(job.merged, -1.0))
        finals.append(loss_value)
    model.eval()
    return finals


def measure(fn: Callable[[], Any], device: str) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes) of ``fn()``."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return result, seconds, peak


def lora_params(model: Any, targets: list[str], rank: int) -> int:
    """Parameters of one rank-``rank`` LoRA on ``targets``: r x (in + out) per module."""
    return sum(rank * (i + o) for i, o in target_shapes(model, targets).values())


@dataclass(frozen=True)
class Variant:
    """A multi-slot trainer setting the benchmarks measure (``bench.variants``): ``12cf`` = 12 slots,
    gradient checkpointing, fused kernels; ``r``: the reference LoRA path, not the shared-input one;
    ``t``: the LoRA branches by Triton kernels."""

    label: str
    slots: int
    checkpointing: bool
    fused: bool
    shared_inputs: bool
    lora_kernel: str = "bmm"

    @classmethod
    def parse(cls, label: str) -> "Variant":
        slots, flags = variant_parts(label)
        return cls(label, slots, "c" in flags, "f" in flags, "r" not in flags, "triton" if "t" in flags else "bmm")

    def trainer(self, model: Any, train: LoraTrainConfig, **kwargs: Any) -> MultiSlotTrainer:
        """The trainer of this setting (gradient checkpointing is the caller's, on the model)."""
        return MultiSlotTrainer(model, train, slots=self.slots, fused=self.fused,
                                shared_inputs=self.shared_inputs, lora_kernel=self.lora_kernel, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {"variant": self.label, "slots": self.slots, "gradient_checkpointing": self.checkpointing,
                "fused": self.fused, "shared_inputs": self.shared_inputs, "lora_kernel": self.lora_kernel}
