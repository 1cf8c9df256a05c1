"""Stage ``personalize``: merge-then-adapt for every user on a pool of Ray workers.

For each user: top-K anchors by cosine of retrieval embeddings,
similarity-normalised weights, merge (``merge.space``), train the stacked
rank-r adapter with the base and the merged LoRA frozen — many users per
forward/backward in each worker. The same machinery trains the baselines'
per-user adapters (``adapt_only``: stacked adapter on the bare base;
``oppu``: a LoRA from scratch with OPPU's recipe).

Output: ``adapters/<kind>/`` — a sharded store (:mod:`mta_ray.store`).
Resumable: users already stored are skipped; each user is stored once.

Run: ``mta-ray personalize configs/demo.yaml --out runs/demo`` (after ``bank``).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .adaptive import merge_weights, top_k_anchors
from .bank import BANK_DIR, read_manifest
from .config import Config, save_resolved
from .data import count_rows, iter_user_rows
from .embed import EMBEDDINGS, load_embeddings
from .errors import InputError
from .prepare import USERS_FILE
from .store import AdapterStore

KINDS = ("mta", "adapt_only", "oppu")


def store_dir(out: Path, label: str) -> Path:
    """``adapters/<label>``: the label is the kind (``mta``...) or a study's variant name."""
    return out / "adapters" / label


def anchor_retriever(cfg: Config, out: Path, bank_dir: Path) -> Callable[[Any], tuple[list[str], list[float]]]:
    """A user's retrieval embedding -> its top-K anchor ids and merge weights, over the bank's manifest."""
    anchors = read_manifest(out, bank_dir)["anchors"]
    if not anchors:
        raise InputError(str(bank_dir), "the bank is empty (run `mta-ray bank` first)")
    ids = [a["anchor_id"] for a in anchors]
    mat = np.array([a["retrieval_emb"] for a in anchors], dtype=np.float32)

    def retrieve(embedding: Any) -> tuple[list[str], list[float]]:
        idx, sims = top_k_anchors(np.asarray(embedding, dtype=np.float32), mat, cfg.merge.top_k)
        return [ids[i] for i in idx], merge_weights(sims, cfg.merge.min_similarity, cfg.merge.fixed_alpha)
    return retrieve


def retrieval_plan(cfg: Config, out: Path, user_ids: list[str],
                   bank_dir: Path | None = None) -> dict[str, tuple[list[str], list[float]]]:
    """Each user's top-K anchors and merge weights (deterministic, recomputed when needed)."""
    retrieve = anchor_retriever(cfg, out, bank_dir or out / BANK_DIR)
    emb = {r["user_id"]: r["retrieval_emb"]
           for r in load_embeddings(out).select(["user_id", "retrieval_emb"]).to_pylist()}
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


def iter_pending(cfg: Config, out: Path, kind: str, done: set[str], bank_dir: Path,
                 columns: tuple[str, ...] = ("user_id", "history")) -> Iterator[dict]:
    """Users not yet stored, in users-table order, each with its top-K anchors and merge weights (MTA).

    Streams ``users.parquet`` (``columns``) and ``embeddings.parquet`` side by side (row i of both is the
    same user, as ``embed`` writes it): the driver holds a batch of each, never the tables.
    """
    rows = iter_user_rows(out / USERS_FILE, list(columns))
    if kind != "mta":
        for u in rows:
            if u["user_id"] not in done:
                yield {**u, "anchors": [], "weights": []}
        return
    retrieve = anchor_retriever(cfg, out, bank_dir)
    embeddings = iter_user_rows(out / EMBEDDINGS, ["user_id", "retrieval_emb"])
    for u, e in itertools.zip_longest(rows, embeddings):
        if u is None or e is None or u["user_id"] != e["user_id"]:
            raise InputError(str(out / EMBEDDINGS), "rows do not match users.parquet (written by an older "
                                                    "version or for other users): rerun `mta-ray embed`")
        if u["user_id"] in done:
            continue
        anchors, weights = retrieve(e["retrieval_emb"])
        yield {**u, "anchors": anchors, "weights": weights}


def run_personalize(cfg: Config, out: Path, kind: str = "mta", workers: list | None = None,
                    label: str | None = None, bank_dir: Path | None = None) -> dict:
    """Train ``kind`` adapters for every user not yet stored in ``adapters/<label or kind>``.

    ``workers``: an existing pool to reuse (studies); by default a pool is started and stopped here.
    ``bank_dir``: the bank to merge from (default ``<out>/bank``). Users stream from the users table
    in small calls to the least loaded worker, each worker holding about two slot-fills
    (:func:`queued_users`; its trainer never waits for the driver); the driver holds at most those
    users, never the whole table.
    """
    import ray

    from .workers import worker_pool

    t0 = time.time()
    bank_dir = bank_dir or out / BANK_DIR
    store = AdapterStore(store_dir(out, label or kind), cfg.adapt.shard_users)
    done = store.stored_users()
    pending = iter_pending(cfg, out, kind, done, bank_dir)
    first = next(pending, None)
    if first is None:
        return {"kind": kind, "trained": 0, "stored": len(done), "skipped": True}
    expected = max(1, count_rows(out / USERS_FILE) - len(done))  # for chunk sizes and the ETA
    pending = itertools.chain([first], pending)
    finished = failed = 0
    bank = str(bank_dir) if kind == "mta" else None
    with worker_pool(cfg, None, workers) as pool:
        load = [0] * len(pool)  # users sent to each worker and not yet returned
        queued = queued_users(cfg.adapt.slots)
        in_flight: dict[Any, tuple[int, dict[str, dict]]] = {}
        dispatched = 0
        storing_s = 0.0  # the driver fetching and storing results (it dispatches nothing meanwhile)
        try:
            while True:
                while True:  # top up the least loaded worker until every one holds its share
                    w = min(range(len(pool)), key=load.__getitem__)
                    if load[w] >= queued:
                        break
                    chunk = list(itertools.islice(
                        pending, chunk_size(max(1, expected - dispatched), cfg.adapt.slots, len(pool))))
                    if not chunk:
                        break
                    call = pool[w].train.remote(kind, chunk, cfg, bank, packed=True)
                    in_flight[call] = (w, {u["user_id"]: u for u in chunk})
                    load[w] += len(chunk)
                    dispatched += len(chunk)
                if not in_flight:
                    break
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                t_result = time.perf_counter()
                w, by_id = in_flight.pop(ref)
                load[w] -= len(by_id)
                for r in ray.get(ref):
                    u = by_id[r["user_id"]]
                    store.add(r["user_id"], r["lora"], u["anchors"], u["weights"], r["steps"], r["final_loss"],
                              r["status"], r["error"])
                    finished += 1
                    failed += r["status"] != "ok"
                storing_s += time.perf_counter() - t_result
                rate = finished / max(1e-9, time.time() - t0)
                eta = max(0, expected - finished) / max(rate, 1e-9)
                print(f"personalize[{kind}]: {finished}/{expected} users, {rate:.2f} users/s, ETA {eta:.0f}s"
                      + (f", {failed} failed" if failed else ""), flush=True)
        finally:
            t_flush = time.perf_counter()
            store.flush()
            storing_s += time.perf_counter() - t_flush
    save_resolved(cfg, out, f"personalize-{label or kind}")
    return {"kind": kind, "trained": finished, "failed": failed, "stored": len(done) + finished,
            "skipped": False, "seconds": round(time.time() - t0, 1), "storing_s": round(storing_s, 2)}
