"""Stage ``bank``: train one LoRA per anchor on Ray workers -> ``bank/`` (manifest + PEFT adapters).

Workers (one base model resident each) train their share of the anchors in
slots of the multi-slot trainer (rank ``bank.rank``, no merged branch); with
``bank.engine=deepspeed`` a Ray Train job with DeepSpeed ZeRO trains them one at a
time across several GPUs instead (:mod:`mta_ray.engine.deepspeed_bank`, for big bases). An
anchor trains on its own history (paper) or, with ``bank.anchor_data=cluster``,
on the pooled histories of its whole cluster. Anchors already in the manifest
with the same config hash are kept.

Run: ``mta-ray bank configs/demo.yaml --out runs/demo`` (after ``cluster``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mta_ray.config import Config, section_hash
from mta_ray.core.tasks import get_task
from mta_ray.files.atomic import atomic_dir
from mta_ray.files.layout import RunLayout, anchor_folder, read_manifest, write_manifest
from mta_ray.files.peft_format import save_peft
from mta_ray.files.tables import rows_of_users, task_negatives


def bank_hash(cfg: Config) -> str:
    return section_hash(cfg, "data", "model", "embed", "bank", "seed")


def run_bank(cfg: Config, out: Path, workers: list | None = None, bank_dir: Path | None = None) -> dict:
    """Train the missing anchors of ``<out>/anchors.parquet`` into ``bank_dir`` (default ``<out>/bank``).

    ``workers``: an existing pool to reuse (studies); by default one is started and stopped here.
    """
    t0 = time.time()
    run = RunLayout(out)
    h = bank_hash(cfg)
    bank_dir = bank_dir or run.bank
    kept = [a for a in read_manifest(bank_dir)["anchors"] if a["config_hash"] == h]
    done = {a["cluster"] for a in kept}
    todo = [a for a in pq.read_table(run.anchors).to_pylist() if a["cluster"] not in done]
    if not todo:
        return {"anchors": len(kept), "trained": 0, "skipped": True}
    payload = anchor_payload(cfg, run, todo)
    negatives = task_negatives(run.users, get_task(cfg.data.task), cfg.seed)
    results = _train(cfg, payload, bank_dir, workers, negatives)
    emb = {r["user_id"]: r["retrieval_emb"]
           for r in rows_of_users(run.embeddings, ["user_id", "retrieval_emb"], {a["user_id"] for a in todo}).values()}
    for a in todo:
        aid = anchor_folder(a["cluster"])
        r = results[aid]
        if r["status"] != "ok":
            print(f"bank: anchor {aid} (user {a['user_id']}) failed: {r['error']}", flush=True)
            continue
        with atomic_dir(bank_dir / aid) as tmp:
            save_peft(r["lora"], tmp, base_model=cfg.model.base)
        kept.append({"anchor_id": aid, "cluster": a["cluster"], "user_id": a["user_id"], "n_items": a["n_items"],
                     "cluster_size": a["cluster_size"], "path": aid, "retrieval_emb": emb[a["user_id"]],
                     "final_loss": r["final_loss"], "steps": r["steps"], "config_hash": h})
        write_manifest(bank_dir, kept)
    return {"anchors": len(kept), "trained": len(todo), "skipped": False, "seconds": round(time.time() - t0, 1)}


def anchor_payload(cfg: Config, run: RunLayout, todo: list[dict]) -> list[dict[str, Any]]:
    """What each anchor trains on: its own history, or (``bank.anchor_data=cluster``) its cluster's
    pooled histories; the users table is read for those users only."""
    owners: dict[int, list[str]] = {a["cluster"]: [a["user_id"]] for a in todo}
    if cfg.bank.anchor_data == "cluster":  # the members of the clusters to train, not the whole table
        wanted = pa.array(sorted(owners), pa.int32())
        clusters = pq.read_table(run.clusters, filters=pc.field("cluster").isin(wanted))
        owners = {c: [] for c in owners}
        for row in clusters.to_pylist():
            owners[row["cluster"]].append(row["user_id"])
    users = rows_of_users(run.users, ["user_id", "history"], {u for m in owners.values() for u in m})
    return [{"user_id": anchor_folder(a["cluster"]), "owners": sorted(owners[a["cluster"]]),
             "histories": [users[u]["history"] for u in sorted(owners[a["cluster"]])]} for a in todo]


def _train(cfg: Config, payload: list[dict], bank_dir: Path, workers: list | None,
           negatives: list[tuple[str, str]]) -> dict[str, dict]:
    """Anchor id -> training result, on the multi-slot workers or (``bank.engine=deepspeed``) DeepSpeed."""
    import ray

    from mta_ray.engine.raysetup import init_ray
    from mta_ray.engine.workers import ANCHOR, worker_pool

    if cfg.bank.engine == "deepspeed":
        from mta_ray.engine.deepspeed_bank import train_anchors

        init_ray(cfg)
        return train_anchors(cfg, payload, bank_dir, negatives)
    with worker_pool(cfg, None, workers) as pool:
        shares = [payload[i::len(pool)] for i in range(len(pool))]
        futures = [w.train.remote(ANCHOR, share, cfg, negatives=negatives) for w, share in zip(pool, shares) if share]
        return {r["user_id"]: r for batch in ray.get(futures) for r in batch}
