"""Stage ``bank``: train one LoRA per anchor on Ray workers -> ``bank/`` (manifest + PEFT adapters).

Workers (one base model resident each) train their share of the anchors in
slots of the multi-slot trainer (rank ``bank.rank``, no merged branch); with
``bank.engine=deepspeed`` a Ray Train job with DeepSpeed ZeRO trains them one at a
time across several GPUs instead (:mod:`mta_ray.bank_deepspeed`, for big bases). An
anchor trains on its own history (paper) or, with ``bank.anchor_data=cluster``,
on the pooled histories of its whole cluster. Anchors already in the manifest
with the same config hash are kept.

Run: ``mta-ray bank configs/demo.yaml --out runs/demo`` (after ``cluster``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config, save_resolved, section_hash
from .data import rows_of_users
from .embed import EMBEDDINGS
from .fsutil import atomic_dir, atomic_write_text
from .lora import save_peft
from .prepare import USERS_FILE

BANK_DIR = "bank"


def bank_hash(cfg: Config) -> str:
    return section_hash(cfg, "data", "model", "embed", "bank", "seed")


def read_manifest(out: Path, bank_dir: Path | None = None) -> dict:
    path = (bank_dir or out / BANK_DIR) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {"anchors": []}


def run_bank(cfg: Config, out: Path, workers: list | None = None, bank_dir: Path | None = None) -> dict:
    """Train the missing anchors of ``<out>/anchors.parquet`` into ``bank_dir`` (default ``<out>/bank``).

    ``workers``: an existing pool to reuse (studies); by default one is started and stopped here.
    """
    import ray

    from .workers import worker_pool

    t0 = time.time()
    h = bank_hash(cfg)
    bank_dir = bank_dir or out / BANK_DIR
    anchors = pq.read_table(out / "anchors.parquet").to_pylist()
    manifest = read_manifest(out, bank_dir)
    kept = [a for a in manifest["anchors"] if a["config_hash"] == h]
    done = {a["cluster"] for a in kept}
    todo = [a for a in anchors if a["cluster"] not in done]
    if not todo:
        return {"anchors": len(kept), "trained": 0, "skipped": True}
    members: dict[int, list[str]] = {a["cluster"]: [a["user_id"]] for a in todo}
    if cfg.bank.anchor_data == "cluster":  # the members of the clusters to train, not the whole table
        wanted = pa.array(sorted(members), pa.int32())
        clusters = pq.read_table(out / "clusters.parquet", filters=pc.field("cluster").isin(wanted))
        members = {c: [] for c in members}
        for row in clusters.to_pylist():
            members[row["cluster"]].append(row["user_id"])
    users = rows_of_users(out / USERS_FILE, ["user_id", "history"], {u for m in members.values() for u in m})
    emb = {r["user_id"]: r["retrieval_emb"]
           for r in rows_of_users(out / EMBEDDINGS, ["user_id", "retrieval_emb"], {a["user_id"] for a in todo}).values()}
    payload = []
    for a in todo:
        owners = sorted(members[a["cluster"]]) if cfg.bank.anchor_data == "cluster" else [a["user_id"]]
        payload.append({"user_id": anchor_id(a["cluster"]), "histories": [users[u]["history"] for u in owners]})
    if cfg.bank.engine == "deepspeed":
        from .bank_deepspeed import train_anchors
        from .raysetup import init_ray

        init_ray(cfg)
        results = train_anchors(cfg, payload, bank_dir)
    else:
        with worker_pool(cfg, None, workers) as pool:
            shares = [payload[i::len(pool)] for i in range(len(pool))]
            futures = [w.train.remote("anchor", share, cfg) for w, share in zip(pool, shares) if share]
            results = {r["user_id"]: r for batch in ray.get(futures) for r in batch}
    for a in todo:
        aid = anchor_id(a["cluster"])
        r = results[aid]
        if r["status"] != "ok":
            print(f"bank: anchor {aid} (user {a['user_id']}) failed: {r['error']}", flush=True)
            continue
        with atomic_dir(bank_dir / aid) as tmp:
            save_peft(r["lora"], tmp, base_model=cfg.model.base)
        kept.append({"anchor_id": aid, "cluster": a["cluster"], "user_id": a["user_id"], "n_items": a["n_items"],
                     "cluster_size": a["cluster_size"], "path": aid, "retrieval_emb": emb[a["user_id"]],
                     "final_loss": r["final_loss"], "steps": r["steps"], "config_hash": h})
        atomic_write_text(bank_dir / "manifest.json", json.dumps({"anchors": kept}, indent=1))
    save_resolved(cfg, bank_dir.parent, bank_dir.name)  # <out>/bank.config.yaml beside <out>/bank/
    return {"anchors": len(kept), "trained": len(todo), "skipped": False, "seconds": round(time.time() - t0, 1)}


def anchor_id(cluster: int) -> str:
    """Bank folders are named by cluster, never by user id (user ids are keys, not paths)."""
    return f"anchor-{cluster:04d}"
