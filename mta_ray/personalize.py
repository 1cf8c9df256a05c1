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

import math
import time
from pathlib import Path

import numpy as np

from .adaptive import merge_weights, top_k_anchors
from .bank import BANK_DIR, read_manifest
from .config import Config, save_resolved
from .data import load_users
from .embed import load_embeddings
from .errors import InputError
from .prepare import USERS_FILE
from .store import AdapterStore

KINDS = ("mta", "adapt_only", "oppu")


def store_dir(out: Path, label: str) -> Path:
    """``adapters/<label>``: the label is the kind (``mta``...) or a study's variant name."""
    return out / "adapters" / label


def retrieval_plan(cfg: Config, out: Path, user_ids: list[str],
                   bank_dir: Path | None = None) -> dict[str, tuple[list[str], list[float]]]:
    """Each user's top-K anchors and merge weights (deterministic, recomputed when needed)."""
    bank_dir = bank_dir or out / BANK_DIR
    anchors = read_manifest(out, bank_dir)["anchors"]
    if not anchors:
        raise InputError(str(bank_dir), "the bank is empty (run `mta-ray bank` first)")
    ids = [a["anchor_id"] for a in anchors]
    mat = np.array([a["retrieval_emb"] for a in anchors], dtype=np.float32)
    emb = {r["user_id"]: np.array(r["retrieval_emb"], dtype=np.float32)
           for r in load_embeddings(out).select(["user_id", "retrieval_emb"]).to_pylist()}
    plan = {}
    for u in user_ids:
        idx, sims = top_k_anchors(emb[u], mat, cfg.merge.top_k)
        plan[u] = ([ids[i] for i in idx], merge_weights(sims, cfg.merge.min_similarity, cfg.merge.fixed_alpha))
    return plan


def chunk_size(n_users: int, slots: int, workers: int) -> int:
    """Users per worker call: about two slot-fills (refill keeps slots busy), in a number of chunks
    that divides evenly among the workers (no worker left with the last, lone chunk)."""
    chunks = math.ceil(n_users / max(1, 2 * slots))
    chunks = math.ceil(chunks / workers) * workers
    return max(1, math.ceil(n_users / chunks))


def run_personalize(cfg: Config, out: Path, kind: str = "mta", workers: list | None = None,
                    label: str | None = None, bank_dir: Path | None = None) -> dict:
    """Train ``kind`` adapters for every user not yet stored in ``adapters/<label or kind>``.

    ``workers``: an existing pool to reuse (studies); by default a pool is started and stopped here.
    ``bank_dir``: the bank to merge from (default ``<out>/bank``).
    """
    from ray.util import ActorPool

    from .workers import worker_pool

    t0 = time.time()
    bank_dir = bank_dir or out / BANK_DIR
    store = AdapterStore(store_dir(out, label or kind), cfg.adapt.shard_users)
    done = store.stored_users()
    users = [u for u in load_users(out / USERS_FILE, ["user_id", "history"]).to_pylist()
             if u["user_id"] not in done]
    if not users:
        return {"kind": kind, "trained": 0, "stored": len(done), "skipped": True}
    plan = retrieval_plan(cfg, out, [u["user_id"] for u in users], bank_dir) if kind == "mta" else {}
    for u in users:
        u["anchors"], u["weights"] = plan.get(u["user_id"], ([], []))
    by_id = {u["user_id"]: u for u in users}
    finished = failed = 0
    train = (lambda w, c: w.train.remote(kind, c, cfg, str(bank_dir) if kind == "mta" else None))
    with worker_pool(cfg, None, workers) as pool:
        chunk = chunk_size(len(users), cfg.adapt.slots, len(pool))
        chunks = [users[i:i + chunk] for i in range(0, len(users), chunk)]
        try:
            for results in ActorPool(pool).map_unordered(train, chunks):
                for r in results:
                    u = by_id[r["user_id"]]
                    store.add(r["user_id"], r["lora"], u["anchors"], u["weights"], r["steps"], r["final_loss"],
                              r["status"], r["error"])
                    finished += 1
                    failed += r["status"] != "ok"
                rate = finished / max(1e-9, time.time() - t0)
                eta = (len(users) - finished) / max(rate, 1e-9)
                print(f"personalize[{kind}]: {finished}/{len(users)} users, {rate:.2f} users/s, ETA {eta:.0f}s"
                      + (f", {failed} failed" if failed else ""), flush=True)
        finally:
            store.flush()
    save_resolved(cfg, out, f"personalize-{label or kind}")
    return {"kind": kind, "trained": finished, "failed": failed, "stored": len(done) + finished,
            "skipped": False, "seconds": round(time.time() - t0, 1)}
