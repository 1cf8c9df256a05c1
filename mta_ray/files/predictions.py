"""Per-method predictions files: every answer with its per-query scores, written as batches finish.

``predictions/<method>.parquet``: one row per query, in user order: ``user_index`` (the user's number
in the run, 0..users-1), ``user_id``, ``query_id``, ``output`` (raw generation), ``prediction`` (parsed),
``gold``, then the task kind's score columns (:data:`mta_ray.core.metrics.SCORE_COLUMNS`). One row group
per evaluated batch; a file appears under its name only when complete (written beside it, renamed).

The report's statistics stream these files block by block of users (:func:`score_blocks`), so they
need memory flat in users and nothing else: the report can be rebuilt from the files alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mta_ray.core.metrics import SCORE_COLUMNS, user_sums
from mta_ray.core.statistics import UserBootstrap
from mta_ray.core.tasks import Task

READ_ROWS = 65536
"""Rows read at a time when streaming a predictions file."""

_SCORE_TYPES = {"correct": pa.bool_(), "pred_label": pa.int16(), "gold_label": pa.int16(),
                "abs_error": pa.float64(), "sq_error": pa.float64(), "rouge1": pa.float64(), "rougeL": pa.float64()}


def schema(task: Task) -> pa.Schema:
    return pa.schema([("user_index", pa.int64()), ("user_id", pa.string()), ("query_id", pa.string()),
                      ("output", pa.string()), ("prediction", pa.string()), ("gold", pa.string())]
                     + [(c, _SCORE_TYPES[c]) for c in SCORE_COLUMNS[task.kind]])


class PredictionsWriter:
    """Appends batches to ``path`` (through ``<path>.partial``); :meth:`close` publishes the file."""

    def __init__(self, path: Path, task: Task):
        self.path, self.schema = Path(path), schema(task)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.partial, self.schema)
        self.rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in self.schema})
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        self._writer.close()
        self.partial.unlink(missing_ok=True)


def n_users(path: Path) -> int:
    """Users in a predictions file: one more than its largest ``user_index`` (from the row groups' statistics)."""
    meta = pq.ParquetFile(path).metadata
    col = meta.schema.names.index("user_index")
    top = -1
    for i in range(meta.num_row_groups):
        st = meta.row_group(i).column(col).statistics
        if st is None or not st.has_min_max:
            return 1 + int(pq.read_table(path, columns=["user_index"]).column(0).to_numpy().max(initial=-1))
        top = max(top, int(st.max))
    return top + 1


def _file_blocks(path: Path, columns: list[str], boot: UserBootstrap) -> Iterator[pa.Table]:
    """The rows of each block of users of ``boot`` in turn (a file holds its users in order)."""
    f = pq.ParquetFile(path)
    selected = pa.schema([f.schema_arrow.field(c) for c in columns])
    j, parts = 0, []
    for batch in f.iter_batches(batch_size=READ_ROWS, columns=columns):
        block = boot.block_of(batch.column(0).to_numpy())
        start = 0
        while start < len(block):
            if block[start] > j:
                yield pa.Table.from_batches(parts, selected)
                j, parts = j + 1, []
                continue
            if block[start] < j:
                raise ValueError(f"{path}: rows are not in user order")
            end = int(np.searchsorted(block, j, side="right"))
            parts.append(batch.slice(start, end - start))
            start = end
    while j < boot.n_blocks:
        yield pa.Table.from_batches(parts, selected)
        j, parts = j + 1, []


def score_blocks(task: Task, paths: dict[str, Path], boot: UserBootstrap) -> Iterator[dict[str, Any]]:
    """For each block of users, method -> the block's per-user sums, read from each method's file."""
    columns = ["user_index", *SCORE_COLUMNS[task.kind]]
    streams = {m: _file_blocks(p, columns, boot) for m, p in paths.items()}
    for j in range(boot.n_blocks):
        out = {}
        for m, stream in streams.items():
            t = next(stream)
            local = t.column("user_index").to_numpy() - j * boot.block_users
            scores = {c: t.column(c).to_numpy(zero_copy_only=False) for c in SCORE_COLUMNS[task.kind]}
            out[m] = user_sums(task, scores, local, int(boot.sizes[j]))
        yield out


def first_rows(path: Path, k: int = 3) -> list[dict[str, Any]]:
    """The first ``k`` answers of a file (the report's examples)."""
    f = pq.ParquetFile(path)
    for batch in f.iter_batches(batch_size=k, columns=["user_id", "query_id", "output", "prediction", "gold"]):
        return batch.to_pylist()
    return []
