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
from typing import Any, Callable

import numpy as np

from mta_ray.config import Config, to_dict
from mta_ray.core.methods import PROPOSED, TRAINED, method
from mta_ray.core.metrics import HIGHER_IS_BETTER, primary_metric, score
from mta_ray.core.statistics import draws, interval95, paired, user_resamples
from mta_ray.core.tasks import Task, get_task
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.chart import write_chart
from mta_ray.files.layout import RunLayout, bank_retriever
from mta_ray.files.store import AdapterStore
from mta_ray.files.tables import iter_users_with_anchors


def required_kinds(cfg: Config) -> list[str]:
    """The evaluated methods with per-user adapters (each trained by ``personalize --kind <method>``)."""
    return [m for m in cfg.eval.methods if method(m).trained]


def _requests(cfg: Config, out: Path, name: str, users: list[dict], plan: dict,
              label: str | None = None, rows: dict | None = None) -> list[dict[str, Any]]:
    task = get_task(cfg.data.task)
    m = method(name)
    k = m.rag_k if m.rag_k is not None else cfg.data.history_k
    store = RunLayout(out).store(label or name)
    if rows is None:
        rows = AdapterStore(store).rows_by_user() if m.trained else {}
    reqs = []
    for ui, u in enumerate(users):
        for q in u["queries"]:
            r: dict[str, Any] = {"user": ui, "gold": q["gold"],
                                 "prompt": task.query_prompt(q["input"], u["history"], k)}
            if m.merges:
                r["anchors"], r["weights"] = plan[u["user_id"]]
            if m.trained:  # a user whose training failed falls back to the bare base
                row = rows.get(u["user_id"])
                if row is not None and row["status"] == "ok":
                    r["store"], r["row"] = str(store), row
            reqs.append(r)
    return reqs


def generation_targets(cfg: Config, name: str) -> list[str]:
    """The modules a method's adapters sit on in generation: OPPU's own, else the bank's and the stacked
    adapter's together."""
    if method(name).recipe == "oppu":
        return list(cfg.oppu.target_modules)
    return sorted(set(cfg.adapt.target_modules) | set(cfg.bank.target_modules))


def predict(cfg: Config, out: Path, method_name: str, users: list[dict], plan: dict, workers: list,
            label: str | None = None, bank_dir: Path | None = None,
            rows: dict | None = None) -> tuple[list[dict], list[str]]:
    """Requests (one per query, in user order) and the workers' raw answers for one method.

    ``label``: the adapter store of a study variant (default: the method's own); ``bank_dir``: the
    bank that merged methods draw anchors from (default: the workers'); ``rows``: the store's index
    rows by user, when the caller already read them (batched evaluation).
    """
    import ray

    reqs = _requests(cfg, out, method_name, users, plan, label, rows)
    targets = generation_targets(cfg, method_name)
    shares = [reqs[i::len(workers)] for i in range(len(workers))]
    bank = str(bank_dir) if bank_dir else None
    outs = ray.get([w.generate.remote(s, targets, cfg, bank) for w, s in zip(workers, shares) if s])
    texts: list[str] = [""] * len(reqs)
    for wi, o in enumerate(outs):
        for j, t in enumerate(o):
            texts[wi + j * len(workers)] = t
    return reqs, texts


class _Answers:
    """What evaluate keeps per method: each query's parsed answer, gold and user, and three examples."""

    def __init__(self) -> None:
        self.preds: list[str] = []
        self.golds: list[str] = []
        self.users: list[int] = []
        self.examples: list[dict] = []

    def add(self, task: Task, reqs: list[dict], texts: list[str], first_user: int) -> None:
        self.preds += [task.parse_output(t) for t in texts]
        self.golds += [r["gold"] for r in reqs]
        self.users += [first_user + r["user"] for r in reqs]
        if not self.examples:
            self.examples = [{"prompt_tail": r["prompt"][-160:], "output": t, "gold": r["gold"]}
                             for r, t in zip(reqs[:3], texts[:3])]

    def scorer(self, task: Task) -> Callable[[np.ndarray], dict[str, float]]:
        return lambda idx: score(task, [self.preds[i] for i in idx], [self.golds[i] for i in idx])


