"""Stage ``embed``: two embeddings per user through a Ray Data pipeline -> ``embeddings.parquet/``.

- clustering embedding: mean of the per-item embeddings (paper eq. 2);
- retrieval embedding: the whole history as one document, normalised (paper eq. 4).

Run: ``mta-ray embed configs/demo.yaml --out runs/demo`` (after ``prepare``).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from mta_ray.config import Config, section_hash
from mta_ray.core.progress import Progress
from mta_ray.core.tasks import get_task
from mta_ray.files.atomic import atomic_dir
from mta_ray.files.layout import RunLayout
from mta_ray.files.tables import count_rows


class EmbedUsers:
    """Ray Data callable: encoders load once per actor, then embed batches of users."""

    def __init__(self, cfg: Config):
        import torch

        from mta_ray.files.models import load_encoder

        dev = cfg.embed.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        e = cfg.embed
        self.cluster_enc = load_encoder(e.cluster_encoder, dev, e.max_seq_length, "embed.cluster_encoder")
        self.retrieval_enc = (self.cluster_enc if e.retrieval_encoder == e.cluster_encoder else
                              load_encoder(e.retrieval_encoder, dev, e.max_seq_length, "embed.retrieval_encoder"))
        self.task = get_task(cfg.data.task)
        self.batch_size = e.batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        histories = batch.column("history").to_pylist()
        items = [f"{it['input']} {it['output']}" for h in histories for it in h]
        item_emb = self.cluster_enc.encode(items, batch_size=self.batch_size, convert_to_numpy=True)
        docs = ["\n".join(self.task.history_line(it) for it in h) for h in histories]
        doc_emb = self.retrieval_enc.encode(docs, batch_size=self.batch_size, convert_to_numpy=True,
                                            normalize_embeddings=True)
        cluster, pos = [], 0
        for h in histories:
            cluster.append(item_emb[pos:pos + len(h)].mean(axis=0))
            pos += len(h)
        extra = {"path": batch.column("path")} if "path" in batch.column_names else {}
        return pa.table({
            **extra,
            "user_id": batch.column("user_id"),
            "n_items": pa.array([len(h) for h in histories], pa.int32()),
            "cluster_emb": pa.array([c.astype(np.float32).tolist() for c in cluster], pa.list_(pa.float32())),
            "retrieval_emb": pa.array([d.astype(np.float32).tolist() for d in doc_emb], pa.list_(pa.float32())),
        })


EMBED_FORMAT = "one-part-in-users-order"
"""Layout of ``embeddings.parquet/``: row i is the user of row i of ``users.parquet`` (stages stream both
side by side). Part of the settings hash, so folders of an older layout are rebuilt."""


def embed_hash(cfg: Config) -> str:
    return f"{section_hash(cfg, 'data', 'embed')}:{EMBED_FORMAT}"


@contextlib.contextmanager
def _ordered_execution() -> Iterator[None]:
    """Ray Data keeps input order for datasets built inside the block (output row i = input row i)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = previous


def _write_in_order(ds, path: Path, total: int = 0) -> int:
    """Stream the dataset's blocks, in order, into one parquet file (the driver holds one block at a time),
    logging users/s and the ETA (``total``: users expected)."""
    import pyarrow.parquet as pq

    progress = Progress("embed", "users", total)
    writer, rows = None, 0
    try:
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if writer is None:
                writer = pq.ParquetWriter(path, block.schema)
            writer.write_table(block)
            rows += block.num_rows
            progress.add(block.num_rows)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _is_current(out: Path, cfg: Config) -> bool:
    stamp = RunLayout(out).embeddings_stamp
    return stamp.is_file() and stamp.read_text() == embed_hash(cfg)


@contextlib.contextmanager
def _publish(out: Path, cfg: Config) -> Iterator[Path]:
    """A temporary folder that becomes ``<out>/embeddings.parquet/``, stamped with the settings, only if whole."""
    run = RunLayout(out)
    with atomic_dir(run.embeddings) as tmp:
        yield tmp
        (tmp / run.embeddings_stamp.name).write_text(embed_hash(cfg))


def run_embed(cfg: Config, out: Path) -> dict:
    import ray

    from mta_ray.engine.raysetup import init_ray

    run = RunLayout(out)
    if _is_current(out, cfg):
        return {"skipped": True, "path": str(run.embeddings)}
    init_ray(cfg)
    t0 = time.time()
    with _ordered_execution(), _publish(out, cfg) as tmp:
        ds = _embedded(cfg, ray.data.read_parquet(str(run.users)).select_columns(["user_id", "history"]))
        rows = _write_in_order(ds, tmp / "part-00000.parquet", count_rows(run.users))
    target = run.embeddings
    return {"skipped": False, "path": str(target), "users": rows, "seconds": round(time.time() - t0, 1)}


def _embedded(cfg: Config, ds):
    import ray

    gpu = ray.cluster_resources().get("GPU", 0) >= 1 and cfg.embed.device != "cpu"
    return ds.map_batches(EmbedUsers, fn_constructor_args=(cfg,), batch_size=cfg.embed.batch_size,
                          batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.embed.concurrency),
                          num_gpus=1 if gpu else 0)


def run_embed_many(cfg: Config, outs: list[Path]) -> dict:
    """Embed the users of several run folders in one Ray Data job (a study builds many small folders).

    Each folder gets the same ``embeddings.parquet/`` that :func:`run_embed` writes; folders
    already embedded with these settings are skipped.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from mta_ray.engine.raysetup import init_ray

    todo = [o for o in outs if not _is_current(o, cfg)]
    if not todo:
        return {"skipped": True, "folders": len(outs)}
    init_ray(cfg)
    t0 = time.time()
    parts = []
    for i, o in enumerate(todo):  # small folders: read here, tag each row with its folder
        t = pq.read_table(RunLayout(o).users, columns=["user_id", "history"])
        parts.append(t.append_column("path", pa.array([str(i)] * t.num_rows)))
    with _ordered_execution():
        ds = ray.data.from_arrow(parts)
        progress = Progress("embed", "users", sum(p.num_rows for p in parts))
        blocks = []
        for ref in _embedded(cfg, ds).to_arrow_refs():
            blocks.append(ray.get(ref))
            progress.add(blocks[-1].num_rows)
        table = pa.concat_tables(blocks)
    for i, out in enumerate(todo):
        rows = table.filter(pc.equal(table.column("path"), str(i))).drop_columns(["path"])
        with _publish(out, cfg) as tmp:
            pq.write_table(rows, tmp / "part-00000.parquet")
    return {"skipped": False, "folders": len(todo), "users": table.num_rows, "seconds": round(time.time() - t0, 1)}
