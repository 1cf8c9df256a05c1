"""Benchmarks: ``mta-ray bench throughput CONFIG`` (GPU speed of per-user merge-then-adapt).

Run: ``mta-ray bench throughput configs/bench/throughput-8b.yaml --out bench/results``

It compares, in one process on one device with the same users:
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

import collections
import json
import re
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mta_ray.bench.common import (build_model, device_name, device_peak, host, measure, param_counts, run_baseline,
                                  sync, synthetic_jobs, Variant)
from mta_ray.config import Config, LoraTrainConfig
from mta_ray.engine.trainer import Job
from mta_ray.files.atomic import atomic_write_text, slug


def _flops(jobs: list[Job], train: LoraTrainConfig, n_body: int, n_head: int, layers: int, d: int,
           head_on_targets_only: bool) -> tuple[float, float, int]:
    """(model FLOPs by the 4N rule, FLOPs executed, tokens processed) for training ``jobs``: 4N per token for a
    frozen base of N matmul parameters (forward 2N, activation gradients 2N) plus causal attention."""
    model_flops = executed = 0.0
    tokens = 0
    for job in jobs:
        for e in job.examples:
            T = len(e.input_ids)
            attn = 6.0 * T * T * d * layers / 2  # causal
            model_flops += 4.0 * (n_body + n_head) * T + attn
            head_tokens = e.target_tokens if head_on_targets_only else T
            executed += 4.0 * n_body * T + 4.0 * n_head * head_tokens + attn
            tokens += T
    return model_flops * train.epochs, executed * train.epochs, tokens * train.epochs


def _figures(n_users: int, seconds: float, flops: tuple[float, float, int], peak_flops: float | None,
             peak_bytes: int) -> dict[str, Any]:
    model_flops, executed, tokens = flops
    out = {"users": n_users, "seconds": round(seconds, 3), "users_per_hour": round(n_users * 3600 / seconds, 1),
           "tokens_per_s": round(tokens / seconds, 1), "tflops_per_s": round(model_flops / seconds / 1e12, 2),
           "peak_gpu_gib": round(peak_bytes / 2 ** 30, 2)}
    if peak_flops:
        out["mfu"] = round(model_flops / seconds / peak_flops, 4)
        out["mfu_executed"] = round(executed / seconds / peak_flops, 4)
    return out


def run_throughput(cfg: Config, out: Path, profile: bool = False) -> dict[str, Any]:
    """Measure baseline and multi-slot variants; write ``throughput-<shape>.json`` in ``out``."""
    device, name = device_name()
    peak_flops = device_peak(name) if device == "cuda" else None
    b, train = cfg.bench, cfg.adapt
    model = build_model(cfg, device)
    n_body, n_head = param_counts(model)
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
    finals, sec, peak = measure(lambda: run_baseline(model, base_jobs, train, device), device)
    baseline = _figures(len(base_jobs), sec, _flops(base_jobs, *flop_args, head_on_targets_only=False),
                        peak_flops, peak)
    baseline["final_losses"] = [round(x, 4) for x in finals]
    print(f"  baseline (PEFT, one user at a time): {baseline}", flush=True)

    variants = []
    for v in b.variants:
        variants.append(_run_variant(model, cfg, device, Variant.parse(v), merged_rank, flop_args, peak_flops))
        print(f"  multi-slot {v}: {variants[-1]}", flush=True)
    ok = [x for x in variants if "error" not in x]
    best = max(ok, key=lambda x: x["users_per_hour"]) if ok else None
    fits = [x for x in ok if x["peak_gpu_gib"] <= b.memory_budget_gib] if device == "cuda" else []
    result = {
        "benchmark": "throughput", "device": name, "host": host(), "device_peak_bf16_flops": peak_flops,
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
    path = out / f"throughput-{slug(result['model'])}-{slug(name)}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")  # before profiling: a profile never costs it
    print(f"  speedup (best variant {result['best_variant']} vs baseline): {result['speedup_users_per_hour']}x "
          f"-> {path}", flush=True)
    if profile and best:
        _profile(model, cfg, device, Variant.parse(best["variant"]), merged_rank, out)
    return result


def _run_variant(model: Any, cfg: Config, device: str, variant: Variant, merged_rank: int,
                 flop_args: tuple, peak_flops: float | None) -> dict[str, Any]:
    b = cfg.bench
    trainer = None
    try:
        if variant.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        warm_up = synthetic_jobs(model, cfg, variant.slots, offset=20_000)  # made before the trainer wraps layers
        jobs = synthetic_jobs(model, cfg, max(b.users, 2 * variant.slots))
        trainer = variant.trainer(model, cfg.adapt, merged_rank=merged_rank, seed=cfg.seed,
                                  merged_targets=cfg.bank.target_modules)
        trainer.run(warm_up)  # one full round (and compile)
        results, sec, peak = measure(lambda: trainer.run(jobs), device)
        fig = _figures(len(jobs), sec, _flops(jobs, *flop_args, head_on_targets_only=True), peak_flops, peak)
        fig["failed_users"] = sum(r.status != "ok" for r in results)
        fig["mean_final_loss"] = round(sum(r.final_loss for r in results) / len(results), 4)
        return {**variant.describe(), **fig}
    except torch.OutOfMemoryError:
        return {**variant.describe(), "error": "out of memory"}
    except Exception as exc:  # a variant that fails (a kernel that does not compile here) is a result too
        traceback.print_exc()
        return {**variant.describe(), "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"}
    finally:
        if trainer is not None:
            trainer.close()
        if variant.checkpointing:
            model.gradient_checkpointing_disable()
        for p in model.parameters():
            p.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()


def _profile(model: Any, cfg: Config, device: str, variant: Variant, merged_rank: int, out: Path) -> None:
    """Where the time goes: torch.profiler tables of one round of the variant's users, written to
    ``profile.txt``: by op, by op and input shape, and by the lines of code that launched them."""
    from torch._C._profiler import _ExperimentalConfig
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if variant.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    jobs = synthetic_jobs(model, cfg, variant.slots, offset=30_000)  # made before the trainer wraps the layers
    trainer = variant.trainer(model, cfg.adapt, merged_rank=merged_rank, seed=cfg.seed,
                              merged_targets=cfg.bank.target_modules)
    try:  # verbose stacks: Python frames, so each op can be traced to the line that ran it
        with profile(activities=acts, record_shapes=True, with_stack=True,
                     experimental_config=_ExperimentalConfig(verbose=True)) as prof:
            trainer.run(jobs)
            sync(device)
        table, text = _profile_tables(prof, device)
        atomic_write_text(out / "profile.txt", text)
        print(table[:6000], flush=True)
    finally:
        trainer.close()
        if variant.checkpointing:
            model.gradient_checkpointing_disable()


def _profile_tables(prof: Any, device: str) -> tuple[str, str]:
    """(the op table, all three tables). The Python frames the stacks record are events of their own: left
    out, so the tables rank ops only."""
    from torch.autograd.profiler_util import EventList

    frames = {e.name for e in prof.events() if is_python_frame(e)}   # classified once, for all three tables

    def ops(averages: Any) -> EventList:
        return EventList([a for a in averages if a.key not in frames], use_device="cuda" if device == "cuda" else None)

    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    table = ops(prof.key_averages()).table(sort_by=key, row_limit=40)
    # the same ops by input shape: which layer's copy or matmul the time is (what the next kernel targets)
    by_shape = ops(prof.key_averages(group_by_input_shape=True)).table(sort_by=key, row_limit=60,
                                                                       max_shapes_column_width=100)
    return table, (table + "\n\nBy input shape:\n" + by_shape + "\n\nBy source:\n"
                   + by_source(prof, device, frames))


def by_source(prof: Any, device: str, python_frames: set[str], depth: int = 4, rows: int = 50) -> str:
    """Ops by the lines of code that launched them, by self time (which copy or elementwise kernel is whose).
    Object addresses are dropped from the frames so that one line is one row; the backward engine's own ops
    (gradient accumulation, copies between nodes) have no line of ours and are named by their autograd node.
    ``python_frames``: the names of the recorded Python frames' events (events too, not ops)."""
    from torch.autograd import DeviceType

    cuda = device == "cuda"
    totals: dict[tuple[str, str], list] = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != DeviceType.CPU or e.name in python_frames:
            continue  # Python frames are events too; kernels are counted in the op that launched them
        spent = e.self_device_time_total if cuda else e.self_cpu_time_total
        if spent > 0:
            where = " < ".join(re.sub(r" (object )?at 0x[0-9a-f]+", "", f) for f in (e.stack or [])[:depth])
            if "run_backward" in where.split(" < ")[0]:  # ops of the backward engine itself: name the node
                where = f"backward of {_autograd_node(e)}"
            totals[(e.name, where)][0] += spent
            totals[(e.name, where)][1] += 1
    whole = sum(t for t, _ in totals.values()) or 1.0
    unit = "self GPU" if cuda else "self CPU"
    lines = [f"{unit:>8} share  calls  op  <-  code (innermost first)"]
    for (name, where), (spent, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{spent / 1e3:9.1f}ms {spent / whole:6.1%} {calls:6d}  {name}  <-  {where or '(no frames)'}")
    return "\n".join(lines) + "\n"


# What a Python frame's event is called when the profiler does not say (older torch, e.g. 2.11, has no
# ``FunctionEvent.is_python_function``): ``path.py(123): fn``, ``<frozen runpy>(88): fn``,
# ``<built-in method ...>``, ``nn.Module: Linear_0``.
_PYTHON_FRAME = re.compile(r"^(?:.+\.py\(\d+\): |<[^>]*>\(\d+\): |<built-in |nn\.Module: )")


def is_python_frame(event: Any) -> bool:
    """Whether a profiler event is a recorded Python frame rather than an op."""
    flagged = getattr(event, "is_python_function", None)
    return bool(flagged) if flagged is not None else bool(_PYTHON_FRAME.match(event.name))


def _autograd_node(event: Any) -> str:
    """The autograd node (``MmBackward0``...) whose evaluation ran ``event``, or ``?``."""
    prefix = "autograd::engine::evaluate_function: "
    while event is not None and not event.name.startswith(prefix):
        event = event.cpu_parent
    return event.name[len(prefix):] if event is not None else "?"
