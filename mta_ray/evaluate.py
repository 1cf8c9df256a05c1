"""Stage ``evaluate``: LaMP metrics for MTA and the baselines through the same prompts and machinery.

Methods (``eval.methods``): ``base`` (no training, RAG prompt with
``data.history_k`` items), ``rag_k1/3/5`` (BM25 top-k history in the prompt),
``oppu`` (a per-user LoRA from scratch), ``adapt_only`` (stacked adapter on the
bare base), ``merged_only`` (merged anchors, no stacked adapter) and ``mta``.
Each row of a generation batch uses its own user's adapters. 95% intervals
come from a bootstrap over users; ``comparisons`` holds paired bootstrap
differences of MTA against every other method on the same users.

Run: ``mta-ray evaluate configs/demo.yaml --out runs/demo`` (after ``personalize``).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, save_resolved, to_dict
from .fsutil import atomic_write_text
from .metrics import HIGHER_IS_BETTER, score
from .personalize import KINDS, store_dir
from .store import AdapterStore
from .tasks import get_task

RAG_K = {"rag_k1": 1, "rag_k3": 3, "rag_k5": 5}


def required_kinds(cfg: Config) -> list[str]:
    """Methods that evaluate per-user adapters are named after the personalize kind that trains them."""
    return [m for m in cfg.eval.methods if m in KINDS]


def _requests(cfg: Config, out: Path, method: str, users: list[dict], plan: dict,
              label: str | None = None, rows: dict | None = None) -> list[dict[str, Any]]:
    task = get_task(cfg.data.task)
    k = RAG_K.get(method, cfg.data.history_k)
    store = store_dir(out, label or method)
    if rows is None:
        rows = AdapterStore(store).rows_by_user() if method in KINDS else {}
    reqs = []
    for ui, u in enumerate(users):
        for q in u["queries"]:
            r: dict[str, Any] = {"user": ui, "gold": q["gold"],
                                 "prompt": task.query_prompt(q["input"], u["history"], k)}
            if method in ("mta", "merged_only"):
                r["anchors"], r["weights"] = plan[u["user_id"]]
            if method in KINDS:  # a user whose training failed falls back to the bare base
                row = rows.get(u["user_id"])
                if row is not None and row["status"] == "ok":
                    r["store"], r["row"] = str(store), row
            reqs.append(r)
    return reqs


def predict(cfg: Config, out: Path, method: str, users: list[dict], plan: dict, workers: list,
            label: str | None = None, bank_dir: Path | None = None,
            rows: dict | None = None) -> tuple[list[dict], list[str]]:
    """Requests (one per query, in user order) and the workers' raw answers for one method.

    ``label``: the adapter store of a study variant (default: the method's own); ``bank_dir``: the
    bank that merged methods draw anchors from (default: the workers'); ``rows``: the store's index
    rows by user, when the caller already read them (batched evaluation).
    """
    import ray

    reqs = _requests(cfg, out, method, users, plan, label, rows)
    targets = (cfg.oppu.target_modules if method == "oppu"
               else sorted(set(cfg.adapt.target_modules) | set(cfg.bank.target_modules)))
    shares = [reqs[i::len(workers)] for i in range(len(workers))]
    bank = str(bank_dir) if bank_dir else None
    outs = ray.get([w.generate.remote(s, targets, cfg, bank) for w, s in zip(workers, shares) if s])
    texts: list[str] = [""] * len(reqs)
    for wi, o in enumerate(outs):
        for j, t in enumerate(o):
            texts[wi + j * len(workers)] = t
    return reqs, texts


def user_resamples(users_of: np.ndarray, n_users: int, samples: int, seed: int) -> list[np.ndarray]:
    """Bootstrap over users: each resample draws n_users users with replacement, with all their queries."""
    rng = np.random.default_rng(seed)
    by_user = [np.flatnonzero(users_of == u) for u in range(n_users)]
    return [np.concatenate([by_user[u] for u in rng.integers(0, n_users, n_users)]) for _ in range(samples)]


def bootstrap(task, users_of: np.ndarray, preds: list[str], golds: list[str], n_users: int, samples: int,
              seed: int) -> dict[str, list[float]]:
    draws: dict[str, list[float]] = {}
    for idx in user_resamples(users_of, n_users, samples, seed):
        for name, v in score(task, [preds[i] for i in idx], [golds[i] for i in idx]).items():
            draws.setdefault(name, []).append(v)
    return draws


def run_evaluate(cfg: Config, out: Path, timing: dict | None = None, workers: list | None = None) -> dict:
    """Every method of ``eval.methods`` on every user's queries; ``workers``: an existing pool to use.

    Users stream from the users table in batches of ``eval.users_per_batch`` (with their anchors, from
    the embeddings beside it); what is kept for the metrics is each query's answer and gold.
    """
    from .bank import BANK_DIR
    from .personalize import iter_pending
    from .workers import worker_pool

    t0 = time.time()
    task = get_task(cfg.data.task)
    per_method: dict[str, tuple[list[str], list[str], Any]] = {m: ([], [], []) for m in cfg.eval.methods}
    examples: dict[str, list[dict]] = {}
    index = {m: AdapterStore(store_dir(out, m)).rows_by_user() for m in cfg.eval.methods if m in KINDS}
    users = (u for u in iter_pending(cfg, out, "mta", set(), out / BANK_DIR, ("user_id", "history", "queries"))
             if u["queries"])
    n_users = 0
    with worker_pool(cfg, out / BANK_DIR, workers) as workers:
        while batch := list(itertools.islice(users, cfg.eval.users_per_batch)):
            plan = {u["user_id"]: (u["anchors"], u["weights"]) for u in batch}
            for method in cfg.eval.methods:
                reqs, texts = predict(cfg, out, method, batch, plan, workers, rows=index.get(method))
                preds, golds, users_of = per_method[method]
                preds += [task.parse_output(t) for t in texts]
                golds += [r["gold"] for r in reqs]
                users_of += [n_users + r["user"] for r in reqs]
                examples.setdefault(method, [{"prompt_tail": r["prompt"][-160:], "output": t, "gold": r["gold"]}
                                             for r, t in zip(reqs[:3], texts[:3])])
            n_users += len(batch)
            print(f"evaluate: {n_users} users, {len(per_method[cfg.eval.methods[0]][0])} queries "
                  f"x {len(cfg.eval.methods)} methods, {time.time() - t0:.0f}s", flush=True)
    results: dict[str, dict] = {}
    for method, (preds, golds, users_of) in per_method.items():
        users_of = np.array(users_of)
        per_method[method] = (preds, golds, users_of)  # values only: safe while iterating
        draws = bootstrap(task, users_of, preds, golds, n_users, cfg.eval.bootstrap, cfg.seed)
        results[method] = {"metrics": score(task, preds, golds), "n": len(preds),
                           "ci95": {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                                    for k, v in draws.items()},
                           "examples": examples.get(method, [])}
        print(f"evaluate: {method}: {results[method]['metrics']}", flush=True)
    report = {"task": task.name, "config": to_dict(cfg), "methods": results,
              "comparisons": _comparisons(task, per_method, n_users, cfg),
              "timing": {**(timing or {}), "evaluate_s": round(time.time() - t0, 1)},
              "storage": storage(out)}
    report["verdict"] = _verdict(report)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report))
    save_resolved(cfg, out, "evaluate")
    return report


def primary_metric(task) -> str:
    return {"classification": "accuracy", "regression": "mae", "generation": "rouge1"}[task.kind]


def _comparisons(task, per_method: dict, n_users: int, cfg: Config) -> dict:
    """Paired bootstrap of the primary metric: MTA minus each other method, same users."""
    if "mta" not in per_method:
        return {}
    name = primary_metric(task)
    draws = user_resamples(per_method["mta"][2], n_users, cfg.eval.bootstrap, cfg.seed + 1)
    sign = 1 if HIGHER_IS_BETTER[name] else -1
    out = {}
    mp, mg, _ = per_method["mta"]
    for other, (op, og, _) in per_method.items():
        if other == "mta":
            continue
        diffs = [sign * (score(task, [mp[i] for i in d], [mg[i] for i in d])[name]
                         - score(task, [op[i] for i in d], [og[i] for i in d])[name]) for d in draws]
        point = sign * (score(task, mp, mg)[name] - score(task, op, og)[name])
        out[other] = {"metric": name, "mta_advantage": point,
                      "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
                      "p_not_better": float(np.mean(np.array(diffs) <= 0))}
    return out


def _verdict(report: dict) -> dict:
    comp = report["comparisons"]
    return {other: ("better" if c["mta_advantage"] > 0 else "not better") + (
        " (95% CI excludes 0)" if c["ci95"][0] > 0 else "") for other, c in comp.items()}


def storage(out: Path) -> dict:
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    s = {"bank_bytes": size(out / "bank")}
    for kind in ("mta", "adapt_only", "oppu"):
        d = store_dir(out, kind)
        if d.exists():
            n = len(AdapterStore(d).stored_users())
            s[f"{kind}_bytes"] = size(d)
            s[f"{kind}_bytes_per_user"] = size(d) // max(1, n)
    return s


def render_markdown(report: dict) -> str:
    methods = report["methods"]
    names = list(next(iter(methods.values()))["metrics"]) if methods else []
    lines = [f"# mta_ray report: {report['task']}", "",
             "| method | n | " + " | ".join(names) + " |", "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    for m, r in methods.items():
        cells = [f"{r['metrics'][k]:.4f} [{r['ci95'][k][0]:.3f}, {r['ci95'][k][1]:.3f}]" for k in names]
        lines.append(f"| {m} | {r['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Brackets: 95% bootstrap intervals over users.", ""]
    if report["comparisons"]:
        lines += ["## MTA against each method (paired bootstrap, same users)", "",
                  "| vs | metric | MTA advantage | 95% CI | verdict |", "| --- | --- | ---: | --- | --- |"]
        for other, c in report["comparisons"].items():
            lines.append(f"| {other} | {c['metric']} | {c['mta_advantage']:+.4f} | "
                         f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | {report['verdict'][other]} |")
        lines.append("")
    lines += ["## Timing (s)", "", *[f"- {k}: {v}" for k, v in report["timing"].items()], "",
              "## Storage (bytes)", "", *[f"- {k}: {v}" for k, v in report["storage"].items()], ""]
    return "\n".join(lines)
