"""Stage ``prepare``: read LaMP / processed / synthetic users into ``<out>/users.parquet``.

Run: ``mta-ray prepare configs/lamp/lamp2.yaml data.format=processed data.path=FILE --out DIR``
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from .config import Config, save_resolved, section_hash
from .data import read_users, write_users
from .fsutil import atomic_write_text
from .synthetic import persona_table

USERS_FILE = "users.parquet"
HASH_KEY = b"mta_ray.data_hash"


def data_hash(cfg: Config) -> str:
    return section_hash(cfg, "data")


def is_current(out: Path, cfg: Config) -> bool:
    """True when ``users.parquet`` exists and was built from the same data settings."""
    path = out / USERS_FILE
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, ValueError):  # unreadable or foreign file: rebuild it
        return False
    return meta.get(HASH_KEY, b"").decode() == data_hash(cfg)


def run_prepare(cfg: Config, out: Path, force: bool = False) -> dict:
    """Write the users table (skipped when up to date); returns a summary."""
    path = out / USERS_FILE
    if not force and is_current(out, cfg):
        table = pq.read_table(path, columns=["user_id"])
        return {"users": table.num_rows, "path": str(path), "skipped": True}
    users = read_users(cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    write_users(users, path, metadata={HASH_KEY: data_hash(cfg).encode()})
    save_resolved(cfg, out, "prepare")
    if cfg.data.format == "synthetic":
        personas = persona_table(cfg.data.synthetic.num_personas, cfg.data.synthetic.seed)
        atomic_write_text(out / "personas.json", json.dumps(personas, indent=1))
    return {
        "users": len(users),
        "history_items": sum(len(u["history"]) for u in users),
        "queries": sum(len(u["queries"]) for u in users),
        "task": cfg.data.task,
        "path": str(path),
        "skipped": False,
    }
