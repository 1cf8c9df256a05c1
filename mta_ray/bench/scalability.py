"""``mta-ray bench scalability CONFIG``: GPU-hours and storage to personalise N users, per system (Figure 2).

Run: ``mta-ray bench scalability configs/bench/scalability-8b.yaml --out bench/results``
(``bench.systems=[...]`` picks systems, ``bench.prompt_lengths=[512, 250]`` the example lengths,
``bench.study_report=results/lamp2/profiles`` labels the Pareto plot with LaMP-2 accuracy).

Systems (``bench.systems``), all on this device with the 8B shape (random bf16 weights: the real speed)
and LaMP-2-like users (``bench.history_items`` examples of one prompt length each):

- ``oppu``: OPPU as its code runs: one user at a time with plain PEFT, its recipe (``oppu:``),
  measured over ``bench.baseline_users`` users;
- ``oppu-multislot``: the same recipe on our multi-slot trainer (the engine's gain apart from the method's);
- MTA profiles (:mod:`mta_ray.core.profiles`): the stacked adapter of each profile on the multi-slot
  trainer, over ``bench.users`` users, each with a frozen merged branch of ``bench.anchors`` anchors;
  ``mta-merged-only`` trains nothing: its per-user cost is retrieval (top-K cosine) and the merge.
- Every MTA system carries the bank: its anchors trained once (``bank:``), measured for N = ``bench.users``
  (with ``bank.anchor_data: cluster`` the anchors train on all items of their ``bench.bank_users`` users).

Each system's N = its measured users is measured whole (``"measured": true``); other N in
``bench.scalability_users`` are extrapolated from the measured per-user and per-bank-item seconds.
Storage is counted from the adapters' shapes in bf16 (the store's format), plus K anchor ids and weights
per MTA user. Measurements are kept in ``<out>/<stem>.partial.json`` as they finish: a rerun (after a
time-out) measures only what is missing; delete it to measure afresh. ``bench.replot=true`` redraws the
result files in ``--out`` (with ``bench.study_report``'s labels) without a model or device.
Writes ``scalability-<shape>-<device>-p<tokens>.json``, ``.png`` (time and storage vs users) and
``-pareto.png`` (GPU-hours per 1,000 users vs storage per user) per prompt length.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mta_ray.bench.common import (build_model, device_name, host, lora_params, measure, random_anchors, run_baseline,
                                  synthetic_jobs, target_shapes, Variant)
from mta_ray.config import Config, LoraTrainConfig, with_values
from mta_ray.core.adaptive import AnchorRetriever
from mta_ray.core.lora import LoraPair, merge_delta, merge_params
from mta_ray.core.profiles import ANCHOR_RECORD_BYTES, bf16_twin, profile
from mta_ray.core.quant import stored_bytes
from mta_ray.engine.trainer import Job
from mta_ray.files.atomic import atomic_write_text, slug

BYTES_PER_PARAM = 2
"""Adapters are stored in bf16."""
PEFT, MULTISLOT = "oppu", "oppu-multislot"
PARETO_USERS = 1000


@dataclass
class _Bench:
    """The model under test and how each system's users are made and timed."""

    cfg: Config
    device: str
    variant: Variant
    _model: Any = None

    @property
    def model(self) -> Any:
        """Built on first use: a rerun whose measurements are all kept needs no model (nor a GPU)."""
        if self._model is None:
            self._model = build_model(self.cfg, self.device)
            if self.variant.checkpointing:
                self._model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return self._model

    @property
    def merged_rank(self) -> int:
        """Rank of a user's merged branch: the bank's rank (params space) or K x it (delta space)."""
        return self.cfg.bank.rank * (1 if self.cfg.merge.space == "params" else self.cfg.bench.anchors)

    def jobs(self, n: int, offset: int, merged: bool, items: int = 0) -> list[Job]:
        return synthetic_jobs(self.model, self.cfg, n, offset, merged=merged, items=items,
                              space=self.cfg.merge.space)

    def anchor_loras(self) -> list:
        return random_anchors(self.model, self.cfg)

    def peft_cost(self, train: LoraTrainConfig, jobs: list[Job]) -> tuple[float, int]:
        """(seconds, peak bytes) of one user at a time with plain PEFT (OPPU's code)."""
        _, sec, peak = measure(lambda: run_baseline(self.model, jobs, train, self.device), self.device)
        return sec, peak

    def trainer_cost(self, train: LoraTrainConfig, jobs: list[Job], merged_rank: int) -> tuple[float, int]:
        """(seconds, peak bytes) of training ``jobs`` in the multi-slot trainer."""
        trainer = self.variant.trainer(self.model, train, merged_rank=merged_rank, seed=self.cfg.seed,
                                       max_rows=self.cfg.adapt.max_rows, merged_targets=self.cfg.bank.target_modules)
        try:
            _, sec, peak = measure(lambda: trainer.run(jobs), self.device)
        finally:
            trainer.close()
            for p in self.model.parameters():
                p.grad = None
        return sec, peak


