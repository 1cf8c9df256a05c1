"""``mta-ray bench scalability CONFIG``: time, GPU-hours and storage to personalise N users, MTA vs OPPU.

Run: ``mta-ray bench scalability configs/bench/scalability-8b.yaml --out bench/results``

Measured on this device (8B-shaped model, LaMP-2-like users): OPPU's recipe one user at a time
(``bench.baseline_users`` users), the bank's per-anchor cost and MTA's per-user cost in the
multi-slot trainer (first variant of ``bench.variants``), and N = the smallest of
``bench.scalability_users`` end to end for both. Other N are extrapolated from those per-unit
costs and marked ``"measured": false``. Storage is counted from the adapters' shapes (bf16).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mta_ray.bench.common import (build_model, device_name, lora_params, measure, run_baseline, synthetic_jobs,
                                  variant_slots)
from mta_ray.config import Config, LoraTrainConfig
from mta_ray.engine.trainer import Job, MultiSlotTrainer
from mta_ray.files.atomic import atomic_write_text, slug

BYTES_PER_PARAM = 2
"""Adapters are stored in bf16."""


@dataclass
class _Bench:
    """The model under test and how each system's users are made and timed."""

    cfg: Config
    model: Any
    device: str
    slots: int
    fused: bool

    def plain_jobs(self, n: int, offset: int) -> list[Job]:
        """Users trained from the bare base (OPPU's users, the bank's anchors)."""
        return synthetic_jobs(self.model, self.cfg, n, offset, merged=False)

    def mta_jobs(self, n: int, offset: int) -> list[Job]:
        return synthetic_jobs(self.model, self.cfg, n, offset)

    def oppu_cost(self, jobs: list[Job]) -> tuple[float, int]:
        """(seconds, peak bytes) of OPPU as its code runs: one user at a time with plain PEFT."""
        _, sec, peak = measure(lambda: run_baseline(self.model, jobs, self.cfg.oppu, self.device), self.device)
        return sec, peak

    def trainer_cost(self, train: LoraTrainConfig, jobs: list[Job], merged_rank: int) -> tuple[float, int]:
        """(seconds, peak bytes) of training ``jobs`` in the multi-slot trainer."""
        trainer = MultiSlotTrainer(self.model, train, slots=self.slots, merged_rank=merged_rank, seed=self.cfg.seed,
                                   fused=self.fused, merged_targets=self.cfg.bank.target_modules)
        try:
            _, sec, peak = measure(lambda: trainer.run(jobs), self.device)
        finally:
            trainer.close()
            for p in self.model.parameters():
                p.grad = None
        return sec, peak


