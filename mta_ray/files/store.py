"""Sharded per-user adapter store: a few large safetensors shards plus an index table.

Layout of ``<dir>/``:
- ``layout.json``: the module order and factor shapes shared by every user;
- ``shard-NNNNN.safetensors``: one flat bf16 vector per user (all factors, in layout order);
- ``index-NNNNN.parquet``: one row per user of that shard: user_id, anchors, weights,
  shard, key, offset (bytes into the shard's data), numel, steps, final_loss, status, error,
  sha256 (of the user's bytes: verified on every read, a damaged shard names its file and user).

A shard and its index are written once, atomically (shard first, then index):
a user appears in the store only when both exist, so a killed run loses at most
the users of the shard being written, and rerunning trains exactly those.
Not one file per user: millions of tiny files break file systems.

A user whose training failed is stored with its status; a rerun trains it again, up to
:data:`MAX_ATTEMPTS` attempts in all (each attempt is a row, so the store records them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mta_ray.core.lora import Lora, LoraPair
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_path, atomic_write_text
from mta_ray.files.checksums import sha256_bytes

INDEX_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("anchors", pa.list_(pa.string())), ("weights", pa.list_(pa.float32())),
    ("shard", pa.string()), ("key", pa.string()), ("offset", pa.int64()), ("numel", pa.int64()),
    ("steps", pa.int32()), ("final_loss", pa.float32()), ("status", pa.string()), ("error", pa.string()),
    ("sha256", pa.string()),
])
MAX_ATTEMPTS = 3
"""Trainings a user gets in all: a failed user is retried on reruns until it succeeds or has failed this often."""


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
        """All committed rows (shards whose index exists); a damaged index is an InputError naming it."""
        files = sorted(self.path.glob("index-*.parquet"))
        if not files:
            return INDEX_SCHEMA.empty_table()
        return pa.concat_tables([_read_index(f) for f in files])

    def stored_users(self) -> set[str]:
        """Every user with a row (trained, or failed)."""
        return set(self.index().column("user_id").to_pylist())

    def finished_users(self) -> set[str]:
        """Users a rerun leaves alone: stored ``ok``, or failed :data:`MAX_ATTEMPTS` times."""
        ok, failures = set(), {}
        for uid, status in zip(*(self.index().column(c).to_pylist() for c in ("user_id", "status"))):
            if status == "ok":
                ok.add(uid)
            else:
                failures[uid] = failures.get(uid, 0) + 1
        return ok | {u for u, n in failures.items() if n >= MAX_ATTEMPTS}

    def load(self, row: dict) -> Lora | None:
        """One user's adapter from its index row (None for a failed user), its bytes checked against the
        checksum recorded when it was written."""
        if row["status"] != "ok":
            return None
        shard, who = self.path / row["shard"], f"user {row['user_id']!r}"
        try:
            with safe_open(str(shard), framework="pt") as f:
                vec = f.get_tensor(row["key"])
        except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
            raise InputError(str(shard), f"cannot read {who}'s adapter ({_first(exc)}): the shard is damaged; "
                                         "delete it and its index, then rerun personalize") from None
        expected = row.get("sha256")
        if vec.numel() != row["numel"] or (expected and _digest(vec) != expected):
            raise InputError(str(shard), f"checksum mismatch for {who}: the shard is damaged; delete it and "
                                         "its index, then rerun personalize")
        if self._layout is None:
            raise InputError(str(self.path / "layout.json"), "missing: the store is damaged")
        return unflatten(vec, self._layout)

    def count_rows(self) -> int:
        """Committed rows (one per attempt), from the index files' footers alone."""
        return sum(pq.ParquetFile(f).metadata.num_rows for f in self.path.glob("index-*.parquet"))

    def iter_rows(self, batch_rows: int = 1024) -> Iterator[dict]:
        """Committed rows, one shard's index at a time, ``batch_rows`` in memory (never the whole index)."""
        for f in sorted(self.path.glob("index-*.parquet")):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()

    def rows_by_user(self) -> dict[str, dict]:
        """Each user's row: its ``ok`` one when it has one, else its last failed attempt."""
        rows: dict[str, dict] = {}
        for r in self.index().to_pylist():
            if rows.get(r["user_id"], {}).get("status") != "ok":
                rows[r["user_id"]] = r
        return rows

    def repair(self) -> list[str]:
        """Before writing: drop what a killed run or a damaged folder left behind, so nothing unreferenced
        stays (and is counted in the storage figures): temporary files, shards without an index, and
        indexes that cannot be read (with their shard: those users are trained again). Returns what
        was removed."""
        if not self.path.is_dir():
            return []
        removed = []
        for idx in sorted(self.path.glob("index-*.parquet")):
            try:
                _read_index(idx)
            except InputError:
                removed.append(idx.name)
                idx.unlink()
        indexed = {p.name.replace("index-", "shard-").replace(".parquet", ".safetensors")
                   for p in self.path.glob("index-*.parquet")}
        for p in sorted(self.path.iterdir()):
            if (p.name.startswith("shard-") and p.name not in indexed) or p.name.endswith(".tmp"):
                removed.append(p.name)
                p.unlink()
        return removed

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

    def rewrite(self, transform: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Replace every stored vector by ``transform(vec)`` (same size), shard by shard: the shard and then
        its index (new checksums) are each replaced atomically. Returns the adapters rewritten."""
        rewritten = 0
        for idx in sorted(self.path.glob("index-*.parquet")):
            rows = _read_index(idx).to_pylist()
            shard = self.path / idx.name.replace("index-", "shard-").replace(".parquet", ".safetensors")
            tensors = load_file(str(shard))
            out = {k: v if k == "empty" else transform(v).to(torch.bfloat16).contiguous() for k, v in tensors.items()}
            with atomic_path(shard) as tmp:
                save_file(out, str(tmp))
            offsets = _data_offsets(shard)
            for row in rows:
                if row["key"]:
                    row["offset"], row["sha256"] = offsets[row["key"]][0], _digest(out[row["key"]])
                    rewritten += 1
            with atomic_path(idx) as tmp:
                pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
        return rewritten

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
                         "numel": (end - start) // 2 if key else 0, "sha256": _digest(vec) if key else ""})
        with atomic_path(self.path / f"index-{n:05d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
        self._pending = []


def _digest(vec: torch.Tensor) -> str:
    """SHA-256 of a stored vector's bytes (bf16)."""
    return sha256_bytes(vec.detach().cpu().contiguous().view(torch.int16).numpy().tobytes())


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _read_index(path: Path) -> pa.Table:
    """One index file in :data:`INDEX_SCHEMA` (columns an older store lacks are null)."""
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise InputError(str(path), f"cannot read the store's index ({_first(exc)}): delete it and rerun "
                                    "personalize (its users are trained again)") from None
    for name in INDEX_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, INDEX_SCHEMA.field(name).type))
    return table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


def _data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of each tensor in a safetensors file (absolute, from the file's start)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}