def run_scalability(cfg: Config, out: Path) -> list[dict[str, Any]]:
    """Every prompt length of ``bench.prompt_lengths``: measure, extrapolate, write JSON and plots."""
    b = cfg.bench
    labels = quality_labels(b.study_report) if b.study_report else {}
    if b.replot:
        return replot(cfg, out, labels)
    device, name = device_name()
    bench = _Bench(cfg, device, Variant.parse(b.variants[0]))
    try:
        return [_one_length(bench, cfg, n, name, out, labels) for n in (b.prompt_lengths or [b.prompt_tokens])]
    finally:
        if bench.variant.checkpointing and bench._model is not None:
            bench.model.gradient_checkpointing_disable()


def replot(cfg: Config, out: Path, labels: dict[str, Any]) -> list[dict[str, Any]]:
    """``bench.replot``: the result files already in ``out`` with the curve and Pareto recomputed from their
    measurements (quality labels from ``bench.study_report``; the bank's size from ``bench.bank_users`` and
    ``bank.anchor_data``, which only scale the measured per-item cost) and every plot redrawn; no model,
    no device."""
    from mta_ray.errors import InputError

    paths = sorted(p for p in out.glob(f"scalability-{slug(cfg.bench.shape)}-*-p*.json")
                   if not p.name.endswith(".partial.json"))
    if not paths:
        raise InputError(str(out), f"bench.replot: no scalability-{slug(cfg.bench.shape)}-*-p*.json results here")
    results = []
    for path in paths:
        result = json.loads(path.read_text())
        at = with_values(cfg, {"bench.prompt_tokens": result["settings"]["prompt_tokens"]})
        result["settings"].update(bank_users=at.bench.bank_users, bank=asdict(at.bank))
        result["curve"] = build_curve(at, result["bank"], result["systems"])  # bench.bank_users, bank.anchor_data
        result["pareto"] = pareto(at, result["bank"], result["systems"], labels)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        plot_scalability(result, path.with_suffix(".png"))
        plot_pareto(result, path.with_name(path.stem + "-pareto.png"))
        print(f"  -> {path} (replotted)", flush=True)
        results.append(result)
    return results


def _one_length(bench: _Bench, cfg: Config, tokens: int, device: str, out: Path,
                labels: dict[str, Any]) -> dict[str, Any]:
    """Every system at one prompt length; the result JSON and plots are rewritten after each system, so a
    machine taken back mid-run leaves a usable result of what it measured (and the cache to resume)."""
    cfg = with_values(cfg, {"bench.prompt_tokens": tokens})
    bench.cfg, b = cfg, cfg.bench
    print(f"bench scalability: {device}, model {b.shape}, {b.history_items} items x {tokens} tokens, "
          f"variant {b.variants[0]}, systems {b.systems}", flush=True)
    stem = f"scalability-{slug(b.shape)}-{slug(device)}-p{tokens}"
    cache = _Cache(out / f"{stem}.partial.json", _settings_hash(cfg, device))
    if not cache.has("bank") or any(not cache.has(s) for s in b.systems):
        _warm_up(bench)
    bank = cache.get("bank", lambda: measure_bank(bench))
    systems: dict[str, dict] = {}
    result: dict[str, Any] = {}
    for s in b.systems:
        twin = bf16_twin(s) if s not in (PEFT, MULTISLOT) else s
        if twin not in (s, None) and cache.has(twin):  # trains exactly like its twin: only storage differs
            systems[s] = cache.get(s, lambda s=s, twin=twin: {**cache.data[twin], "timing_from": twin,
                                                               **_storage(bench, s)})
        else:
            systems[s] = cache.get(s, lambda s=s: measure_system(bench, s))
        result = _write_result(cfg, tokens, device, bank, systems, labels, out / stem)
    print(f"  -> {out / stem}.json/.png/-pareto.png", flush=True)
    return result


