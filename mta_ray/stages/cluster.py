"""Stage ``cluster``: K-Means over users' clustering embeddings; the most active user anchors each cluster.

Outputs ``clusters.parquet`` (user_id, cluster) and ``anchors.parquet`` (cluster,
anchor user_id, n_items, cluster size). A cluster whose most active user has
fewer than ``bank.min_items`` items gets no anchor (as the reference code).
Ties between equally active users go to the one nearest the cluster's centroid
(the most typical member: on LaMP-2 every user has 10 items, so activity alone
decides nothing), then to the smallest user_id. Above ``bank.minibatch_kmeans_above``
users the stage streams: MiniBatchKMeans is fitted batch by batch and users are
labelled in a second pass, one batch of embeddings in memory at a time.

Run: ``mta-ray cluster configs/demo.yaml --out runs/demo`` (after ``embed``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mta_ray.config import Config
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_path
from mta_ray.files.layout import RunLayout
from mta_ray.files.tables import count_rows, iter_batches, load_embeddings


def kmeans_labels(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Exact K-Means (10 restarts) for user sets that fit in memory."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=min(k, len(x)), random_state=seed, n_init=10).fit_predict(x)


def pick_anchors(user_ids: list[str], n_items: list[int], labels: np.ndarray, min_items: int,
                 x: np.ndarray | None = None) -> list[dict]:
    """The most active member of each cluster (ties: nearest the centroid of ``x``, then user_id)."""
    anchors = []
    for c in sorted(set(labels.tolist())):
        members = [i for i in range(len(user_ids)) if labels[i] == c]
        if x is not None:
            centroid = x[members].mean(axis=0)
            dist = {i: float(np.linalg.norm(x[i] - centroid)) for i in members}
        else:
            dist = dict.fromkeys(members, 0.0)
        best = min(members, key=lambda i: (-n_items[i], round(dist[i], 6), user_ids[i]))
        if n_items[best] >= min_items:
            anchors.append({"cluster": int(c), "user_id": user_ids[best], "n_items": int(n_items[best]),
                            "cluster_size": len(members)})
    return anchors


BATCH_ROWS = 16384
"""Embeddings per streamed batch (one batch in memory at a time)."""


def _matrix(batch: pa.RecordBatch, column: str) -> np.ndarray:
    values = batch.column(column)
    return values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(values), -1)


def cluster_streaming(cfg: Config, out: Path) -> tuple[list[dict], int, int]:
    """Many users: MiniBatchKMeans fitted batch by batch, then labels and anchors in a second pass.

    The driver holds one batch of embeddings at a time; ``clusters.parquet`` is written as it goes.
    Anchor ties go to the member nearest the fitted centre (the in-memory path uses the members' mean).
    Returns (anchors, clusters, users).
    """
    from sklearn.cluster import MiniBatchKMeans

    run = RunLayout(out)
    model = MiniBatchKMeans(n_clusters=cfg.bank.num_clusters, random_state=cfg.seed, batch_size=4096, n_init=3)
    for batch in iter_batches(run.embeddings, ["cluster_emb"], BATCH_ROWS):
        model.partial_fit(_matrix(batch, "cluster_emb"))
    best: dict[int, tuple] = {}
    sizes: dict[int, int] = {}
    users = 0
    schema = pa.schema([("user_id", pa.string()), ("cluster", pa.int32())])
    with atomic_path(run.clusters) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in iter_batches(run.embeddings, ["user_id", "n_items", "cluster_emb"], BATCH_ROWS):
            x = _matrix(batch, "cluster_emb")
            labels = model.predict(x)
            dist = np.linalg.norm(x - model.cluster_centers_[labels], axis=1)
            ids, items = batch.column("user_id").to_pylist(), batch.column("n_items").to_pylist()
            writer.write_table(pa.table({"user_id": ids, "cluster": labels.astype(np.int32)}, schema=schema))
            for uid, n, c, d in zip(ids, items, labels.tolist(), dist.tolist()):
                sizes[c] = sizes.get(c, 0) + 1
                key = (-n, round(d, 6), uid)
                if c not in best or key < best[c]:
                    best[c] = key
            users += len(ids)
    anchors = [{"cluster": c, "user_id": key[2], "n_items": -key[0], "cluster_size": sizes[c]}
               for c, key in sorted(best.items()) if -key[0] >= cfg.bank.min_items]
    return anchors, len(sizes), users


def run_cluster(cfg: Config, out: Path) -> dict:
    run = RunLayout(out)
    if not run.embeddings.is_dir():
        raise InputError(str(run.embeddings), "embeddings not found (run `mta-ray embed` first)")
    if count_rows(run.embeddings) > cfg.bank.minibatch_kmeans_above:
        anchors, clusters, users = cluster_streaming(cfg, out)
        _write_anchors(cfg, run, anchors)
        return {"clusters": clusters, "anchors": len(anchors), "users": users, "streamed": True}
    emb = load_embeddings(run.embeddings)
    user_ids = emb.column("user_id").to_pylist()
    n_items = emb.column("n_items").to_pylist()
    x = np.array(emb.column("cluster_emb").to_pylist(), dtype=np.float32)
    labels = kmeans_labels(x, cfg.bank.num_clusters, cfg.seed)
    anchors = pick_anchors(user_ids, n_items, labels, cfg.bank.min_items, x)
    with atomic_path(run.clusters) as tmp:
        pq.write_table(pa.table({"user_id": user_ids, "cluster": labels.astype(np.int32)}), tmp)
    _write_anchors(cfg, run, anchors)
    return {"clusters": int(labels.max()) + 1, "anchors": len(anchors), "users": len(user_ids)}


def _write_anchors(cfg: Config, run: RunLayout, anchors: list[dict]) -> None:
    if not anchors:
        raise InputError("bank.min_items", f"no cluster has a user with at least {cfg.bank.min_items} items")
    with atomic_path(run.anchors) as tmp:
        pq.write_table(pa.Table.from_pylist(anchors), tmp)
