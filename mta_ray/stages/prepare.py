"""Stage ``prepare``: read LaMP / processed / synthetic users into ``<out>/users.parquet``.

Run: ``mta-ray prepare configs/lamp/lamp2.yaml data.format=processed data.path=FILE --out DIR``
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pyarrow.parquet as pq

from mta_ray.config import Config, section_hash
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.layout import RunLayout
from mta_ray.files.sources import iter_users
from mta_ray.files.synthetic import persona_table
from mta_ray.files.tables import write_users

HASH_KEY = b"mta_ray.data_hash"


def data_hash(cfg: Config) -> str:
    return section_hash(cfg, "data")


def is_current(out: Path, cfg: Config) -> bool:
    """True when ``users.parquet`` exists and was built from the same data settings."""
    path = RunLayout(out).users
    if not path.is_file():
        return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, ValueError):  # unreadable or foreign file: rebuild it
        return False
    return meta.get(HASH_KEY, b"").decode() == data_hash(cfg)


def run_prepare(cfg: Config, out: Path, force: bool = False) -> dict:
    """Write the users table (skipped when up to date); returns a summary."""
    run = RunLayout(out)
    path = run.users
    if not force and is_current(out, cfg):
        table = pq.read_table(path, columns=["user_id"])
        return {"users": table.num_rows, "path": str(path), "skipped": True}
    counts = {"users": 0, "history_items": 0, "queries": 0}

    def counted(users):
        for u in users:
            counts["users"] += 1
            counts["history_items"] += len(u["history"])
            counts["queries"] += len(u["queries"])
            yield u

    users = iter_users(cfg.data)
    first = next(users, None)  # reads and validates the source before anything is written
    if first is None:
        raise InputError(str(cfg.data.path or "data.synthetic"), "no users")
    out.mkdir(parents=True, exist_ok=True)
    write_users(counted(itertools.chain([first], users)), path, metadata={HASH_KEY: data_hash(cfg).encode()})
    if cfg.data.format == "synthetic":
        personas = persona_table(cfg.data.synthetic.num_personas, cfg.data.synthetic.seed)
        atomic_write_text(run.personas, json.dumps(personas, indent=1))
    return {
        **counts,
        "task": cfg.data.task,
        "path": str(path),
        "skipped": False,
    }