def _write_result(cfg: Config, tokens: int, device: str, bank: dict[str, Any], systems: dict[str, dict],
                  labels: dict[str, Any], stem: Path) -> dict[str, Any]:
    """The result of the systems measured so far: JSON, Figure-2 plot and Pareto plot at ``stem``."""
    b = cfg.bench
    result = {
        "benchmark": "scalability", "device": device, "host": host(), "gpus": 1, "torch": torch.__version__,
        "model": b.shape,
        "settings": {"history_items": b.history_items, "prompt_tokens": tokens, "target_tokens": b.target_tokens,
                     "variant": b.variants[0], "anchors_per_user": b.anchors, "merge_space": cfg.merge.space,
                     "bank_users": b.bank_users, "bank": asdict(cfg.bank), "adapt": asdict(cfg.adapt),
                     "oppu": asdict(cfg.oppu), "storage_dtype": "bfloat16"},
        "bank": bank, "systems": systems, "curve": build_curve(cfg, bank, systems),
        "pareto": pareto(cfg, bank, systems, labels),
        "note": "per system, the row at its measured users is measured whole (bank included for MTA systems); "
                "other rows (measured=false) are bank_s_per_item x bank items(N) + N x s_per_user. Storage: "
                "adapter shapes in bf16 + K anchor ids and weights per MTA user + the bank once.",
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.with_name(stem.name + ".json"), json.dumps(result, indent=1) + "\n")
    plot_scalability(result, stem.with_name(stem.name + ".png"))
    plot_pareto(result, stem.with_name(stem.name + "-pareto.png"))
    return result


class _Cache:
    """Finished measurements of one settings hash, kept as they finish (a rerun resumes)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.data = data.get("measurements", {}) if data.get("settings") == key else {}

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, make: Any) -> dict[str, Any]:
        if name not in self.data:
            self.data[name] = make()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"settings": self.key, "measurements": self.data}) + "\n")
        else:
            print(f"  {name}: measured earlier ({self.path.name})", flush=True)
        return self.data[name]


def _settings_hash(cfg: Config, device: str) -> str:
    b = asdict(cfg.bench)
    for volatile in ("systems", "scalability_users", "study_report", "prompt_lengths", "memory_users", "gpu_counts",
                     "replot"):
        b.pop(volatile)
    adapt = asdict(cfg.adapt)
    adapt.pop("lora_kernel")  # not what runs: bench.variants names the trainer's kernel
    payload = {"device": device, "bench": b, "bank": asdict(cfg.bank), "adapt": adapt,
               "oppu": asdict(cfg.oppu), "merge": asdict(cfg.merge), "seed": cfg.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _warm_up(bench: _Bench) -> None:
    """Untimed: compile the fused kernels for every row shape the systems use (the stacked adapter's, the
    bank's batch 1, OPPU's batch 16 in groups of ``adapt.max_rows``), fill the allocator, load PEFT's code."""
    cfg, s = bench.cfg, bench.variant.slots
    bench.trainer_cost(cfg.adapt, bench.jobs(s, 50_000, merged=True, items=2), bench.merged_rank)
    bench.trainer_cost(cfg.bank, bench.jobs(s, 51_000, merged=False, items=2), 0)
    if MULTISLOT in cfg.bench.systems:
        bench.trainer_cost(cfg.oppu, bench.jobs(s, 52_000, merged=False), 0)  # its real groups of rows
    if PEFT in cfg.bench.systems:
        bench.peft_cost(cfg.oppu, bench.jobs(1, 40_000, merged=False))


