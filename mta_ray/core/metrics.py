"""LaMP metrics exactly as the benchmark defines them, scored once per query and summed per user.

- Classification (LaMP-1/2): accuracy and macro-F1 over the task's label set;
  a prediction outside the label set is wrong (label -1) and every label of the
  set counts in the macro average, also one that never occurs.
- Regression (LaMP-3): MAE and RMSE; an unparsable prediction is scored as
  whichever of 1 or 5 is farther from the gold.
- Generation (LaMP-4/5): mean ROUGE-1 and ROUGE-L F-measure (rouge-score, stemming).

Every metric is a function of a few sums over queries (counts, errors, confusion counts), so each
query is scored once (:func:`query_scores`), the scores are summed per user (:func:`user_sums`), and a
metric over any multiset of users is :func:`metrics_from_sums` of their summed rows: the bootstrap
(:mod:`mta_ray.core.statistics`) never rescores a query.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mta_ray.core.tasks import Task

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False, "rmse": False,
                    "rouge1": True, "rougeL": True}

PRIMARY = {"classification": "accuracy", "regression": "mae", "generation": "rouge1"}

SCORE_COLUMNS = {"classification": ("correct", "pred_label", "gold_label"),
                 "regression": ("abs_error", "sq_error"),
                 "generation": ("rouge1", "rougeL")}
"""The per-query score columns of each task kind (what the predictions files keep beside each answer)."""


def primary_metric(task: Task) -> str:
    """The metric a task's methods are ranked and compared by (LaMP's first metric of the task)."""
    return PRIMARY[task.kind]


# --------------------------------------------------------------------------- per-query scores

def label_index(texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Each text's label number (position in ``labels``), -1 outside the label set."""
    index = {label: i for i, label in enumerate(labels)}
    return np.array([index.get(x.strip(), -1) for x in texts], dtype=np.int16)


def rating_value(pred: str, gold: str) -> float:
    """The score a LaMP-3 prediction counts as: its integer 1..5, else the 1-or-5 penalty."""
    text = pred.strip()
    if text in {"1", "2", "3", "4", "5"}:
        return float(text)
    g = float(gold)
    return 1.0 if abs(1 - g) > abs(5 - g) else 5.0


_SCORER = None


def rouge_f(preds: Sequence[str], golds: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """ROUGE-1 and ROUGE-L F-measure of each prediction against its gold (rouge-score, stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = np.zeros(len(preds)), np.zeros(len(preds))
    for i, (p, g) in enumerate(zip(preds, golds)):
        s = _SCORER.score(g, p)
        r1[i], rl[i] = s["rouge1"].fmeasure, s["rougeL"].fmeasure
    return r1, rl


def query_scores(task: Task, preds: Sequence[str], golds: Sequence[str]) -> dict[str, np.ndarray]:
    """Each query's scores (columns :data:`SCORE_COLUMNS`), computed once."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} golds")
    if task.kind == "classification":
        return _classification_query_scores(preds, golds, task.labels)
    if task.kind == "regression":
        err = np.array([rating_value(p, g) for p, g in zip(preds, golds)]) - np.array([float(g) for g in golds])
        return {"abs_error": np.abs(err), "sq_error": err ** 2}
    r1, rl = rouge_f(preds, golds)
    return {"rouge1": r1, "rougeL": rl}


def _classification_query_scores(preds: Sequence[str], golds: Sequence[str],
                                 labels: Sequence[str]) -> dict[str, np.ndarray]:
    p, g = label_index(preds, labels), label_index(golds, labels)
    return {"correct": (p == g), "pred_label": p, "gold_label": g}


# --------------------------------------------------------------------------- sums per user

def n_sum_columns(task: Task) -> int:
    """Columns of a user's sums: the query count, then the kind's sums (classification: correct, then
    true positives, predictions and golds per label)."""
    return 2 + 3 * len(task.labels) if task.kind == "classification" else 3


def user_sums(task: Task, scores: dict[str, np.ndarray], users: np.ndarray, n_users: int) -> np.ndarray:
    """(n_users, :func:`n_sum_columns`) sums of the queries of each user (``users``: each query's user,
    0..n_users-1). Dense: callers sum a block of users at a time."""
    users = np.asarray(users, dtype=np.int64)
    if task.kind != "classification":
        a, b = SCORE_COLUMNS[task.kind]
        cols = [np.ones(len(users)), np.asarray(scores[a], np.float64), np.asarray(scores[b], np.float64)]
        return np.stack([np.bincount(users, weights=c, minlength=n_users) for c in cols], axis=1)
    C = len(task.labels)
    k = 2 + 3 * C
    p, g = np.asarray(scores["pred_label"], np.int64), np.asarray(scores["gold_label"], np.int64)
    correct = np.asarray(scores["correct"], bool)   # as LaMP counts it: also both outside the label set
    right = correct & (g >= 0)                       # a true positive of a label
    rows = np.concatenate([users, users[correct], users[right], users[p >= 0], users[g >= 0]])
    cols = np.concatenate([np.zeros(len(users), np.int64), np.ones(int(correct.sum()), np.int64), 2 + g[right],
                           2 + C + p[p >= 0], 2 + 2 * C + g[g >= 0]])
    return np.bincount(rows * k + cols, minlength=n_users * k).reshape(n_users, k).astype(np.float64)


def metrics_from_sums(task: Task, sums: np.ndarray) -> dict[str, np.ndarray]:
    """The task's metrics from summed user rows (``sums[..., k]``: any leading shape, e.g. one row per
    bootstrap resample)."""
    sums = np.asarray(sums, dtype=np.float64)
    n = sums[..., 0]
    per = lambda x: np.divide(x, n, out=np.zeros_like(x), where=n > 0)  # noqa: E731
    if task.kind == "regression":
        return {"mae": per(sums[..., 1]), "rmse": np.sqrt(per(sums[..., 2]))}
    if task.kind == "generation":
        return {"rouge1": per(sums[..., 1]), "rougeL": per(sums[..., 2])}
    C = len(task.labels)
    tp, pred, gold = sums[..., 2:2 + C], sums[..., 2 + C:2 + 2 * C], sums[..., 2 + 2 * C:2 + 3 * C]
    both = pred + gold  # F1 = 2 tp / (tp + fp + tp + fn); 0 where a label is never predicted nor gold
    f1 = np.divide(2 * tp, both, out=np.zeros_like(tp), where=both > 0)
    return {"accuracy": per(sums[..., 1]), "f1": f1.mean(axis=-1) if C else np.zeros_like(n)}


def total_sums(task: Task, scores: dict[str, np.ndarray]) -> np.ndarray:
    """All queries' sums as one row."""
    n = len(next(iter(scores.values()))) if scores else 0
    return user_sums(task, scores, np.zeros(n, np.int64), 1)[0]


def score(task: Task, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """The task's LaMP metrics for parsed predictions against golds."""
    sums = total_sums(task, query_scores(task, preds, golds))
    return {k: float(v) for k, v in metrics_from_sums(task, sums).items()}


# --------------------------------------------------------------------------- by kind (tests, callers without a Task)

def _kind_task(kind: str, labels: Sequence[str] = ()) -> Task:
    return Task(name=kind, kind=kind, profile_fields=("", ""), instruction="", history_line=str,  # type: ignore[arg-type]
                query_pattern="", max_new_tokens=1, labels=tuple(labels))


def classification_scores(preds: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    return score(_kind_task("classification", labels), preds, golds)


def regression_scores(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    return score(_kind_task("regression"), preds, golds)


def generation_scores(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    return score(_kind_task("generation"), preds, golds)
