"""``mta-ray bench evaluate CONFIG``: time to build the report's statistics (CPU) for N queries x M methods.

Run: ``mta-ray bench evaluate configs/bench/evaluate.yaml --out bench/results``

For each task of ``bench.evaluate_tasks`` (a generation task: ROUGE-1/L; a classification task:
accuracy and macro-F1) and each N of ``bench.evaluate_queries``, synthetic predictions files are written
(``bench.evaluate_methods`` methods, ``bench.evaluate_queries_per_user`` queries per user, per-query
scores as evaluate writes them), then a fresh process builds the report's statistics from those files
(``stages.evaluate.statistics_from_files``: ``eval.bootstrap`` resamples over users, intervals for every
metric of every method, paired tests of the first method against the others). Measured: its seconds
(statistics only, not the interpreter's start) and its peak RSS (``ru_maxrss`` from ``wait4``).
Scoring the texts is not in the time: evaluate scores each query once, as its batch finishes; the
ROUGE rate is measured apart (``rouge_queries_per_s``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mta_ray.config import Config, load_config
from mta_ray.core.metrics import query_scores
from mta_ray.core.tasks import Task, get_task
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.predictions import PredictionsWriter

CHUNK = 250_000
"""Rows generated and written at a time."""


def method_names(n: int) -> list[str]:
    return ["mta"] + [f"m{i}" for i in range(1, n)]


def write_synthetic(task: Task, folder: Path, queries: int, methods: int, per_user: int, seed: int) -> dict[str, Path]:
    """Predictions files of ``methods`` methods on the same ``queries`` queries (method i is right less often
    the larger i). Scores are drawn directly (what :func:`query_scores` would give for such answers)."""
    paths = {}
    for i, m in enumerate(method_names(methods)):
        rng = np.random.default_rng([seed, i])
        w = PredictionsWriter(folder / f"{m}.parquet", task)
        for start in range(0, queries, CHUNK):
            n = min(CHUNK, queries - start)
            q = np.arange(start, start + n)
            w.write({"user_index": q // per_user, "user_id": (q // per_user).astype(str), "query_id": q.astype(str),
                     "output": np.full(n, "synthetic"), "prediction": np.full(n, "synthetic"),
                     "gold": np.full(n, "gold"), **_scores(task, rng, n, quality=0.7 - 0.05 * i)})
        w.close()
        paths[m] = w.path
    return paths


def _scores(task: Task, rng: np.random.Generator, n: int, quality: float) -> dict[str, np.ndarray]:
    if task.kind == "generation":
        r1 = rng.beta(2 * quality + 0.5, 2.5 - 2 * quality, n)
        return {"rouge1": r1, "rougeL": r1 * rng.uniform(0.8, 1.0, n)}
    if task.kind == "regression":
        err = np.where(rng.random(n) < quality, 0, rng.integers(-4, 5, n)).astype(np.float64)
        return {"abs_error": np.abs(err), "sq_error": err ** 2}
    C = len(task.labels)
    gold = rng.integers(0, C, n).astype(np.int16)
    pred = np.where(rng.random(n) < quality, gold, rng.integers(-1, C, n)).astype(np.int16)
    return {"correct": pred == gold, "pred_label": pred, "gold_label": gold}


def rouge_rate(pairs: int = 500) -> float:
    """Queries per second that ROUGE-1/L scoring (rouge-score, stemming) takes on this machine."""
    rng = np.random.default_rng(0)
    words = "neural personalised language models adapt to users with few examples and many tasks".split()
    preds = [" ".join(rng.choice(words, 8)) for _ in range(pairs)]
    golds = [" ".join(rng.choice(words, 10)) for _ in range(pairs)]
    t0 = time.perf_counter()
    query_scores(get_task("lamp4"), preds, golds)
    return pairs / (time.perf_counter() - t0)


def stats_child(config: str, overrides: list[str], folder: str, task_name: str) -> None:
    """In a fresh process: the report's statistics from ``folder``'s files; prints seconds as JSON."""
    from mta_ray.stages.evaluate import statistics_from_files

    cfg = load_config(config, overrides)
    task = get_task(task_name)
    paths = {m: Path(folder) / f"{m}.parquet" for m in method_names(cfg.bench.evaluate_methods)}
    t0 = time.perf_counter()
    out = statistics_from_files(cfg, task, paths)
    seconds = time.perf_counter() - t0
    first = next(iter(out["methods"].values()))
    print(json.dumps({"seconds": seconds, "n_users": out["n_users"], "first_method": first["metrics"],
                      "first_ci95": first["ci95"], "comparisons": len(out["comparisons"])}))


def run_evaluate_bench(cfg: Config, results_dir: Path, config_path: str, overrides: list[str]) -> list[dict[str, Any]]:
    b = cfg.bench
    results = []
    rouge = rouge_rate()
    for task_name in b.evaluate_tasks:
        task = get_task(task_name)
        for n in b.evaluate_queries:
            work = Path(tempfile.mkdtemp(prefix="mta-bench-evaluate-"))
            try:
                t0 = time.time()
                write_synthetic(task, work, n, b.evaluate_methods, b.evaluate_queries_per_user, cfg.seed)
                write_s = time.time() - t0
                print(f"bench evaluate: {task.kind} ({task.name}), {n} queries x {b.evaluate_methods} methods "
                      f"written in {write_s:.1f}s; statistics with {cfg.eval.bootstrap} resamples...", flush=True)
                row = _measure(task, work, n, cfg, config_path, overrides, write_s, rouge)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            results.append(row)
            path = results_dir / f"evaluate-{task.kind}-{n}.json"
            atomic_write_text(path, json.dumps(row, indent=1) + "\n")
            print(f"bench evaluate: {task.kind}: {row['seconds']:.1f}s, peak RSS {row['peak_rss_mib']:.0f} MiB "
                  f"-> {path}", flush=True)
    return results


def _measure(task: Task, work: Path, n: int, cfg: Config, config_path: str, overrides: list[str],
             write_s: float, rouge: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mta_ray.bench.evaluate", config_path, str(work), task.name, *overrides]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"bench evaluate: statistics failed: {err[-2000:]}")
    child = json.loads(out.strip().splitlines()[-1])
    b = cfg.bench
    return {"benchmark": "evaluate", "task_kind": task.kind, "task": task.name, "queries": n,
            "users": child["n_users"], "methods": b.evaluate_methods, "resamples": cfg.eval.bootstrap,
            "seconds": round(child["seconds"], 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "write_predictions_s": round(write_s, 1), "rouge_queries_per_s": round(rouge, 1),
            "machine": f"{os.cpu_count()} CPUs (shared with other jobs while measured)",
            "load_average_1m": round(os.getloadavg()[0], 1),
            "example_first_method": {"metrics": child["first_method"], "ci95": child["first_ci95"]},
            "note": "statistics only (per-query scores are computed once by evaluate as batches finish); "
                    "peak RSS of the process that builds them from the predictions files"}


if __name__ == "__main__":
    stats_child(sys.argv[1], sys.argv[4:], sys.argv[2], sys.argv[3])