def run_evaluate(cfg: Config, out: Path, workers: list | None = None, timing: dict | None = None) -> dict:
    """Every method of ``eval.methods`` on every user's queries; ``workers``: an existing pool to use;
    ``timing``: the earlier stages' seconds, reported beside evaluate's own.

    Users stream from the users table in batches of ``eval.users_per_batch`` (with their anchors, from
    the embeddings beside it); what is kept for the metrics is each query's answer and gold.
    """
    t0 = time.time()
    task = get_task(cfg.data.task)
    answers = _generate_answers(cfg, out, workers, task, t0)
    n_users = 1 + max((u for a in answers.values() for u in a.users), default=-1)
    report = {"task": task.name, "config": to_dict(cfg), **_statistics(cfg, task, answers, n_users),
              "timing": {**(timing or {}), "evaluate_s": round(time.time() - t0, 1)},
              "storage": storage(out)}
    report["verdict"] = _verdict(report)
    run = RunLayout(out)
    atomic_write_text(run.report_json, json.dumps(report, indent=1) + "\n")
    atomic_write_text(run.report_md, render_markdown(report))
    write_chart(report, run.root)
    return report


def _generate_answers(cfg: Config, out: Path, workers: list | None, task: Task, t0: float) -> dict[str, _Answers]:
    from mta_ray.engine.workers import worker_pool

    run = RunLayout(out)
    answers = {m: _Answers() for m in cfg.eval.methods}
    index = {m: AdapterStore(run.store(m)).rows_by_user() for m in cfg.eval.methods if method(m).trained}
    retrieve = bank_retriever(cfg, run.bank) if any(method(m).merges for m in cfg.eval.methods) else None
    users = (u for u in iter_users_with_anchors(run.users, run.embeddings, retrieve,
                                                columns=("user_id", "history", "queries")) if u["queries"])
    n_users = 0
    with worker_pool(cfg, run.bank, workers) as pool:
        while batch := list(itertools.islice(users, cfg.eval.users_per_batch)):
            plan = {u["user_id"]: (u["anchors"], u["weights"]) for u in batch}
            for m in cfg.eval.methods:
                reqs, texts = predict(cfg, out, m, batch, plan, pool, rows=index.get(m))
                answers[m].add(task, reqs, texts, n_users)
            n_users += len(batch)
            print(f"evaluate: {n_users} users, {len(answers[cfg.eval.methods[0]].preds)} queries "
                  f"x {len(cfg.eval.methods)} methods, {time.time() - t0:.0f}s", flush=True)
    return answers


def _statistics(cfg: Config, task: Task, answers: dict[str, _Answers], n_users: int) -> dict[str, Any]:
    """Each method's metrics with 95% bootstrap intervals over users, and MTA's paired comparisons with
    every other method on the same resamples."""
    results: dict[str, dict] = {}
    all_draws: dict[str, dict[str, np.ndarray]] = {}
    for m, a in answers.items():
        resamples = user_resamples(np.array(a.users, dtype=np.int64), n_users, cfg.eval.bootstrap, cfg.seed)
        all_draws[m] = draws(a.scorer(task), resamples)
        results[m] = {"metrics": score(task, a.preds, a.golds), "n": len(a.preds),
                      "ci95": {k: interval95(v) for k, v in all_draws[m].items()}, "examples": a.examples}
        print(f"evaluate: {m}: {results[m]['metrics']}", flush=True)
    comparisons = {}
    if PROPOSED in answers:
        name = primary_metric(task)
        for other in answers:
            if other != PROPOSED:
                t = paired(all_draws[PROPOSED][name], all_draws[other][name], results[PROPOSED]["metrics"][name],
                           results[other]["metrics"][name], HIGHER_IS_BETTER[name])
                comparisons[other] = {"metric": name, "mta_advantage": t["advantage"], "ci95": t["ci95"],
                                      "p_not_better": t["p_not_better"]}
    return {"methods": results, "comparisons": comparisons}


def _verdict(report: dict) -> dict:
    comp = report["comparisons"]
    return {other: ("better" if c["mta_advantage"] > 0 else "not better") + (
        " (95% CI excludes 0)" if c["ci95"][0] > 0 else "") for other, c in comp.items()}


def storage(out: Path) -> dict:
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0

    run = RunLayout(out)
    s = {"bank_bytes": size(run.bank)}
    for kind in TRAINED:
        d = run.store(kind)
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