def bank_items(cfg: Config, n: int) -> tuple[int, int]:
    """(anchors, history items they train on) of the bank for ``n`` users: one anchor per cluster, trained
    on its own history or on its cluster's pooled histories (every item of ``bench.bank_users`` users)."""
    k = min(cfg.bank.num_clusters, n)
    if cfg.bank.anchor_data == "own":
        return k, k * cfg.bench.history_items
    pool = n if cfg.bench.bank_users == 0 else min(n, cfg.bench.bank_users)
    return k, max(pool, k) * cfg.bench.history_items


def measure_bank(bench: _Bench) -> dict[str, Any]:
    """The bank for N = ``bench.users`` users, trained whole on the multi-slot trainer."""
    cfg = bench.cfg
    n = cfg.bench.users
    k, items = bank_items(cfg, n)
    per_anchor = math.ceil(items / k)
    sec, peak = bench.trainer_cost(cfg.bank, bench.jobs(k, 60_000, merged=False, items=per_anchor), 0)
    print(f"  bank: {k} anchors x {per_anchor} items in {sec:.1f}s", flush=True)
    return {"users": n, "anchors": k, "items": k * per_anchor, "seconds": round(sec, 2),
            "s_per_item": sec / (k * per_anchor), "peak_gpu_gib": round(peak / 2 ** 30, 2),
            "params_per_anchor": lora_params(bench.model, cfg.bank.target_modules, cfg.bank.rank)}


def measure_system(bench: _Bench, name: str) -> dict[str, Any]:
    """One system's users measured whole: seconds, per-user seconds, peak memory, per-user storage."""
    cfg = bench.cfg
    if name in (PEFT, MULTISLOT):
        train, n, merged = cfg.oppu, (cfg.bench.baseline_users if name == PEFT else cfg.bench.users), False
    else:
        train, n, merged = with_values(cfg, profile(name).values).adapt, cfg.bench.users, True
    size = _storage(bench, name)
    params = size["params_per_user"]
    jobs = bench.jobs(n, 100_000, merged=merged)
    if name == PEFT:
        sec, peak = bench.peft_cost(train, jobs)
    elif name == MULTISLOT or profile(name).trains:
        sec, peak = bench.trainer_cost(train, jobs, bench.merged_rank if merged else 0)
    else:
        sec, peak = measure_merge(bench, jobs)
    print(f"  {name}: {n} users in {sec:.1f}s ({sec / n:.3f} s/user)", flush=True)
    recipe = {k: getattr(train, k) for k in ("rank", "alpha", "target_modules", "epochs", "lr", "batch_size",
                                             "grad_accum")}
    return {"kind": "peft" if name == PEFT else "multislot" if params else "merge", "users": n,
            "seconds": round(sec, 4), "s_per_user": sec / n, "peak_gpu_gib": round(peak / 2 ** 30, 2),
            "recipe": recipe if params else {}, "mta": name not in (PEFT, MULTISLOT), **size}


def _storage(bench: _Bench, name: str) -> dict[str, Any]:
    """A system's per-user storage: its adapter's values at its precision, plus K anchor records for MTA."""
    cfg = bench.cfg
    if name in (PEFT, MULTISLOT):
        train, precision, record, trains = cfg.oppu, "bfloat16", 0, True
    else:
        p = profile(name)
        train = with_values(cfg, p.values).adapt
        precision, record, trains = train.storage_precision, cfg.bench.anchors * ANCHOR_RECORD_BYTES, p.trains
    if not trains:
        return {"params_per_user": 0, "bytes_per_user": record, "storage_precision": None}
    params = lora_params(bench.model, train.target_modules, train.rank)
    components = train.rank * len(target_shapes(bench.model, train.target_modules))
    return {"params_per_user": params, "storage_precision": precision,
            "bytes_per_user": stored_bytes(params, components, precision) + record}


