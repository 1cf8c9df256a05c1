"""Stage ``evaluate``: LaMP metrics for MTA and the baselines through the same prompts and machinery.

Methods (``eval.methods``): ``base`` (no training, RAG prompt with
``data.history_k`` items), ``rag_k1/3/5`` (BM25 top-k history in the prompt),
``oppu`` (a per-user LoRA from scratch), ``adapt_only`` (stacked adapter on the
bare base), ``merged_only`` (merged anchors, no stacked adapter) and ``mta``.
Each row of a generation batch uses its own user's adapters. Every answer is
parsed and scored once and written, with its scores, to ``predictions/<method>.parquet``
as its batch finishes; the report is built from those files alone (rebuild:
``--report-only``). 95% intervals come from a bootstrap over users
(:mod:`mta_ray.core.statistics`: resampled per-user sums); ``comparisons`` holds
paired bootstrap differences of MTA against every other method on the same users.

Run: ``mta-ray evaluate configs/demo.yaml --out runs/demo`` (after ``personalize``).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mta_ray.config import Config, to_dict
from mta_ray.core.methods import PROPOSED, TRAINED, method
from mta_ray.core.metrics import query_scores
from mta_ray.core.progress import Progress
from mta_ray.core.statistics import UserBootstrap, method_stats
from mta_ray.core.tasks import Task, get_task
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.chart import write_chart
from mta_ray.files.layout import RunLayout, bank_retriever, read_manifest
from mta_ray.files.losses import CURVE_USERS, iter_losses, loss_curves_png
from mta_ray.files.predictions import PredictionsWriter, first_rows, n_users, score_blocks
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
            r: dict[str, Any] = {"user": ui, "gold": q["gold"], "query_id": q.get("id", ""),
                                 "prompt": task.query_prompt(q["input"], u["history"], k)}
            if m.merges:
                r["anchors"], r["weights"] = plan[u["user_id"]]
            if m.trained:  # a user without an adapter is missing (the runner refuses or reports it), never the base
                row = rows.get(u["user_id"])
                if row is not None and row["status"] == "ok":
                    r["store"], r["row"] = str(store), row
                else:
                    r["missing"] = True
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
    texts = ["" if r.get("missing") else t for r, t in zip(reqs, texts)]  # no base model in its place
    return reqs, texts


def run_evaluate(cfg: Config, out: Path, workers: list | None = None, timing: dict | None = None) -> dict:
    """Every method of ``eval.methods`` on every user's queries; ``workers``: an existing pool to use;
    ``timing``: the earlier stages' seconds, reported beside evaluate's own.

    Users stream from the users table in batches of ``eval.users_per_batch`` (with their anchors, from
    the embeddings beside it); each batch's answers and per-query scores go straight to the method's
    predictions file, and the report is built from those files (:func:`build_report`).
    """
    t0 = time.time()
    task = get_task(cfg.data.task)
    queries = _predict_to_files(cfg, out, workers, task)
    return build_report(cfg, out, {**(timing or {}), "evaluate_generation_s": round(time.time() - t0, 1),
                                   "evaluate_queries": queries}, t0)


def _predict_to_files(cfg: Config, out: Path, workers: list | None, task: Task) -> int:
    """Answer every query with every method, writing ``predictions/<method>.parquet`` as batches finish.
    Returns the number of queries (per method)."""
    from mta_ray.engine.workers import worker_pool

    run = RunLayout(out)
    index = {m: AdapterStore(run.store(m)).index() for m in cfg.eval.methods if method(m).trained}
    retrieve = bank_retriever(cfg, run.bank) if any(method(m).merges for m in cfg.eval.methods) else None
    users = (u for u in iter_users_with_anchors(run.users, run.embeddings, retrieve,
                                                columns=("user_id", "history", "queries")) if u["queries"])
    progress = Progress("evaluate", "queries", _count_queries(run) * len(cfg.eval.methods))
    writers = {m: PredictionsWriter(run.predictions(m), task) for m in cfg.eval.methods}
    n_users = n_queries = 0
    try:
        with worker_pool(cfg, run.bank, workers) as pool:
            while batch := list(itertools.islice(users, cfg.eval.users_per_batch)):
                plan = {u["user_id"]: (u["anchors"], u["weights"]) for u in batch}
                for m in cfg.eval.methods:
                    rows = _rows_of(index[m], plan) if m in index else None
                    reqs, texts = predict(cfg, out, m, batch, plan, pool, rows=rows)
                    writers[m].write(_columns(task, batch, reqs, texts, n_users))
                    progress.add(len(reqs), note=f"{m} done for users {n_users}..{n_users + len(batch) - 1}")
                n_users += len(batch)
                n_queries += len(reqs)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    return n_queries


def _count_queries(run: RunLayout) -> int:
    """Queries in the users table, read a row group at a time (the progress line's total)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    f = pq.ParquetFile(run.users)
    return sum(int(pc.sum(pc.list_value_length(b.column(0))).as_py() or 0) for b in f.iter_batches(columns=["queries"]))


def _rows_of(index, plan: dict) -> dict[str, dict]:
    """The store's index rows of a batch's users (the index stays an Arrow table; a batch's rows become dicts)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    picked = index.filter(pc.is_in(index.column("user_id"), value_set=pa.array(list(plan), pa.string())))
    return {r["user_id"]: r for r in picked.to_pylist()}


def _columns(task: Task, batch: list[dict], reqs: list[dict], texts: list[str], first_user: int) -> dict[str, Any]:
    """A batch's rows of a predictions file: who, which query, the answer, its parse, gold and scores."""
    preds = [task.parse_output(t) for t in texts]
    golds = [r["gold"] for r in reqs]
    return {"user_index": [first_user + r["user"] for r in reqs], "user_id": [batch[r["user"]]["user_id"] for r in reqs],
            "query_id": [r["query_id"] for r in reqs], "output": texts, "prediction": preds, "gold": golds,
            **query_scores(task, preds, golds)}


def build_report(cfg: Config, out: Path, timing: dict | None = None, t0: float | None = None) -> dict:
    """``report.json`` and ``report.md`` (and the loss curves' PNG) from the predictions files alone.

    Run: ``mta-ray evaluate CONFIG --out DIR --report-only`` rebuilds them without Ray or a model.
    """
    t_stats = time.time()
    run = RunLayout(out)
    task = get_task(cfg.data.task)
    paths = {m: run.predictions(m) for m in cfg.eval.methods}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise InputError(missing[0], "no predictions file: run `mta-ray evaluate` (without --report-only)")
    report = {"task": task.name, "config": to_dict(cfg), **statistics_from_files(cfg, task, paths),
              "timing": dict(timing or {}), "storage": storage(out)}
    report["timing"]["statistics_s"] = round(time.time() - t_stats, 1)
    if t0 is not None:
        report["timing"]["evaluate_s"] = round(time.time() - t0, 1)
    report["verdict"] = _verdict(report)
    report["plots"] = [run.loss_curves_png.name] if _loss_plot(cfg, run, task.name) else []
    atomic_write_text(run.report_json, json.dumps(report, indent=1) + "\n")
    atomic_write_text(run.report_md, render_markdown(report))
    write_chart(report, run.root)
    return report


def _loss_plot(cfg: Config, run: RunLayout, title: str) -> bool:
    """The loss-curve PNG: the bank's anchors and every evaluated trained method (the first
    :data:`CURVE_USERS` users of each store; a user retrained after a kill counts once, its last run)."""
    curves = {"bank anchors": [np.asarray(a["losses"]) for a in read_manifest(run.bank)["anchors"] if a.get("losses")]}
    for m in cfg.eval.methods:
        if method(m).trained:
            curves[m] = list(dict(iter_losses(run.store(m), CURVE_USERS)).values())
    return loss_curves_png(curves, run.loss_curves_png, f"{title}: training loss per optimizer step")


def statistics_from_files(cfg: Config, task: Task, paths: dict[str, Path], block_users: int | None = None) -> dict[str, Any]:
    """Each method's metrics with 95% bootstrap intervals over users, and MTA's paired comparisons with
    every other method on the same resamples, streamed from the predictions files a block of
    ``block_users`` users at a time (default: :class:`UserBootstrap`'s)."""
    users = {m: n_users(p) for m, p in paths.items()}
    if len(set(users.values())) > 1:
        raise InputError(str(next(iter(paths.values())).parent), f"predictions files disagree on the users: {users}")
    boot = UserBootstrap(max(users.values(), default=0), cfg.eval.bootstrap, cfg.seed, block_users)
    stats = method_stats(task, boot, score_blocks(task, paths, boot))
    results = {m: {"metrics": stats.point[m], "n": stats.n[m], "ci95": stats.ci95(m),
                   "examples": first_rows(p)} for m, p in paths.items()}
    for m in results:
        print(f"evaluate: {m}: {results[m]['metrics']}", flush=True)
    comparisons = {}
    if PROPOSED in paths:
        for other in paths:
            if other != PROPOSED:
                t = stats.paired(PROPOSED, other)
                comparisons[other] = {"metric": t["metric"], "mta_advantage": t["advantage"], "ci95": t["ci95"],
                                      "p_not_better": t["p_not_better"]}
    return {"methods": results, "comparisons": comparisons, "n_users": boot.n_users}


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
    if report.get("plots"):
        lines += ["## Training loss", "", "Window loss per optimizer step across users (median, 25-75% and "
                  "10-90% bands).", "", *[f"![{p}]({p})" for p in report["plots"]], ""]
    return "\n".join(lines)
