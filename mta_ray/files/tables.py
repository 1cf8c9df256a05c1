"""The users table (``users.parquet``) and the tables beside it: written once, streamed in batches.

Stages never hold a whole table: they stream record batches, read the rows of a few users by
predicate pushdown, or walk the users and embeddings tables side by side (row i of both is the same
user, as ``embed`` writes it).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mta_ray.core.tasks import NEGATIVE_POOL, Task
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_path

ITEM = pa.struct([("id", pa.string()), ("input", pa.string()), ("output", pa.string())])
QUERY = pa.struct([("id", pa.string()), ("input", pa.string()), ("gold", pa.string())])
USERS_SCHEMA = pa.schema([
    ("user_id", pa.string()),
    ("task", pa.string()),
    ("history", pa.list_(ITEM)),
    ("queries", pa.list_(QUERY)),
    ("persona", pa.int32()),  # ground truth of synthetic users; null for real data
])



def write_users(users: Iterable[dict], path: str | Path, metadata: dict | None = None,
                batch_rows: int = 4096) -> int:
    """Write the users table atomically, ``batch_rows`` users per row group (streamed); returns the rows."""
    schema = USERS_SCHEMA.with_metadata(metadata or {})
    rows = 0
    users = iter(users)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            while batch := list(itertools.islice(users, batch_rows)):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                rows += len(batch)
    return rows


def load_users(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The whole users table (small tables: studies, evaluation); stages stream with :func:`iter_user_rows`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "users table not found (run `mta-ray prepare` first)")
    return pq.read_table(path, columns=columns)


def parquet_parts(path: str | Path) -> list[Path]:
    """A parquet file, or a folder's part files in name order (the order their rows were written)."""
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "not found (run the stage that writes it first)")
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


def iter_batches(path: str | Path, columns: list[str], batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
    """Record batches of a parquet file or folder, ``batch_rows`` rows in memory at a time."""
    for f in parquet_parts(path):
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns)


def iter_user_rows(path: str | Path, columns: list[str], batch_rows: int = 1024) -> Iterator[dict]:
    """Rows of a parquet file (or folder of parts, in name order) one at a time, ``batch_rows`` in memory."""
    for batch in iter_batches(path, columns, batch_rows):
        yield from batch.to_pylist()


def rows_of_users(path: str | Path, columns: list[str], user_ids: set[str]) -> dict[str, dict]:
    """The rows of these users only, by user id (parquet predicate pushdown: never the whole table)."""
    import pyarrow.compute as pc

    parquet_parts(path)  # a clear error when missing
    wanted = pa.array(sorted(user_ids), pa.string())
    table = pq.read_table(str(path), columns=columns, filters=pc.field("user_id").isin(wanted))
    return {r["user_id"]: r for r in table.to_pylist()}


def load_embeddings(path: str | Path) -> pa.Table:
    """The whole embeddings table (clustering small user sets, studies); stages stream it instead."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(str(path), "embeddings not found (run `mta-ray embed` first)")
    return pq.read_table(str(path), schema=None).select(["user_id", "n_items", "cluster_emb", "retrieval_emb"])


def count_rows(path: str | Path) -> int:
    """Rows of a parquet file or folder from the footers alone."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_parts(path))


Retrieve = Callable[[Any], tuple[list[str], list[float]]]
"""A user's retrieval embedding -> (anchor ids, merge weights): ``files.layout.bank_retriever``."""


def iter_users_with_anchors(users: str | Path, embeddings: str | Path, retrieve: Retrieve | None,
                            skip: set[str] | frozenset[str] = frozenset(),
                            columns: tuple[str, ...] = ("user_id", "history")) -> Iterator[dict]:
    """Every user not in ``skip``, in users-table order, with its top-K ``anchors`` and merge ``weights``
    (empty lists when ``retrieve`` is None: methods that merge nothing).

    Streams the users table (``columns``) and, when retrieving, the embeddings table side by side: the
    driver holds a batch of each, never the tables.
    """
    rows = iter_user_rows(users, list(columns))
    if retrieve is None:
        for u in rows:
            if u["user_id"] not in skip:
                yield {**u, "anchors": [], "weights": []}
        return
    for u, e in itertools.zip_longest(rows, iter_user_rows(embeddings, ["user_id", "retrieval_emb"])):
        if u is None or e is None or u["user_id"] != e["user_id"]:
            raise InputError(str(embeddings), "rows do not match users.parquet (written by an older "
                                              "version or for other users): rerun `mta-ray embed`")
        if u["user_id"] in skip:
            continue
        anchors, weights = retrieve(e["retrieval_emb"])
        yield {**u, "anchors": anchors, "weights": weights}


def task_negatives(users: str | Path, task: Task, seed: int) -> list[tuple[str, str]]:
    """The negatives pool a task's training needs (LaMP-1: :func:`negative_pool`), else none."""
    return negative_pool(users, NEGATIVE_POOL, seed) if task.needs_negatives else []


def negative_pool(users: str | Path, size: int, seed: int) -> list[tuple[str, str]]:
    """A seeded sample of ``size`` (user_id, item input) pairs from every user's history (reservoir
    sampling in one streamed pass: flat memory at any number of users). LaMP-1's hard negatives for a
    user are retrieved from the pool's items of the other users."""
    import random

    rng = random.Random(f"negatives-{seed}")
    pool: list[tuple[str, str]] = []
    seen = 0
    for row in iter_user_rows(users, ["user_id", "history"]):
        for item in row["history"]:
            seen += 1
            if len(pool) < size:
                pool.append((row["user_id"], item["input"]))
            elif (j := rng.randrange(seen)) < size:
                pool[j] = (row["user_id"], item["input"])
    return pool


def others_items(pool: list[tuple[str, str]], owners: Iterable[str]) -> list[str]:
    """The pool's items that belong to none of ``owners`` (a user, or the users an anchor trains on)."""
    mine = set(owners)
    return [text for owner, text in pool if owner not in mine]
