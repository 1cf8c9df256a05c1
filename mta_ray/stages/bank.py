"""Stage ``bank``: train one LoRA per anchor on Ray workers -> ``bank/`` (manifest + PEFT adapters).

Workers (one base model resident each) train their share of the anchors in
slots of the multi-slot trainer (rank ``bank.rank``, no merged branch); with
``bank.engine=deepspeed`` a Ray Train job with DeepSpeed ZeRO trains them one at a
time across several GPUs instead (:mod:`mta_ray.engine.deepspeed_bank`, for big bases). An
anchor trains on its own history (paper) or, with ``bank.anchor_data=cluster``,
on the pooled histories of its whole cluster. Each anchor is saved as it
finishes; anchors already in the manifest with the same config hash are kept, so
a rerun after a kill trains only the missing ones.

Run: ``mta-ray bank configs/demo.yaml --out runs/demo`` (after ``cluster``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mta_ray.config import Config, section_hash
from mta_ray.core.progress import Progress
from mta_ray.core.tasks import get_task
from mta_ray.files.atomic import atomic_dir
from mta_ray.files.layout import RunLayout, anchor_folder, read_manifest, write_manifest
from mta_ray.files.peft_format import save_peft
from mta_ray.files.tables import rows_of_users, task_negatives


def bank_hash(cfg: Config) -> str:
    return section_hash(cfg, "data", "model", "embed", "bank", "seed")


def run_bank(cfg: Config, out: Path, workers: list | None = None, bank_dir: Path | None = None) -> dict:
    """Train the missing anchors of ``<out>/anchors.parquet`` into ``bank_dir`` (default ``<out>/bank``).

    Each anchor is stored (its PEFT folder, then its manifest row, each atomically) as soon as it
    finishes, so a killed run keeps every finished anchor and a rerun trains only the missing ones.
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
    if kept:
        print(f"bank: {len(kept)} anchors already stored, training the {len(todo)} missing", flush=True)
    payload = anchor_payload(cfg, run, todo)
    negatives = task_negatives(run.users, get_task(cfg.data.task), cfg.seed)
    emb = {r["user_id"]: r["retrieval_emb"]
           for r in rows_of_users(run.embeddings, ["user_id", "retrieval_emb"], {a["user_id"] for a in todo}).values()}
    by_id = {anchor_folder(a["cluster"]): a for a in todo}
    progress = Progress("bank", "anchors", len(todo), every_s=0)
    failed = 0
    for r in _train(cfg, payload, bank_dir, workers, negatives):
        a = by_id[r["user_id"]]
        if r["status"] != "ok":
            failed += 1
            progress.add(1, note=f"anchor {r['user_id']} (user {a['user_id']}) failed: {r['error']}")
            continue
        kept.append(_store_anchor(cfg, bank_dir, a, r, emb[a["user_id"]], h))
        write_manifest(bank_dir, kept)
        progress.add(1, note=f"{r['user_id']} stored (final loss {r['final_loss']:.3f})")
    return {"anchors": len(kept), "trained": len(todo) - failed, "failed": failed, "skipped": False,
            "seconds": round(time.time() - t0, 1)}


def _store_anchor(cfg: Config, bank_dir: Path, a: dict, r: dict, emb: list[float], h: str) -> dict:
    """Write one finished anchor's PEFT folder (atomically) and return its manifest row."""
    aid = anchor_folder(a["cluster"])
    with atomic_dir(bank_dir / aid) as tmp:
        save_peft(r["lora"], tmp, base_model=cfg.model.base)
    return {"anchor_id": aid, "cluster": a["cluster"], "user_id": a["user_id"], "n_items": a["n_items"],
            "cluster_size": a["cluster_size"], "path": aid, "retrieval_emb": emb, "final_loss": r["final_loss"],
            "steps": r["steps"], "losses": [float(x) for x in r.get("losses", [])], "config_hash": h}


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
           negatives: list[tuple[str, str]]) -> Iterator[dict]:
    """Each anchor's training result as soon as it finishes, from the multi-slot workers (one call per
    anchor: a worker's concurrent calls share its trainer's slots) or (``bank.engine=deepspeed``) DeepSpeed."""
    import ray

    from mta_ray.engine.raysetup import init_ray
    from mta_ray.engine.workers import ANCHOR, worker_pool

    if cfg.bank.engine == "deepspeed":
        from mta_ray.engine.deepspeed_bank import train_anchors

        init_ray(cfg)  # ZeRO-3 runs one Ray Train job per anchor anyway: hand each over as it finishes;
        groups = [[p] for p in payload] if cfg.bank.deepspeed.zero_stage == 3 else [payload]  # ZeRO-2: one job
        for group in groups:
            yield from train_anchors(cfg, group, bank_dir, negatives).values()
        return
    with worker_pool(cfg, None, workers) as pool:
        pending = [pool[i % len(pool)].train.remote(ANCHOR, [p], cfg, negatives=negatives)
                   for i, p in enumerate(payload)]
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            yield from ray.get(ref)
