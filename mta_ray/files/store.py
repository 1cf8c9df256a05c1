"""Sharded per-user adapter store: a few large safetensors shards plus an index table.

Layout of ``<dir>/``:
- ``layout.json``: the module order and factor shapes shared by every user (a list; an ``int8`` store
  writes ``{"precision": "int8", "modules": [...]}``);
- ``shard-NNNNN.safetensors``: one flat vector per user (all factors, in layout order): bf16, or, in an
  ``int8`` store (``adapt.storage_precision: int8``), int8 values in ``u<i>`` and one bf16 scale per rank
  component in ``u<i>.scale`` (:mod:`mta_ray.core.quant`: half the bytes, read back dequantised);
- ``index-NNNNN.parquet``: one row per user of that shard: user_id, anchors, weights,
  shard, key, offset (bytes into the shard's data), numel (values), steps, final_loss, status, error,
  sha256 (of the user's bytes, scales included: verified on every read, a damaged shard names its file
  and user).

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
from typing import Any, Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mta_ray.core.lora import Lora, LoraPair
from mta_ray.core.quant import PRECISIONS, dequantize_int8, quantize_int8
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
    """An adapter as the store keeps it: one flat vector, the layout that reads it back and, at int8, one
    bf16 scale per rank component. A worker packs its users' adapters itself, so a half (bf16) or a quarter
    (int8) of the bytes cross to the driver and the driver only writes."""

    vector: torch.Tensor
    layout: list[list[Any]]
    scales: torch.Tensor | None = None

    @property
    def precision(self) -> str:
        return "int8" if self.scales is not None else "bfloat16"


def _layout_of(lora: Lora) -> list[list[Any]]:
    return [[name, list(p.A.shape), list(p.B.shape)] for name, p in sorted(lora.items())]


def flatten(lora: Lora) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for _, p in sorted(lora.items()) for t in (p.A, p.B)]).to(torch.bfloat16)


def pack(lora: Lora, precision: str = "bfloat16") -> Packed:
    """``lora`` as the store keeps it at ``precision`` (``bfloat16`` or ``int8``)."""
    if precision == "bfloat16":
        return Packed(flatten(lora), _layout_of(lora))
    if precision not in PRECISIONS:
        raise ValueError(f"unknown storage precision {precision!r}; known: {', '.join(PRECISIONS)}")
    values, scales = [], []
    for _, p in sorted(lora.items()):
        (qa, sa), (qb, sb) = quantize_int8(p.A, dim=0), quantize_int8(p.B, dim=1)  # per rank component
        values += [qa.reshape(-1), qb.reshape(-1)]
        scales += [sa.reshape(-1), sb.reshape(-1)]
    return Packed(torch.cat(values), _layout_of(lora), torch.cat(scales))


def unflatten(vec: torch.Tensor, layout: list[list[Any]], scales: torch.Tensor | None = None) -> Lora:
    """The adapter of one stored vector (``scales``: an int8 vector's, dequantised as :func:`quant.roundtrip`)."""
    out, pos, spos = {}, 0, 0
    for name, a_shape, b_shape in layout:
        na, nb, r = a_shape[0] * a_shape[1], b_shape[0] * b_shape[1], a_shape[0]
        A, B = vec[pos:pos + na].reshape(a_shape), vec[pos + na:pos + na + nb].reshape(b_shape)
        if scales is None:
            out[name] = LoraPair(A.float(), B.float())
        else:
            out[name] = LoraPair(dequantize_int8(A, scales[spos:spos + r].reshape(r, 1)),
                                 dequantize_int8(B, scales[spos + r:spos + 2 * r].reshape(1, r)))
        pos, spos = pos + na + nb, spos + 2 * r
    return out


def read_layout(path: Path) -> tuple[list | None, str]:
    """(modules, precision) of the store at ``path`` (``(None, "bfloat16")`` before its first adapter)."""
    p = path / "layout.json"
    if not p.is_file():
        return None, "bfloat16"
    data = json.loads(p.read_text())
    return (data, "bfloat16") if isinstance(data, list) else (data["modules"], data["precision"])


class AdapterStore:
    """``precision``: how adapters given unpacked are stored (a :class:`Packed` one carries its own); a store
    holds one precision, set by its first adapter."""

    def __init__(self, path: str | Path, shard_users: int = 256, precision: str = "bfloat16"):
        self.path = Path(path)
        self.shard_users = shard_users
        self.precision = precision
        self._pending: list[tuple[dict, Packed | None]] = []
        self._layout, self._stored_precision = read_layout(self.path)

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
                scales = f.get_tensor(row["key"] + ".scale") if self._stored_precision == "int8" else None
        except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
            raise InputError(str(shard), f"cannot read {who}'s adapter ({_first(exc)}): the shard is damaged; "
                                         "delete it and its index, then rerun personalize") from None
        expected = row.get("sha256")
        if vec.numel() != row["numel"] or (expected and _digest(vec, scales) != expected):
            raise InputError(str(shard), f"checksum mismatch for {who}: the shard is damaged; delete it and "
                                         "its index, then rerun personalize")
        if self._layout is None:
            raise InputError(str(self.path / "layout.json"), "missing: the store is damaged")
        return unflatten(vec, self._layout, scales)

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
        packed = None
        if lora is not None:
            packed = lora if isinstance(lora, Packed) else pack(lora, self.precision)
            self._check_layout(packed)
        row = {"user_id": user_id, "anchors": anchors, "weights": weights, "steps": steps,
               "final_loss": final_loss, "status": status, "error": error}
        self._pending.append((row, packed))
        if len(self._pending) >= self.shard_users:
            self.flush()

    def _check_layout(self, packed: Packed) -> None:
        """The first adapter writes ``layout.json``; every later one must have its layout and precision."""
        if self._layout is None:
            self.path.mkdir(parents=True, exist_ok=True)
            data = packed.layout if packed.precision == "bfloat16" else {"precision": packed.precision,
                                                                         "modules": packed.layout}
            atomic_write_text(self.path / "layout.json", json.dumps(data))
            self._layout, self._stored_precision = packed.layout, packed.precision
        elif packed.layout != self._layout:
            raise ValueError("adapter layout differs from the store's layout.json")
        elif packed.precision != self._stored_precision:
            raise ValueError(f"adapter stored as {packed.precision}, the store's layout.json holds "
                             f"{self._stored_precision}")

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
        tensors = {}
        for i, (_, packed) in enumerate(self._pending):
            if packed is not None:
                tensors[f"u{i}"] = packed.vector
                if packed.scales is not None:
                    tensors[f"u{i}.scale"] = packed.scales
        with atomic_path(self.path / shard) as tmp:
            save_file(tensors or {"empty": torch.zeros(1, dtype=torch.bfloat16)}, str(tmp))
        offsets = _data_offsets(self.path / shard)
        rows = []
        for i, (row, packed) in enumerate(self._pending):
            key = f"u{i}" if packed is not None else ""
            rows.append({**row, "shard": shard, "key": key, "offset": offsets.get(key, (0, 0))[0],
                         "numel": packed.vector.numel() if key else 0,
                         "sha256": _digest(packed.vector, packed.scales) if key else ""})
        with atomic_path(self.path / f"index-{n:05d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA), tmp)
        self._pending = []


def _digest(vec: torch.Tensor, scales: torch.Tensor | None = None) -> str:
    """SHA-256 of a stored vector's bytes, then its scales' (an int8 store)."""
    return sha256_bytes(b"".join(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                                 for t in (vec, scales) if t is not None))


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
