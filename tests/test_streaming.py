"""Stages stream the users and embeddings tables instead of loading them whole."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mta_ray.config import load_config
from mta_ray.errors import InputError
from mta_ray.files.layout import RunLayout, bank_retriever
from mta_ray.files.tables import count_rows, iter_user_rows, iter_users_with_anchors, write_users
from mta_ray.stages.cluster import run_cluster
from mta_ray.stages.prepare import run_prepare

USERS_FILE = "users.parquet"


def pending(cfg, out, bank, skip=frozenset()):
    run = RunLayout(out)
    return iter_users_with_anchors(run.users, run.embeddings, bank_retriever(cfg, bank) if bank else None, skip)


def users(n, items=lambda i: 3):
    return ({"user_id": f"u{i:04d}", "task": "lamp2", "persona": None,
             "history": [{"id": f"{i}-{j}", "input": f"text {i} {j}", "output": "comedy"} for j in range(items(i))],
             "queries": [{"id": f"q{i}", "input": "q", "gold": "comedy"}]} for i in range(n))


def write_embeddings(out, ids, items, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = RunLayout(out).embeddings
    folder.mkdir(parents=True)
    emb = rng.normal(size=(len(ids), dim)).astype(np.float32)
    pq.write_table(pa.table({"user_id": ids, "n_items": pa.array(items, pa.int32()),
                             "cluster_emb": [list(map(float, e)) for e in emb],
                             "retrieval_emb": [list(map(float, e / np.linalg.norm(e))) for e in emb]}),
                   folder / "part-00000.parquet")
    return emb


def test_users_are_written_and_read_in_row_groups_in_order(tmp_path):
    path = tmp_path / USERS_FILE
    assert write_users(users(25), path, batch_rows=4) == 25   # a generator, never a list
    assert pq.ParquetFile(path).metadata.num_row_groups == 7
    assert count_rows(path) == 25
    assert [r["user_id"] for r in iter_user_rows(path, ["user_id"], batch_rows=3)] == [f"u{i:04d}" for i in range(25)]


def test_synthetic_users_are_generated_while_written(tmp_path):
    cfg = load_config("configs/demo.yaml", ["data.synthetic.num_users=30", "data.max_users=21",
                                            "data.synthetic.queries_per_user=2"])
    summary = run_prepare(cfg, tmp_path)
    assert summary["users"] == 21 and summary["queries"] == 42 and count_rows(tmp_path / USERS_FILE) == 21


def _bank(tmp_path, dim=4):
    bank = tmp_path / "bank"
    bank.mkdir()
    anchors = [{"anchor_id": f"anchor-{c:04d}", "retrieval_emb": list(np.eye(dim)[c].astype(float))}
               for c in range(2)]
    (bank / "manifest.json").write_text(json.dumps({"anchors": anchors}))
    return bank


def test_pending_users_carry_their_anchors_and_skip_stored_ones(tmp_path):
    cfg = load_config("configs/demo.yaml", ["merge.top_k=1"])
    write_users(users(6), tmp_path / USERS_FILE)
    emb = write_embeddings(tmp_path, [f"u{i:04d}" for i in range(6)], [3] * 6)
    got = list(pending(cfg, tmp_path, _bank(tmp_path), {"u0002"}))
    assert [u["user_id"] for u in got] == ["u0000", "u0001", "u0003", "u0004", "u0005"]
    for u in got:
        e = emb[int(u["user_id"][1:])]
        assert u["anchors"] == [f"anchor-{int(e[1] > e[0]):04d}"] and u["weights"] == [1.0]
        assert len(u["history"]) == 3
    assert [u["anchors"] for u in pending(cfg, tmp_path, None)] == [[]] * 6


def test_embeddings_out_of_step_with_the_users_table_are_an_input_error(tmp_path):
    cfg = load_config("configs/demo.yaml", [])
    write_users(users(4), tmp_path / USERS_FILE)
    write_embeddings(tmp_path, ["u0001", "u0000", "u0002", "u0003"], [3] * 4)  # e.g. an older layout
    with pytest.raises(InputError, match="rerun `mta-ray embed`"):
        list(pending(cfg, tmp_path, _bank(tmp_path)))


def test_many_users_are_clustered_streaming_with_the_most_active_as_anchors(tmp_path):
    n = 60
    items = [3 + (i % 7) for i in range(n)]
    ids = [f"u{i:04d}" for i in range(n)]
    write_embeddings(tmp_path, ids, items, seed=3)
    cfg = load_config("configs/demo.yaml", ["bank.num_clusters=3", "bank.min_items=1",
                                            "bank.minibatch_kmeans_above=10"])
    summary = run_cluster(cfg, tmp_path)
    assert summary["streamed"] and summary["users"] == n and summary["anchors"] == 3
    clusters = pq.read_table(tmp_path / "clusters.parquet").to_pylist()
    assert [r["user_id"] for r in clusters] == ids
    anchors = pq.read_table(tmp_path / "anchors.parquet").to_pylist()
    for a in anchors:
        members = [i for i, r in enumerate(clusters) if r["cluster"] == a["cluster"]]
        assert a["cluster_size"] == len(members)
        assert a["n_items"] == max(items[i] for i in members) == items[ids.index(a["user_id"])]
