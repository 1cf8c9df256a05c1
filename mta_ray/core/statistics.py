"""Statistics over users: bootstrap resamples, 95% intervals, paired tests (evaluate and the study share them).

A resample draws the users with replacement and keeps all of each drawn user's queries, so the
intervals account for queries of one user being alike. Paired tests score two methods on the same
resamples; ``p_not_better`` is the share of resamples where the first does not beat the second (a
one-sided bootstrap p-value).

Score once, resample cheaply: every metric is a function of per-user sums
(:func:`mta_ray.core.metrics.user_sums`), so a resample's metric is the metric of ``weights @ sums``,
where ``weights[u]`` is how often user u was drawn. Nothing is rescored. The weights are drawn for
chunks of consecutive users (:class:`UserBootstrap`): first how many of the n draws land in each chunk
(one multinomial), then which users of the chunk they hit. That is exactly n users drawn uniformly with
replacement, but only one block's weights exist at a time, so memory stays flat in users, and every
method sees the same weights (paired tests). Measured: 1,000,000 queries x 8 methods x 1,000 resamples
in about a minute on 2 busy CPU cores (``mta-ray bench evaluate``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mta_ray.core.metrics import HIGHER_IS_BETTER, metrics_from_sums, primary_metric, user_sums
from mta_ray.core.tasks import Task

WEIGHTS_PER_BLOCK = 1 << 19
"""Resample weights drawn at once (users per chunk x resamples): 4 MiB, small enough for the CPU's cache
(drawing them is several times faster than for chunks of 32 MiB); a block handed out is 8 chunks."""


def user_index(user_ids: Sequence[str]) -> tuple[np.ndarray, int]:
    """Each query's user as an integer (users in sorted order) and the number of users."""
    index = {u: i for i, u in enumerate(sorted(set(user_ids)))}
    return np.array([index[u] for u in user_ids], dtype=np.int64), len(index)


