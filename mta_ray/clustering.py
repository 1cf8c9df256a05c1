"""Stage ``cluster``: K-Means over users' clustering embeddings; the most active user anchors each cluster.

Outputs ``clusters.parquet`` (user_id, cluster) and ``anchors.parquet`` (cluster,
anchor user_id, n_items, cluster size). A cluster whose most active user has
fewer than ``bank.min_items`` items gets no anchor (as the reference code).
Ties between equally active users go to the one nearest the cluster's centroid
(the most typical member: on LaMP-2 every user has 10 items, so activity alone
decides nothing), then to the smallest user_id.

Run: ``mta-ray cluster configs/demo.yaml --out runs/demo`` (after ``embed``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import Config, save_resolved
from .embed import load_embeddings
from .errors import InputError
from .fsutil import atomic_path


def kmeans_labels(x: np.ndarray, k: int, seed: int, minibatch_above: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    k = min(k, len(x))
    if len(x) > minibatch_above:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=10)
    return model.fit_predict(x)


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


def run_cluster(cfg: Config, out: Path) -> dict:
    emb = load_embeddings(out)
    user_ids = emb.column("user_id").to_pylist()
    n_items = emb.column("n_items").to_pylist()
    x = np.array(emb.column("cluster_emb").to_pylist(), dtype=np.float32)
    labels = kmeans_labels(x, cfg.bank.num_clusters, cfg.seed, cfg.bank.minibatch_kmeans_above)
    anchors = pick_anchors(user_ids, n_items, labels, cfg.bank.min_items, x)
    if not anchors:
        raise InputError("bank.min_items", f"no cluster has a user with at least {cfg.bank.min_items} items")
    with atomic_path(out / "clusters.parquet") as tmp:
        pq.write_table(pa.table({"user_id": user_ids, "cluster": labels.astype(np.int32)}), tmp)
    with atomic_path(out / "anchors.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(anchors), tmp)
    save_resolved(cfg, out, "cluster")
    return {"clusters": int(labels.max()) + 1, "anchors": len(anchors), "users": len(user_ids)}
