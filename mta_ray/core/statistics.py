"""Statistics over users: bootstrap resamples, 95% intervals, paired tests (evaluate and the study share them).

A resample draws the users with replacement and keeps all of each drawn user's queries, so the
intervals account for queries of one user being alike. Paired tests score two methods on the same
resamples; ``p_not_better`` is the share of resamples where the first does not beat the second (a
one-sided bootstrap p-value).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def user_index(user_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """Each query's user as an integer (users in sorted order) and the number of users."""
    index = {u: i for i, u in enumerate(sorted(set(user_ids)))}
    return np.array([index[u] for u in user_ids], dtype=np.int64), len(index)


def user_resamples(users_of: np.ndarray, n_users: int, samples: int, seed: int) -> list[np.ndarray]:
    """Query indices of each bootstrap resample: ``n_users`` users drawn with replacement, all their queries."""
    rng = np.random.default_rng(seed)
    users_of = np.asarray(users_of)
    by_user = [np.flatnonzero(users_of == u) for u in range(n_users)]
    empty = np.zeros(0, dtype=np.int64)
    return [np.concatenate([by_user[u] for u in rng.integers(0, n_users, n_users)] or [empty])
            for _ in range(samples)]


def interval95(values: Sequence[float]) -> list[float]:
    """The central 95% of ``values`` (percentile interval)."""
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [2.5, 97.5])
    return [float(lo), float(hi)]


def draws(score: Callable[[np.ndarray], dict[str, float]], resamples: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Each metric of ``score(query indices)`` over every resample."""
    per = [score(idx) for idx in resamples]
    return {k: np.array([m[k] for m in per]) for k in (per[0] if per else {})}


def paired(draws_a: np.ndarray, draws_b: np.ndarray, point_a: float, point_b: float,
           higher_is_better: bool) -> dict[str, float | list[float]]:
    """a minus b, signed so that positive means a is better: the point difference, its 95% interval over
    the shared resamples, and the share of resamples where a is not better."""
    sign = 1.0 if higher_is_better else -1.0
    diffs = sign * (np.asarray(draws_a) - np.asarray(draws_b))
    return {"advantage": float(sign * (point_a - point_b)), "ci95": interval95(diffs),
            "p_not_better": float(np.mean(diffs <= 0))}
