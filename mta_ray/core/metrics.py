"""LaMP metrics exactly as the benchmark defines them.

- Classification (LaMP-1/2): accuracy and macro-F1 over the task's label set;
  a prediction outside the label set is wrong (label -1) and every label of the
  set counts in the macro average, also one that never occurs.
- Regression (LaMP-3): MAE and RMSE; an unparsable prediction is scored as
  whichever of 1 or 5 is farther from the gold.
- Generation (LaMP-4/5): mean ROUGE-1 and ROUGE-L F-measure (rouge-score, stemming).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mta_ray.core.tasks import Task


def classification_scores(preds: Sequence[str], golds: Sequence[str],
                          labels: Sequence[str]) -> dict[str, float]:
    index = {label: i for i, label in enumerate(labels)}
    p = np.array([index.get(x.strip(), -1) for x in preds])
    g = np.array([index.get(x.strip(), -1) for x in golds])
    f1s = []
    for c in range(len(labels)):
        tp = float(np.sum((p == c) & (g == c)))
        fp = float(np.sum((p == c) & (g != c)))
        fn = float(np.sum((p != c) & (g == c)))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {"accuracy": float(np.mean(p == g)) if len(g) else 0.0, "f1": float(np.mean(f1s))}


def rating_value(pred: str, gold: str) -> float:
    """The score a LaMP-3 prediction counts as: its integer 1..5, else the 1-or-5 penalty."""
    text = pred.strip()
    if text in {"1", "2", "3", "4", "5"}:
        return float(text)
    g = float(gold)
    return 1.0 if abs(1 - g) > abs(5 - g) else 5.0


def regression_scores(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    y = np.array([float(g) for g in golds])
    yhat = np.array([rating_value(p, g) for p, g in zip(preds, golds)])
    err = yhat - y
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(math.sqrt(np.mean(err ** 2)))}


_SCORER = None


def generation_scores(preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    r1, rl = [], []
    for p, g in zip(preds, golds):
        s = _SCORER.score(g, p)
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return {"rouge1": float(np.mean(r1)) if r1 else 0.0, "rougeL": float(np.mean(rl)) if rl else 0.0}


def score(task: Task, preds: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """The task's LaMP metrics for parsed predictions against golds."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} golds")
    if task.kind == "classification":
        return classification_scores(preds, golds, task.labels)
    if task.kind == "regression":
        return regression_scores(preds, golds)
    return generation_scores(preds, golds)


HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "mae": False, "rmse": False,
                    "rouge1": True, "rougeL": True}

PRIMARY = {"classification": "accuracy", "regression": "mae", "generation": "rouge1"}


def primary_metric(task: Task) -> str:
    """The metric a task's methods are ranked and compared by (LaMP's first metric of the task)."""
    return PRIMARY[task.kind]