def measure_merge(bench: _Bench, jobs: list[Job]) -> tuple[float, int]:
    """Merged-only's per-user work: top-K anchors by cosine (the pipeline's retriever), their weights, and the
    merged LoRA built on the device (what serving the user needs; the store keeps only ids and weights)."""
    cfg, dev = bench.cfg, bench.device
    rng = np.random.default_rng(7)
    k_bank = min(cfg.bank.num_clusters, cfg.bench.users)
    retriever = AnchorRetriever([f"a{i}" for i in range(k_bank)], rng.standard_normal((k_bank, 384)),
                                cfg.bench.anchors, cfg.merge.min_similarity, cfg.merge.fixed_alpha)
    users = rng.standard_normal((len(jobs), 384)).astype(np.float32)
    anchor = bench.anchor_loras()
    bank = [{nm: LoraPair(p.A.to(dev), p.B.to(dev)) for nm, p in a.items()} for a in anchor]
    merge = merge_params if cfg.merge.space == "params" else merge_delta

    def work() -> None:
        for emb in users:
            ids, weights = retriever(emb)
            merge([bank[int(a[1:]) % len(bank)] for a in ids], weights)

    _, sec, peak = measure(work, dev)
    return sec, peak


def build_curve(cfg: Config, bank: dict[str, Any], systems: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per N: each system's seconds, GPU-hours and storage; measured at its own measured users."""
    ns = sorted(set(cfg.bench.scalability_users) | {s["users"] for s in systems.values()})
    rows = []
    for n in ns:
        k, items = bank_items(cfg, n)
        bank_s = bank["seconds"] if n == bank["users"] else bank["s_per_item"] * items
        bank_bytes = k * bank["params_per_anchor"] * BYTES_PER_PARAM
        row: dict[str, Any] = {"users": n, "anchors": k, "bank_items": items, "bank_s": round(bank_s, 1),
                               "systems": {}}
        for name, s in systems.items():
            measured = n == s["users"] and (not s["mta"] or n == bank["users"])
            users_s = s["seconds"] if n == s["users"] else n * s["s_per_user"]
            sec = users_s + (bank_s if s["mta"] else 0.0)
            row["systems"][name] = {"seconds": round(sec, 1), "gpu_hours": round(sec / 3600, 5),
                                    "storage_bytes": n * s["bytes_per_user"] + (bank_bytes if s["mta"] else 0),
                                    "measured": measured}
        rows.append(row)
        print(f"  N={n}: " + ", ".join(f"{nm} {v['gpu_hours']:.3f} GPU-h" for nm, v in row["systems"].items()),
              flush=True)
    return rows


def pareto(cfg: Config, bank: dict[str, Any], systems: dict[str, dict], labels: dict[str, Any]) -> dict[str, Any]:
    """Per system at 1,000 users: GPU-hours, storage per user (bank shared out), against OPPU's code, with
    its LaMP-2 quality where a study report was given; and whether it meets the issue's cost target."""
    (row,) = build_curve_quiet(cfg, bank, systems, PARETO_USERS)
    ref = row["systems"].get(PEFT)
    points = {}
    for name, v in row["systems"].items():
        p = {"gpu_hours_per_1000_users": v["gpu_hours"] * 1000 / PARETO_USERS,
             "storage_bytes_per_user": v["storage_bytes"] / PARETO_USERS, "quality": labels.get(name)}
        if ref and systems[name]["mta"]:
            p["gpu_vs_oppu"] = v["gpu_hours"] / ref["gpu_hours"]
            p["storage_vs_oppu"] = v["storage_bytes"] / ref["storage_bytes"]
            p["meets_cost_target"] = p["gpu_vs_oppu"] <= 1.0 and p["storage_vs_oppu"] <= 0.5
        points[name] = p
    return {"users": PARETO_USERS, "points": points,
            "target": "no more GPU-hours than OPPU as its code runs and at most half its storage (bank included)"}


def build_curve_quiet(cfg: Config, bank: dict[str, Any], systems: dict[str, dict], n: int) -> list[dict]:
    """The curve's row for ``n`` users alone (extrapolated unless ``n`` was measured), without printing."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        rows = build_curve(with_values(cfg, {"bench.scalability_users": [n]}), bank, systems)
    return [r for r in rows if r["users"] == n]


def quality_labels(path: str) -> dict[str, dict[str, Any]]:
    """{system: {metric, value, ci95}} from a study's ``profiles.json`` (or the folder holding it), paper
    protocol; OPPU's quality labels both OPPU systems (same recipe)."""
    from mta_ray.errors import InputError

    p = Path(path)
    p = p / "profiles.json" if p.is_dir() else p
    try:
        protocols = json.loads(p.read_text())["protocols"]
        pr = protocols.get("paper") or next(iter(protocols.values()))
        out = {name: {"metric": pr["metric"], "value": r["metrics"][pr["metric"]], "ci95": r["ci95"][pr["metric"]],
                      "not_below_paper": r.get("not_below_paper")} for name, r in pr["systems"].items()}
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        raise InputError(str(p), "bench.study_report: not a study's profiles.json (mta-ray study with "
                                 "study.profiles)") from None
    if "oppu" in out:
        out[MULTISLOT] = out["oppu"]
    return out


# --------------------------------------------------------------------------- plots

def _colors(names: list[str]) -> dict[str, Any]:
    """OPPU red and orange; MTA systems from tab20 without those (16 distinct colours)."""
    import matplotlib

    palette = [c for j, c in enumerate(matplotlib.colormaps["tab20"].colors) if j not in (2, 3, 6, 7)]
    mta = [n for n in names if n not in (PEFT, MULTISLOT)]
    return {n: ("tab:red" if n == PEFT else "tab:orange" if n == MULTISLOT else palette[mta.index(n) % len(palette)])
            for n in names}


def plot_scalability(result: dict[str, Any], path: Path) -> None:
    """Two panels like the paper's Figure 2: GPU-hours vs users and storage vs users (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["curve"]
    n = [r["users"] for r in rows]
    names = list(rows[0]["systems"])
    colors = _colors(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, scale, label in ((axes[0], "gpu_hours", 1.0, "GPU-hours"),
                                  (axes[1], "storage_bytes", 1 / 2 ** 30, "storage (GiB)")):
        for name in names:
            y = [max(r["systems"][name][key] * scale, 1e-12) for r in rows]
            ax.plot(n, y, color=colors[name], label=name, linestyle="--" if name.startswith("oppu") else "-")
            for x, v, r in zip(n, y, rows):
                m = r["systems"][name]["measured"]
                ax.scatter([x], [v], color=colors[name], facecolors=colors[name] if m else "none", zorder=3, s=14)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("users personalised")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"{result['model']}, {result['settings']['prompt_tokens']}-token items, {result['device']} "
                 "(filled: measured, hollow: extrapolated; MTA systems include the bank)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(result: dict[str, Any], path: Path) -> None:
    """GPU-hours per 1,000 users against storage per user, each point labelled with its quality (95% CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["pareto"]["points"]
    colors = _colors(list(points))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    offsets = [(5, 4, "left"), (5, -12, "left"), (-5, 6, "right"), (-5, -12, "right")]  # neighbours stay legible
    for i, (name, p) in enumerate(points.items()):
        x, y = p["gpu_hours_per_1000_users"], max(p["storage_bytes_per_user"], 1.0)
        ax.scatter([x], [y], color=colors[name], s=40, zorder=3, marker="s" if name.startswith("oppu") else "o")
        q = p.get("quality")
        text = name + (f" {q['value']:.3f} [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]" if q else "")
        dx, dy, ha = offsets[i % len(offsets)]
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=6, color=colors[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(0.2)
    ax.set_xlabel(f"GPU-hours per {result['pareto']['users']:,} users (MTA: bank included)")
    ax.set_ylabel("storage per user, bytes (bank shared out)")
    quality = next((p["quality"] for p in points.values() if p.get("quality")), None)
    ax.set_title(f"Cost and quality, {result['model']}, {result['settings']['prompt_tokens']}-token items"
                 + (f"; labels: LaMP-2 {quality['metric']} [95% CI]" if quality else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