class UserBootstrap:
    """``samples`` resamples of ``n_users`` users drawn with replacement, handed out block by block.

    ``weights(j)`` is (users of block j, samples): how many times each user of the block is drawn in
    each resample. The draws are made per chunk of ``chunk_users`` users (a block is a few chunks): first
    how many of the n draws of each resample land in each chunk (one multinomial), then which users of the
    chunk they hit, seeded per chunk, so a chunk always gets the same weights.
    """

    CHUNKS_PER_BLOCK = 8

    def __init__(self, n_users: int, samples: int, seed: int, block_users: int | None = None):
        self.n_users, self.samples, self.seed = n_users, samples, seed
        chunk = max(1, WEIGHTS_PER_BLOCK // max(1, samples))
        if block_users is not None and block_users < chunk:
            chunk = block_users
        self.chunk_users = chunk
        self.block_users = max(chunk, (block_users or self.CHUNKS_PER_BLOCK * chunk) // chunk * chunk)
        starts = np.arange(0, n_users, chunk)
        self.chunk_sizes = np.minimum(chunk, n_users - starts)
        starts = np.arange(0, n_users, self.block_users)
        self.sizes = np.minimum(self.block_users, n_users - starts)
        rng = np.random.default_rng([seed, 0])
        self.draws = (rng.multinomial(n_users, self.chunk_sizes / n_users, size=samples) if n_users
                      else np.zeros((samples, 0), np.int64))  # (samples, chunks): draws landing in each chunk

    @property
    def n_blocks(self) -> int:
        return len(self.sizes)

    def block_of(self, user: np.ndarray) -> np.ndarray:
        return np.asarray(user) // self.block_users

    def weights(self, j: int) -> np.ndarray:
        per = self.block_users // self.chunk_users
        chunks = range(j * per, min((j + 1) * per, len(self.chunk_sizes)))
        return np.concatenate([self._chunk(c).astype(np.float32) for c in chunks])  # counts: exact in float32

    def _chunk(self, c: int) -> np.ndarray:
        size, B = int(self.chunk_sizes[c]), self.samples
        picks = np.random.default_rng([self.seed, 1, c]).integers(0, size, int(self.draws[:, c].sum()))
        owner = np.repeat(np.arange(B), self.draws[:, c])
        return np.bincount(picks * B + owner, minlength=size * B).reshape(size, B)


def resampled_sums(boot: UserBootstrap, blocks: Iterable[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray],
                                                                                           dict[str, np.ndarray]]:
    """Each method's summed sums over all users (k,) and over every resample (samples, k).

    ``blocks``: for each block of ``boot`` in order, method -> (users of the block, k) sums
    (:func:`mta_ray.core.metrics.user_sums`).
    """
    with _one_blas_thread():
        return _resampled_sums(boot, blocks)


def _resampled_sums(boot: UserBootstrap, blocks: Iterable[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray],
                                                                                            dict[str, np.ndarray]]:
    acc: dict[str, _Resampled] = {}
    seen = 0
    for j, block in enumerate(blocks):
        w = boot.weights(j)  # (L, samples)
        for m, sums in block.items():
            if sums.shape[0] != w.shape[0]:
                raise ValueError(f"block {j} of {m}: {sums.shape[0]} users, the bootstrap has {w.shape[0]}")
            acc.setdefault(m, _Resampled(boot.samples, sums.shape[1])).add(w, sums)
        seen += 1
    if seen != boot.n_blocks:
        raise ValueError(f"{seen} blocks of users for a bootstrap of {boot.n_blocks}")
    return {m: a.total for m, a in acc.items()}, {m: a.drawn() for m, a in acc.items()}


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Small products, many of them: BLAS threads only wait on each other (measured 10x slower with 2 threads
    on a busy 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class _Resampled:
    """One method's sums over every resample, ``w.T @ sums`` block after block.

    Users whose rows are equal are counted together: how often each distinct row is drawn per resample
    is accumulated (a classification user with one query has one of (labels + 1) x labels rows), and
    multiplied by the rows once at the end. Blocks with mostly distinct rows (ROUGE) multiply directly.
    """

    MAX_ROWS = 4096

    def __init__(self, samples: int, k: int):
        self.total = np.zeros(k)
        self.direct = np.zeros((samples, k))
        self.rows: dict[bytes, int] = {}
        self.row_list: list[np.ndarray] = []
        self.counts = np.zeros((0, samples))  # (distinct rows, samples)
        self.probe = np.random.default_rng(12345).standard_normal(k)

    def add(self, w: np.ndarray, sums: np.ndarray) -> None:
        from scipy import sparse

        self.total += sums.sum(axis=0)
        _, first, inv = np.unique(sums @ self.probe, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        if (2 * len(first) > len(inv) or len(self.rows) + len(first) > self.MAX_ROWS
                or not np.array_equal(sums[first][inv], sums)):
            self.direct += w.T @ sums.astype(w.dtype)  # a block's sums: float32 is plenty, totals stay float64
            return
        ids = np.array([self._row_id(sums[i]) for i in first])
        if len(self.rows) > len(self.counts):
            self.counts = np.vstack([self.counts, np.zeros((max(len(self.rows), 2 * len(self.counts)) - len(self.counts),
                                                            self.counts.shape[1]))])
        groups = sparse.csr_matrix((np.ones(len(inv), w.dtype), (inv, np.arange(len(inv)))), shape=(len(first), len(inv)))
        self.counts[ids] += groups @ w  # one pass over w: how often each distinct row is drawn

    def _row_id(self, row: np.ndarray) -> int:
        key = row.tobytes()
        if key not in self.rows:
            self.rows[key] = len(self.rows)
            self.row_list.append(row.copy())
        return self.rows[key]

    def drawn(self) -> np.ndarray:
        if not self.row_list:
            return self.direct
        return self.direct + self.counts[:len(self.row_list)].T @ np.array(self.row_list)


def interval95(values: Sequence[float]) -> list[float]:
    """The central 95% of ``values`` (percentile interval)."""
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [2.5, 97.5])
    return [float(lo), float(hi)]


def paired(draws_a: np.ndarray, draws_b: np.ndarray, point_a: float, point_b: float,
           higher_is_better: bool) -> dict[str, float | list[float]]:
    """a minus b, signed so that positive means a is better: the point difference, its 95% interval over
    the shared resamples, and the share of resamples where a is not better."""
    sign = 1.0 if higher_is_better else -1.0
    diffs = sign * (np.asarray(draws_a) - np.asarray(draws_b))
    return {"advantage": float(sign * (point_a - point_b)), "ci95": interval95(diffs),
            "p_not_better": float(np.mean(diffs <= 0))}


class MethodStats:
    """Point metrics, per-resample metric draws and 95% intervals of every method, from resampled sums."""

    def __init__(self, task: Task, totals: dict[str, np.ndarray], drawn: dict[str, np.ndarray]):
        self.task = task
        self.point = {m: {k: float(v) for k, v in metrics_from_sums(task, t).items()} for m, t in totals.items()}
        self.draws = {m: metrics_from_sums(task, d) for m, d in drawn.items()}
        self.n = {m: int(t[0]) for m, t in totals.items()}

    def ci95(self, m: str) -> dict[str, list[float]]:
        return {k: interval95(v) for k, v in self.draws[m].items()}

    def paired(self, a: str, b: str, metric: str | None = None) -> dict[str, Any]:
        """a minus b on ``metric`` (default: the task's primary), same resamples."""
        name = metric or primary_metric(self.task)
        return {"metric": name, **paired(self.draws[a][name], self.draws[b][name], self.point[a][name],
                                         self.point[b][name], HIGHER_IS_BETTER[name])}


def method_stats(task: Task, boot: UserBootstrap, blocks: Iterable[dict[str, Any]]) -> MethodStats:
    """:class:`MethodStats` of the methods whose per-user sums ``blocks`` streams (see :func:`resampled_sums`)."""
    return MethodStats(task, *resampled_sums(boot, blocks))


def blocks_in_memory(task: Task, boot: UserBootstrap, users: np.ndarray,
                     scores: dict[str, dict[str, np.ndarray]]) -> Iterator[dict[str, Any]]:
    """The per-user sums of each block for queries held in memory (``users``: each query's user number;
    ``scores``: method -> its per-query scores, queries in the same order for every method)."""
    users = np.asarray(users, dtype=np.int64)
    block = boot.block_of(users)
    order = np.argsort(block, kind="stable")
    bounds = np.searchsorted(block[order], np.arange(boot.n_blocks + 1))
    for j in range(boot.n_blocks):
        idx = order[bounds[j]:bounds[j + 1]]
        local = users[idx] - j * boot.block_users
        yield {m: user_sums(task, {k: np.asarray(v)[idx] for k, v in s.items()}, local, int(boot.sizes[j]))
               for m, s in scores.items()}
