"""Sharded per-user adapter store: a few large safetensors shards plus an index table.

Layout of ``<dir>/``:
- ``layout.json``: the module order and factor shapes shared by every user;
- ``shard-NNNNN.safetensors``: one flat bf16 vector per user (all factors, in layout order);
- ``index-NNNNN.parquet``: one row per user of that shard: user_id, anchors, weights,
  shard, key, offset (bytes into the shard's data), numel, steps, final_loss, status, error.

A shard and its index are written once, atomically (shard first, then index):
a user appears in the store only when both exist, so a killed run loses at most
the users of the shard being written, and rerunning trains exactly those.
Not one file per user: millions of tiny files break file systems.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mta_ray.core.lora import Lora, LoraPair
from mta_ray.files.atomic import atomic_path, atomic_write_text

INDEX_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("anchors", pa.list_(pa.string())), ("weights", pa.list_(pa.float32())),
    ("shard", pa.string()), ("key", pa.string()), ("offset", pa.int64()), ("numel", pa.int64()),
    ("steps", pa.int32()), ("final_loss", pa.float32()), ("status", pa.string()), ("error", pa.string()),
])


class Packed(NamedTuple):
    """An adapter as the store keeps it: one flat bf16 vector and the layout that reads it back. A worker
    packs its users' adapters itself, so half the bytes cross to the driver and the driver only writes."""

    vector: torch.Tensor
    layout: list[list[Any]]


def _layout_of(lora: Lora) -> list[list[Any]]:
    return [[name, list(p.A.shape), list(p.B.shape)] for name, p in sorted(lora.items())]


def flatten(lora: Lora) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for _, p in sorted(lora.items()) for t in (p.A, p.B)]).to(torch.bfloat16)


def pack(lora: Lora) -> Packed:
    return Packed(flatten(lora), _layout_of(lora))


def unflatten(vec: torch.Tensor, layout: list[list[Any]]) -> Lora:
    out, pos = {}, 0
    for name, a_shape, b_shape in layout:
        na, nb = a_shape[0] * a_shape[1], b_shape[0] * b_shape[1]
        A = vec[pos:pos + na].reshape(a_shape).float()
        B = vec[pos + na:pos + na + nb].reshape(b_shape).float()
        out[name] = LoraPair(A, B)
        pos += na + nb
    return out


class AdapterStore:
    def __init__(self, path: str | Path, shard_users: int = 256):
        self.path = Path(path)
        self.shard_users = shard_users
        self._pending: list[tuple[dict, torch.Tensor | None]] = []
        self._layout = self._read_layout()

    # ------------------------------------------------------------------ reading
    def _read_layout(self) -> list | None:
        p = self.path / "layout.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def index(self) -> pa.Table:
        """All committed rows (shards whose index exists)."""
        files = sorted(self.path.glob("index-*.parquet"))
        if not files:
            return INDEX_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(f, schema=INDEX_SCHEMA) for f in files])

    def stored_users(self) -> set[str]:
        return set(self.index().column("user_id").to_pylist())

    def load(self, row: dict) -> Lora | None:
        """One user's adapter from its index row (None for a failed user)."""
        if row["status"] != "ok":
            return None
        with safe_open(str(self.path / row["shard"]), framework="pt") as f:
            vec = f.get_tensor(row["key"])
        return unflatten(vec, self._layout)

    def iter_rows(self, batch_rows: int = 1024) -> Iterator[dict]:
        """Committed rows, one shard's index at a time, ``batch_rows`` in memory (never the whole index)."""
        for f in sorted(self.path.glob("index-*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()

    def rows_by_user(self) -> dict[str, dict]:
        return {r["user_id"]: r for r in self.index().to_pylist()}

    # ------------------------------------------------------------------ writing
    def add(self, user_id: str, lora: Lora | Packed | None, anchors: list[str], weights: list[float], steps: int,
            final_loss: float, status: str = "ok", error: str = "") -> None:
        vec = None
        if lora is not None:
            vec, layout = lora if isinstance(lora, Packed) else pack(lora)
            if self._layout is None:
                self.path.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.path / "layout.json", json.dumps(layout))
                self._layout = layout
            elif layout != self._layout:
                raise ValueError("adapter layout differs from the store's layout.json")
        row = {"user_id": user_id, "anchors": anchors, "weights": weights, "steps": steps,
               "final_loss": final_loss, "status": status, "error": error}
        self._pending.append((row, vec))
        if len(self._pending) >= self.shard_users:
            self.flush()

    def _next_shard(self) -> int:
        numbers = [int(m.group(1)) for p in self.path.glob("shard-*.safetensors")
                   if (m := re.match(r"shard-(\d+)\.safetensors$", p.name))]
        numbers += [int(m.group(1)) for p in self.path.glob("index-*.parquet")
                    if (m := re.match(r"index-(\d+)\.parquet$", p.name))]
        return max(numbers, default=-1) + 1

    def flush(self) -> None:
        """Commit pending users as one shard + its index (atomically, in that order)."""
        if not self._pending:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        n = self._next_shard()
        shard = f"shard-{n:05d}.safetensors"
        tensors = {f"u{i}": vec for i, (_, vec) in enumerate(self._pending) if vec is not None}
        with atomic_path(self.path / shard) as tmp:
            save_file(tensors or {"empty": torch.zeros(1, dtype=torch.bfloat16)}, str(tmp))
        offsets = _data_offsets(self.path / shard)
        rows = []
        for i, (row, vec) in enumerate(self._pending):
            key = f"u{i}" if vec is not None else ""
            start, end = offsets.get(key, (0, 0))
            rows.append({**row, "shard": shard, "key": key, "offset": start,
                         "numel": (end - start) // 2 if key else 0})
        with atomic_path(self.path / f"index-{n:05d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
        self._pending = []


def _data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of each tensor in a safetensors file (absolute, from the file's start)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}
