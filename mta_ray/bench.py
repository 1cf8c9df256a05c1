"""Benchmarks: ``mta-ray bench throughput CONFIG`` (GPU speed of per-user merge-then-adapt).

Run: ``mta-ray bench throughput configs/bench/throughput-8b.yaml --out bench/results``

Throughput compares, in one process on one device with the same users:
(a) the baseline — one user at a time with plain PEFT, as OPPU's code runs users
    (fold the user's merged LoRA into W0, new PEFT LoRA, AdamW, HF loss over all logits);
(b) the multi-slot trainer — many users per forward/backward, continuous refill.
Figures: users/hour, tokens/s, MFU and peak GPU memory. MFU counts 4N FLOPs per
processed token (N = parameters of all matmuls incl. the LM head) plus causal
attention (6 T^2 d per layer per sequence, forward + input gradients) over the
GPU's dense bf16 peak; ``mfu_executed`` counts the LM head only where it is
computed (our trainer applies it to target tokens only).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import Config, LoraTrainConfig, save_resolved
from .fsutil import atomic_write_text, slug as _slug
from .lora import LoraPair, fold_into, merge_delta, scaled
from .multilora import target_module_names
from .trainer import Example, Job, MultiSlotTrainer, plan_windows, user_seed

# Dense bf16 tensor-core peaks (no sparsity), by device-name substring, most specific first.
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L20", 119.5e12)]


def device_peak(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def build_model(cfg: Config, device: str) -> Any:
    """A frozen model to benchmark: a random-weight named shape, or the configured real base."""
    from .models import SHAPES, load_base, random_model

    if cfg.bench.shape == "real":
        model, _ = load_base(cfg.model, device)
        return model
    if cfg.bench.shape not in SHAPES:
        raise ValueError(f"unknown bench.shape {cfg.bench.shape!r}; known: real, {', '.join(SHAPES)}")
    return random_model(cfg.bench.shape, torch.bfloat16 if device == "cuda" else torch.float32, device)


def synthetic_jobs(model: Any, cfg: Config, n: int, offset: int = 0, merged: bool = True,
                   targets: list[str] | None = None) -> list[Job]:
    """Users with ``history_items`` random-token examples and (``merged``) a random merged branch of K anchors."""
    b = cfg.bench
    vocab = model.config.vocab_size
    names = target_module_names(model, targets or cfg.adapt.target_modules)
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(1234)
    anchors = [{nm: LoraPair(torch.randn(cfg.bank.rank, modules[nm].in_features, generator=g) * 0.01,
                             torch.randn(modules[nm].out_features, cfg.bank.rank, generator=g) * 0.01)
                for nm in names} for _ in range(b.anchors)]
    weights = [1.0 / b.anchors] * b.anchors
    jobs = []
    for u in range(offset, offset + n):
        gu = torch.Generator().manual_seed(u)
        examples = []
        for _ in range(b.history_items):
            ids = torch.randint(0, vocab, (b.prompt_tokens,), generator=gu).tolist()
            p = b.prompt_tokens - b.target_tokens
            examples.append(Example(ids, [-100] * p + ids[p:]))
        # (the bank would give each user its own K; the cost is the same)
        jobs.append(Job(f"user{u:05d}", examples, merged=merge_delta(anchors, weights) if merged else None,
                        seed=cfg.seed))
    return jobs


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _flops(jobs: list[Job], train: LoraTrainConfig, n_body: int, n_head: int, layers: int, d: int,
           head_on_targets_only: bool) -> tuple[float, float, int]:
    """(FLOPs by the issue's 4N formula, FLOPs executed, tokens processed) for training ``jobs``."""
    issue = executed = 0.0
    tokens = 0
    for job in jobs:
        for e in job.examples:
            T = len(e.input_ids)
            attn = 6.0 * T * T * d * layers / 2  # causal
            issue += 4.0 * (n_body + n_head) * T + attn
            head_tokens = e.target_tokens if head_on_targets_only else T
            executed += 4.0 * n_body * T + 4.0 * n_head * head_tokens + attn
            tokens += T
    return issue * train.epochs, executed * train.epochs, tokens * train.epochs


def _param_counts(model: Any) -> tuple[int, int]:
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
                                                      target_modules=_peft_targets(train)))
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


