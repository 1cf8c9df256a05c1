"""Stage ``personalize``: merge-then-adapt for every user on a pool of Ray workers.

For each user: top-K anchors by cosine of retrieval embeddings,
similarity-normalised weights, merge (``merge.space``), train the stacked
rank-r adapter with the base and the merged LoRA frozen — many users per
forward/backward in each worker. The same machinery trains the baselines'
per-user adapters (``adapt_only``: stacked adapter on the bare base;
``oppu``: a LoRA from scratch with OPPU's recipe).

Output: ``adapters/<kind>/`` — a sharded store (:mod:`mta_ray.files.store`).
Resumable: users already stored are skipped; each user is stored once.

Run: ``mta-ray personalize configs/demo.yaml --out runs/demo`` (after ``bank``).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from mta_ray.config import Config
from mta_ray.core.methods import method
from mta_ray.core.tasks import get_task
from mta_ray.core.progress import Progress
from mta_ray.files.layout import RunLayout, bank_retriever
from mta_ray.files.losses import LossLog
from mta_ray.files.store import AdapterStore
from mta_ray.files.tables import count_rows, iter_users_with_anchors, load_embeddings, task_negatives


def retrieval_plan(cfg: Config, out: Path, user_ids: list[str],
                   bank_dir: Path | None = None) -> dict[str, tuple[list[str], list[float]]]:
    """Each user's top-K anchors and merge weights (small user sets: studies)."""
    run = RunLayout(out)
    retrieve = bank_retriever(cfg, bank_dir or run.bank)
    emb = {r["user_id"]: r["retrieval_emb"]
           for r in load_embeddings(run.embeddings).select(["user_id", "retrieval_emb"]).to_pylist()}
    return {u: retrieve(emb[u]) for u in user_ids}


def chunk_size(remaining: int, slots: int, workers: int) -> int:
    """Users for the next call: at most half a slot-fill, and less near the end (half of each worker's
    remaining share), so workers run out of users together. Small calls cost no occupancy (a worker's
    continuous trainer refills its slots across calls) and come back soon (a call returns when its
    last user is trained), so the driver sees a worker's free room early."""
    return max(1, min(math.ceil(slots / 2), math.ceil(remaining / (2 * workers))))


def queued_users(slots: int) -> int:
    """Users a worker holds queued or in training before it is sent more: its slots plus one refill,
    so its trainer never waits for the driver, and no worker hoards users the others could take."""
    return 2 * max(1, slots)


@dataclass
class _Progress:
    """Users finished and failed so far, and the log line with rate and ETA."""

    kind: str
    expected: int
    finished: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        self.log = Progress(f"personalize[{self.kind}]", "users", self.expected)

    def book(self, status: str) -> None:
        self.finished += 1
        self.failed += status != "ok"

    def report(self) -> None:
        self.log.done = self.finished
        self.log.add(0, note=f"{self.failed} failed" if self.failed else "")


def run_personalize(cfg: Config, out: Path, kind: str = "mta", workers: list | None = None,
                    label: str | None = None, bank_dir: Path | None = None) -> dict:
    """Train ``kind`` adapters for every user not yet stored in ``adapters/<label or kind>``.

    ``workers``: an existing pool to reuse (studies); by default a pool is started and stopped here.
    ``bank_dir``: the bank to merge from (default ``<out>/bank``). Users stream from the users table
    in small calls to the least loaded worker, each worker holding about two slot-fills
    (:func:`queued_users`; its trainer never waits for the driver); the driver holds at most those
    users, never the whole table.
    """
    from mta_ray.engine.workers import worker_pool

    t0 = time.time()
    run = RunLayout(out)
    merges = method(kind).merges
    bank_dir = bank_dir or run.bank
    store = AdapterStore(run.store(label or kind), cfg.adapt.shard_users)  # workers return adapters packed at their precision
    removed = store.repair()
    if removed:
        print(f"personalize[{kind}]: removed what no index refers to from {store.path}: {', '.join(removed)}", flush=True)
    done = store.finished_users()  # stored ok, or failed MAX_ATTEMPTS times; other failed users train again
    retried = len(store.stored_users() - done)
    if retried:
        print(f"personalize[{kind}]: retrying {retried} users whose training failed before", flush=True)
    pending = iter_users_with_anchors(run.users, run.embeddings, bank_retriever(cfg, bank_dir) if merges else None,
                                      skip=done)
    first = next(pending, None)
    if first is None:
        return {"kind": kind, "trained": 0, "stored": len(done), "skipped": True}
    progress = _Progress(kind, max(1, count_rows(run.users) - len(done)))  # for chunk sizes and the ETA
    negatives = task_negatives(run.users, get_task(cfg.data.task), cfg.seed)
    with worker_pool(cfg, None, workers) as pool:
        storing_s = _dispatch(cfg, kind, itertools.chain([first], pending), pool, store, progress,
                              str(bank_dir) if merges else None, negatives)
    return {"kind": kind, "trained": progress.finished, "failed": progress.failed, "retried": retried,
            "stored": len(done) + progress.finished, "skipped": False, "seconds": round(time.time() - t0, 1),
            "storing_s": round(storing_s, 2)}


def _dispatch(cfg: Config, kind: str, pending: Iterator[dict], pool: list, store: AdapterStore,
              progress: _Progress, bank: str | None, negatives: list[tuple[str, str]]) -> float:
    """Keep every worker topped up with small calls and store results as they come back. Returns the
    seconds the driver spent fetching and storing results (it dispatches nothing meanwhile)."""
    import ray

    losses = LossLog(store.path, store.shard_users)  # flushes on the same adds as the store's shards
    load = [0] * len(pool)  # users sent to each worker and not yet returned
    queued = queued_users(cfg.adapt.slots)
    in_flight: dict[Any, tuple[int, dict[str, dict]]] = {}
    dispatched, storing_s = 0, 0.0
    try:
        while True:
            while True:  # top up the least loaded worker until every one holds its share
                w = min(range(len(pool)), key=load.__getitem__)
                size = chunk_size(max(1, progress.expected - dispatched), cfg.adapt.slots, len(pool))
                chunk = list(itertools.islice(pending, size)) if load[w] < queued else []
                if not chunk:
                    break
                call = pool[w].train.remote(kind, chunk, cfg, bank, packed=True, negatives=negatives)
                in_flight[call] = (w, {u["user_id"]: u for u in chunk})
                load[w] += len(chunk)
                dispatched += len(chunk)
            if not in_flight:
                return storing_s
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            t_result = time.perf_counter()
            w, by_id = in_flight.pop(ref)
            load[w] -= len(by_id)
            for r in ray.get(ref):
                u = by_id[r["user_id"]]
                losses.add(r["user_id"], r.get("losses", []))  # before the store: a stored user has its losses
                store.add(r["user_id"], r["lora"], u["anchors"], u["weights"], r["steps"], r["final_loss"],
                          r["status"], r["error"])
                progress.book(r["status"])
            storing_s += time.perf_counter() - t_result
            progress.report()
    finally:
        t_flush = time.perf_counter()
        losses.flush()
        store.flush()
        storing_s += time.perf_counter() - t_flush