def run_scalability(cfg: Config, out: Path) -> dict[str, Any]:
    """Measure per-unit costs and the smallest N end to end; write ``scalability-<shape>-<device>.json/.png``."""
    device, name = device_name()
    b = cfg.bench
    slots, ckpt, fused = variant_slots(b.variants[0])
    bench = _Bench(cfg, build_model(cfg, device), device, slots, fused)
    print(f"bench scalability: {name}, model {b.shape}, {b.history_items} items x {b.prompt_tokens} tokens, "
          f"MTA variant {b.variants[0]}, N = {b.scalability_users}", flush=True)
    if ckpt:
        bench.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        per_unit = _per_unit_costs(bench)
        end_to_end = _smallest_end_to_end(bench, min(b.scalability_users))
    finally:
        if ckpt:
            bench.model.gradient_checkpointing_disable()
    result = {
        "benchmark": "scalability", "device": name, "gpus": 1, "torch": torch.__version__, "model": b.shape,
        "settings": {"history_items": b.history_items, "prompt_tokens": b.prompt_tokens, "mta_variant": b.variants[0],
                     "bank": asdict(cfg.bank), "adapt": asdict(cfg.adapt), "oppu": asdict(cfg.oppu),
                     "anchors_per_user": b.anchors, "storage_dtype": "bfloat16"},
        "per_unit": per_unit, "measured_end_to_end": end_to_end,
        "curve": _curve(cfg, bench.model, per_unit, end_to_end),
        "note": "rows with measured=false are extrapolated: anchors x bank_s_per_anchor + N x mta_s_per_user "
                "(MTA), N x oppu_s_per_user (OPPU); per-unit costs measured in this run on this device",
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = f"scalability-{slug(b.shape)}-{slug(name)}"
    atomic_write_text(out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    plot_scalability(result, out / f"{stem}.png")
    print(f"  -> {out / stem}.json/.png", flush=True)
    return result


def _per_unit_costs(bench: _Bench) -> dict[str, Any]:
    """Seconds per OPPU user, per anchor and per MTA user in steady state (after untimed warm-ups)."""
    cfg, b = bench.cfg, bench.cfg.bench
    merged_rank = b.anchors * cfg.bank.rank
    bench.oppu_cost(bench.plain_jobs(1, 40_000))  # warm-up
    oppu_sec, oppu_peak = bench.oppu_cost(bench.plain_jobs(b.baseline_users, 0))
    oppu_per_user = oppu_sec / b.baseline_users
    print(f"  OPPU: {oppu_per_user:.2f} s/user ({b.baseline_users} users)", flush=True)
    bench.trainer_cost(cfg.adapt, bench.mta_jobs(bench.slots, 50_000), merged_rank)  # warm-up (and compile)
    bench.trainer_cost(cfg.bank, bench.plain_jobs(bench.slots, 60_000), 0)
    bank_sec, bank_peak = bench.trainer_cost(cfg.bank, bench.plain_jobs(2 * bench.slots, 70_000), 0)
    n_mta = max(b.users, 2 * bench.slots)
    mta_sec, mta_peak = bench.trainer_cost(cfg.adapt, bench.mta_jobs(n_mta, 80_000), merged_rank)
    per_anchor, per_user = bank_sec / (2 * bench.slots), mta_sec / n_mta
    print(f"  bank: {per_anchor:.2f} s/anchor; MTA: {per_user:.2f} s/user (steady state)", flush=True)
    gib = 2 ** 30
    return {"oppu_s_per_user": round(oppu_per_user, 3), "bank_s_per_anchor": round(per_anchor, 3),
            "mta_s_per_user": round(per_user, 3),
            "peak_gpu_gib": {"oppu": round(oppu_peak / gib, 2), "bank": round(bank_peak / gib, 2),
                             "mta": round(mta_peak / gib, 2)},
            "params_per_user": {"mta_stacked": lora_params(bench.model, cfg.adapt.target_modules, cfg.adapt.rank),
                                "oppu": lora_params(bench.model, cfg.oppu.target_modules, cfg.oppu.rank)},
            "params_per_anchor": lora_params(bench.model, cfg.bank.target_modules, cfg.bank.rank)}


def _smallest_end_to_end(bench: _Bench, n: int) -> dict[str, Any]:
    """The smallest N measured whole: MTA's bank and users, and OPPU's users."""
    cfg = bench.cfg
    merged_rank = cfg.bench.anchors * cfg.bank.rank
    bank_s, _ = bench.trainer_cost(cfg.bank, bench.plain_jobs(min(cfg.bank.num_clusters, n), 90_000), 0)
    users_s, _ = bench.trainer_cost(cfg.adapt, bench.mta_jobs(n, 100_000), merged_rank)
    oppu_s, _ = bench.oppu_cost(bench.plain_jobs(n, 110_000))
    return {"users": n, "mta_bank_s": round(bank_s, 1), "mta_users_s": round(users_s, 1), "oppu_s": round(oppu_s, 1)}


def _curve(cfg: Config, model: Any, per_unit: dict[str, Any], end_to_end: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per N of ``bench.scalability_users``: measured for the smallest, extrapolated otherwise."""
    stacked, oppu_p = per_unit["params_per_user"]["mta_stacked"], per_unit["params_per_user"]["oppu"]
    anchor_p = per_unit["params_per_anchor"]
    rows = []
    for n in sorted(cfg.bench.scalability_users):
        k = min(cfg.bank.num_clusters, n)
        measured = n == end_to_end["users"]
        mta_s = (end_to_end["mta_bank_s"] + end_to_end["mta_users_s"] if measured
                 else k * per_unit["bank_s_per_anchor"] + n * per_unit["mta_s_per_user"])
        oppu_s = end_to_end["oppu_s"] if measured else n * per_unit["oppu_s_per_user"]
        rows.append({"users": n, "measured": measured, "anchors": k,
                     "mta": {"seconds": round(mta_s, 1), "gpu_hours": round(mta_s / 3600, 4),
                             "storage_bytes": (k * anchor_p + n * stacked) * BYTES_PER_PARAM},
                     "oppu": {"seconds": round(oppu_s, 1), "gpu_hours": round(oppu_s / 3600, 4),
                              "storage_bytes": n * oppu_p * BYTES_PER_PARAM}})
        print(f"  N={n}{'' if measured else ' (extrapolated)'}: MTA {mta_s:.0f}s, OPPU {oppu_s:.0f}s", flush=True)
    return rows


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