def _peft_targets(train: LoraTrainConfig) -> Any:
    return "all-linear" if "all-linear" in train.target_modules else list(train.target_modules)


def _measure(fn, device: str) -> tuple[Any, float, int]:
    """(result, seconds, peak bytes) of ``fn()``."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return result, seconds, peak


def _figures(n_users: int, seconds: float, flops: tuple[float, float, int], peak_flops: float | None,
             peak_bytes: int) -> dict[str, Any]:
    issue, executed, tokens = flops
    out = {"users": n_users, "seconds": round(seconds, 3), "users_per_hour": round(n_users * 3600 / seconds, 1),
           "tokens_per_s": round(tokens / seconds, 1), "tflops_per_s": round(issue / seconds / 1e12, 2),
           "peak_gpu_gib": round(peak_bytes / 2 ** 30, 2)}
    if peak_flops:
        out["mfu"] = round(issue / seconds / peak_flops, 4)
        out["mfu_executed"] = round(executed / seconds / peak_flops, 4)
    return out


def run_throughput(cfg: Config, out: Path, profile: bool = False) -> dict[str, Any]:
    """Measure baseline and multi-slot variants; write ``throughput-<shape>.json`` in ``out``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    peak_flops = device_peak(name) if device == "cuda" else None
    b, train = cfg.bench, cfg.adapt
    model = build_model(cfg, device)
    n_body, n_head = _param_counts(model)
    mc = model.config
    flop_args = (train, n_body, n_head, mc.num_hidden_layers, mc.num_attention_heads * getattr(
        mc, "head_dim", mc.hidden_size // mc.num_attention_heads))
    merged_rank = b.anchors * cfg.bank.rank
    print(f"bench throughput: {name}, model {b.shape} ({(n_body + n_head) / 1e9:.2f}B matmul params), "
          f"{b.history_items} items x {b.prompt_tokens} tokens, {train.epochs} epochs, "
          f"batch {train.batch_size} x accum {train.grad_accum}, rank {train.rank}, merged rank {merged_rank}",
          flush=True)

    # (a) baseline, after one untimed warm-up user
    run_baseline(model, synthetic_jobs(model, cfg, 1, offset=10_000), train, device)
    base_jobs = synthetic_jobs(model, cfg, b.baseline_users)
    finals, sec, peak = _measure(lambda: run_baseline(model, base_jobs, train, device), device)
    baseline = _figures(len(base_jobs), sec, _flops(base_jobs, *flop_args, head_on_targets_only=False),
                        peak_flops, peak)
    baseline["final_losses"] = [round(x, 4) for x in finals]
    print(f"  baseline (PEFT, one user at a time): {baseline}", flush=True)

    variants = []
    for v in b.variants:
        slots, ckpt, fused = _variant_slots(v)
        variants.append(_run_variant(model, cfg, device, slots, ckpt, fused, merged_rank, flop_args, peak_flops))
        print(f"  multi-slot {v}: {variants[-1]}", flush=True)
    ok = [x for x in variants if "error" not in x]
    best = max(ok, key=lambda x: x["users_per_hour"]) if ok else None
    fits = [x for x in ok if x["peak_gpu_gib"] <= b.memory_budget_gib] if device == "cuda" else []
    result = {
        "benchmark": "throughput", "device": name, "device_peak_bf16_flops": peak_flops,
        "torch": torch.__version__, "model": b.shape if b.shape != "real" else cfg.model.base,
        "matmul_params": n_body + n_head,
        "settings": {**{k: getattr(b, k) for k in ("users", "baseline_users", "prompt_tokens", "target_tokens",
                                                     "history_items", "anchors", "variants")},
                     "train": asdict(train), "anchor_rank": cfg.bank.rank, "merge_space": "delta",
                     "dtype": "bfloat16" if device == "cuda" else "float32"},
        "baseline_peft_one_at_a_time": baseline,
        "multi_slot": variants,
        "best_variant": best["variant"] if best else None,
        "speedup_users_per_hour": round(best["users_per_hour"] / baseline["users_per_hour"], 2) if best else None,
        "single_gpu_48gb": ({"variant": max(fits, key=lambda x: x["users_per_hour"])["variant"],
                             "budget_gib": b.memory_budget_gib} if fits else None),
    }
    out.mkdir(parents=True, exist_ok=True)
    if profile and best:
        _profile(model, cfg, device, best["slots"], best["gradient_checkpointing"], best["fused"], merged_rank, out)
    path = out / f"throughput-{_slug(result['model'])}-{_slug(name)}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    save_resolved(cfg, out, "bench")
    print(f"  speedup (best variant {result['best_variant']} vs baseline): {result['speedup_users_per_hour']}x "
          f"-> {path}", flush=True)
    return result


def _run_variant(model: Any, cfg: Config, device: str, slots: int, ckpt: bool, fused: bool, merged_rank: int,
                 flop_args: tuple, peak_flops: float | None) -> dict[str, Any]:
    b = cfg.bench
    label = f"{slots}{'c' if ckpt else ''}{'f' if fused else ''}"
    trainer = None
    try:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = MultiSlotTrainer(model, cfg.adapt, slots=slots, merged_rank=merged_rank, seed=cfg.seed,
                                   fused=fused)
        trainer.run(synthetic_jobs(model, cfg, slots, offset=20_000))  # warm-up: one full round (and compile)
        jobs = synthetic_jobs(model, cfg, max(b.users, 2 * slots))
        results, sec, peak = _measure(lambda: trainer.run(jobs), device)
        fig = _figures(len(jobs), sec, _flops(jobs, *flop_args, head_on_targets_only=True), peak_flops, peak)
        fig["failed_users"] = sum(r.status != "ok" for r in results)
        fig["mean_final_loss"] = round(sum(r.final_loss for r in results) / len(results), 4)
        return {"variant": label, "slots": slots, "gradient_checkpointing": ckpt, "fused": fused, **fig}
    except torch.OutOfMemoryError:
        return {"variant": label, "slots": slots, "gradient_checkpointing": ckpt, "fused": fused,
                "error": "out of memory"}
    finally:
        if trainer is not None:
            trainer.close()
        if ckpt:
            model.gradient_checkpointing_disable()
        for p in model.parameters():
            p.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()


def _profile(model: Any, cfg: Config, device: str, slots: int, ckpt: bool, fused: bool, merged_rank: int,
             out: Path) -> None:
    """Where the time goes: a torch.profiler table of one round of ``slots`` users."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = MultiSlotTrainer(model, cfg.adapt, slots=slots, merged_rank=merged_rank, seed=cfg.seed, fused=fused)
    try:
        jobs = synthetic_jobs(model, cfg, slots, offset=30_000)
        with profile(activities=acts) as prof:
            trainer.run(jobs)
            _sync(device)
        key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=40)
        atomic_write_text(out / "profile.txt", table)
        print(table[:6000], flush=True)
    finally:
        trainer.close()
        if ckpt:
            model.gradient_checkpointing_disable()


# --------------------------------------------------------------------------- scalability

def lora_params(model: Any, targets: list[str], rank: int) -> int:
    """Parameters of one rank-``rank`` LoRA on ``targets``: r x (in + out) per module."""
    modules = dict(model.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in target_module_names(model, targets))


def _variant_slots(v: str) -> tuple[int, bool, bool]:
    """``12cf`` -> (12 slots, gradient checkpointing, fused kernels)."""
    return int(v.rstrip("cf")), "c" in v, "f" in v


def run_scalability(cfg: Config, out: Path) -> dict[str, Any]:
    """Time, GPU-hours and storage to personalise N users: MTA (bank once + per-user) vs OPPU (one LoRA each).

    Measured on this device (8B-shaped model, LaMP-2-like users): OPPU's recipe one user at a time
    (``bench.baseline_users`` users), the bank's per-anchor cost and MTA's per-user cost in the
    multi-slot trainer (first variant of ``bench.variants``), and N = the smallest of
    ``bench.scalability_users`` end to end for both. Other N are extrapolated from those per-unit
    costs and marked ``"measured": false``. Storage is counted from the adapters' shapes (bf16).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    b = cfg.bench
    model = build_model(cfg, device)
    slots, ckpt, fused = _variant_slots(b.variants[0])
    merged_rank = b.anchors * cfg.bank.rank
    n_small = min(b.scalability_users)
    print(f"bench scalability: {name}, model {b.shape}, {b.history_items} items x {b.prompt_tokens} tokens, "
          f"MTA variant {b.variants[0]}, N = {b.scalability_users}", flush=True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def oppu_jobs(n: int, offset: int) -> list[Job]:
        return synthetic_jobs(model, cfg, n, offset, merged=False, targets=cfg.oppu.target_modules)

    # OPPU: its recipe, one user at a time, from scratch (after one untimed warm-up user)
    run_baseline(model, oppu_jobs(1, 40_000), cfg.oppu, device)
    _, oppu_sec, oppu_peak = _measure(lambda: run_baseline(model, oppu_jobs(b.baseline_users, 0), cfg.oppu, device),
                                      device)
    oppu_per_user = oppu_sec / b.baseline_users
    print(f"  OPPU: {oppu_per_user:.2f} s/user ({b.baseline_users} users)", flush=True)

    def trainer_cost(train: LoraTrainConfig, jobs: list[Job], rank_merged: int) -> tuple[float, int]:
        trainer = MultiSlotTrainer(model, train, slots=slots, merged_rank=rank_merged, seed=cfg.seed, fused=fused)
        try:
            _, sec, peak = _measure(lambda: trainer.run(jobs), device)
        finally:
            trainer.close()
            for p in model.parameters():
                p.grad = None
        return sec, peak

    def anchor_jobs(n: int, offset: int) -> list[Job]:
        return synthetic_jobs(model, cfg, n, offset, merged=False, targets=cfg.bank.target_modules)

    trainer_cost(cfg.adapt, synthetic_jobs(model, cfg, slots, 50_000), merged_rank)  # warm-up (and compile)
    trainer_cost(cfg.bank, anchor_jobs(slots, 60_000), 0)
    bank_sec, bank_peak = trainer_cost(cfg.bank, anchor_jobs(2 * slots, 70_000), 0)
    bank_per_anchor = bank_sec / (2 * slots)
    mta_sec, mta_peak = trainer_cost(cfg.adapt, synthetic_jobs(model, cfg, max(b.users, 2 * slots), 80_000),
                                     merged_rank)
    mta_per_user = mta_sec / max(b.users, 2 * slots)
    print(f"  bank: {bank_per_anchor:.2f} s/anchor; MTA: {mta_per_user:.2f} s/user (steady state)", flush=True)

    # the smallest N end to end, both methods
    anchors_small = min(cfg.bank.num_clusters, n_small)
    small_bank, _ = trainer_cost(cfg.bank, anchor_jobs(anchors_small, 90_000), 0)
    small_users, _ = trainer_cost(cfg.adapt, synthetic_jobs(model, cfg, n_small, 100_000), merged_rank)
    _, small_oppu, _ = _measure(lambda: run_baseline(model, oppu_jobs(n_small, 110_000), cfg.oppu, device), device)
    if ckpt:
        model.gradient_checkpointing_disable()

    bytes_per = 2  # adapters stored in bf16
    stacked = lora_params(model, cfg.adapt.target_modules, cfg.adapt.rank)
    oppu_p = lora_params(model, cfg.oppu.target_modules, cfg.oppu.rank)
    anchor_p = lora_params(model, cfg.bank.target_modules, cfg.bank.rank)
    rows = []
    for n in sorted(b.scalability_users):
        k = min(cfg.bank.num_clusters, n)
        measured = n == n_small
        mta_s = small_bank + small_users if measured else k * bank_per_anchor + n * mta_per_user
        oppu_s = small_oppu if measured else n * oppu_per_user
        rows.append({"users": n, "measured": measured, "anchors": k,
                     "mta": {"seconds": round(mta_s, 1), "gpu_hours": round(mta_s / 3600, 4),
                             "storage_bytes": (k * anchor_p + n * stacked) * bytes_per},
                     "oppu": {"seconds": round(oppu_s, 1), "gpu_hours": round(oppu_s / 3600, 4),
                              "storage_bytes": n * oppu_p * bytes_per}})
        print(f"  N={n}{'' if measured else ' (extrapolated)'}: MTA {mta_s:.0f}s, OPPU {oppu_s:.0f}s", flush=True)
    result = {
        "benchmark": "scalability", "device": name, "gpus": 1, "torch": torch.__version__, "model": b.shape,
        "settings": {"history_items": b.history_items, "prompt_tokens": b.prompt_tokens, "mta_variant": b.variants[0],
                     "bank": asdict(cfg.bank), "adapt": asdict(cfg.adapt), "oppu": asdict(cfg.oppu),
                     "anchors_per_user": b.anchors, "storage_dtype": "bfloat16"},
        "per_unit": {"oppu_s_per_user": round(oppu_per_user, 3), "bank_s_per_anchor": round(bank_per_anchor, 3),
                     "mta_s_per_user": round(mta_per_user, 3),
                     "peak_gpu_gib": {"oppu": round(oppu_peak / 2 ** 30, 2), "bank": round(bank_peak / 2 ** 30, 2),
                                      "mta": round(mta_peak / 2 ** 30, 2)},
                     "params_per_user": {"mta_stacked": stacked, "oppu": oppu_p}, "params_per_anchor": anchor_p},
        "measured_end_to_end": {"users": n_small, "mta_bank_s": round(small_bank, 1),
                                "mta_users_s": round(small_users, 1), "oppu_s": round(small_oppu, 1)},
        "curve": rows,
        "note": "rows with measured=false are extrapolated: anchors x bank_s_per_anchor + N x mta_s_per_user "
                "(MTA), N x oppu_s_per_user (OPPU); per-unit costs measured in this run on this device",
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scalability-{_slug(b.shape)}-{_slug(name)}"
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    plot_scalability(result, out / f"{stem}.png")
    save_resolved(cfg, out, "bench-scalability")
    print(f"  -> {out / stem}.json/.png", flush=True)
    return result


def plot_scalability(result: dict[str, Any], path: Path) -> None:
    """Two panels like the paper's Figure 2: time vs users and storage vs users (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["curve"]
    n = [r["users"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, scale, label in ((axes[0], "gpu_hours", 1.0, "GPU-hours"),
                                  (axes[1], "storage_bytes", 1 / 2 ** 30, "storage (GiB)")):
        for method, color in (("mta", "tab:blue"), ("oppu", "tab:red")):
            y = [r[method][key] * scale for r in rows]
            ax.plot(n, y, color=color, label=method.upper())
            for x, v, r in zip(n, y, rows):
                ax.scatter([x], [v], color=color, facecolors=color if r["measured"] else "none", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("users personalised")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"MTA vs OPPU, {result['model']} on {result['device']} (filled: measured, hollow: extrapolated)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
