"""Provenance: what each stage output was made from, recorded beside it and checked before it is reused.

A step's record (``<step>.provenance.json``) holds the settings that determine its output (dotted keys,
its own and every upstream stage's), the records of the outputs it read (by hash), and for ``prepare``
the SHA-256 of the input data files. The stage runner (``stages.run``) compares the record with what the
current config and inputs would give before a step reuses its output or reads another's: a stale output
is redone (cheap stages) or refused with one line naming the setting that changed (trained stages),
never reused silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta_ray.config import Config, to_dict
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.checksums import sha256_file
from mta_ray.files.layout import MANIFEST, RunLayout

RUN_ONLY = ("embed.batch_size", "embed.concurrency", "embed.device", "model.cache_dir", "adapt.slots",
            "adapt.max_rows", "adapt.shard_users", "bank.engine", "bank.deepspeed", "eval", "ray", "bench",
            "study")
"""Settings that change how a stage runs, not what it makes (batching, placement, caches, reports)."""

SETTINGS: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "embed": ("embed",),
    "cluster": ("bank.num_clusters", "bank.min_items", "bank.minibatch_kmeans_above", "seed"),
    "bank": ("model", "bank", "seed"),
    "personalize-mta": ("model", "merge", "adapt", "seed"),
    "personalize-adapt_only": ("model", "adapt", "seed"),
    "personalize-oppu": ("model", "oppu", "seed"),
}
"""Each step's own settings (dotted prefixes); its record adds those of the steps it reads."""

UPSTREAM: dict[str, tuple[str, ...]] = {
    "prepare": (), "embed": ("prepare",), "cluster": ("embed",), "bank": ("cluster",),
    "personalize-mta": ("bank",), "personalize-adapt_only": ("prepare",), "personalize-oppu": ("prepare",),
}
"""The steps whose outputs each step reads (transitively: the bank's record holds the cluster's...)."""

REDONE = ("prepare", "embed", "cluster")
"""Steps whose stale output is rebuilt (quick, written whole); the others refuse unless forced."""


def stage_command(step: str) -> str:
    stage, _, kind = step.partition("-")
    return f"mta-ray {stage}" + (f" --kind {kind}" if kind else "")


def output_path(run: RunLayout, step: str) -> Path:
    """The file or folder a step writes (what its record describes)."""
    stage, _, kind = step.partition("-")
    return {"prepare": run.users, "embed": run.embeddings, "cluster": run.anchors,
            "bank": run.bank / MANIFEST}.get(stage) or run.store(kind)


def output_exists(run: RunLayout, step: str) -> bool:
    path = output_path(run, step)
    if step.startswith("personalize"):
        return path.is_dir() and any(path.glob("index-*.parquet"))
    return path.exists()


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def settings_of(cfg: Config, step: str) -> dict[str, Any]:
    """Every setting that determines ``step``'s output: its own and its upstream steps', dotted."""
    flat: dict[str, Any] = {}
    _flatten("", to_dict(cfg), flat)
    prefixes, todo = set(), [step]
    while todo:
        s = todo.pop()
        prefixes.update(SETTINGS[s])
        todo.extend(UPSTREAM[s])
    keep = lambda k, ps: any(k == p or k.startswith(p + ".") for p in ps)  # noqa: E731
    return {k: v for k, v in sorted(flat.items()) if keep(k, prefixes) and not keep(k, RUN_ONLY)}


def data_files(cfg: Config) -> list[Path]:
    """The input files ``prepare`` reads (none for synthetic users)."""
    d = cfg.data
    if d.format == "synthetic" or not d.path:
        return []
    path = Path(d.path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if d.outputs_path:
        files.append(Path(d.outputs_path))
    elif d.format == "lamp" and path.is_file() and "questions" in path.name:
        files.append(path.with_name(path.name.replace("questions", "outputs")))
    return [f for f in files if f.is_file()]


@dataclass
class Record:
    step: str
    settings: dict[str, Any]
    inputs: dict[str, str]
    data: dict[str, str]

    @property
    def hash(self) -> str:
        payload = json.dumps([self.settings, self.inputs, self.data], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"step": self.step, "hash": self.hash, "settings": self.settings,
                           "inputs": self.inputs, "data": self.data}, indent=1, default=str)


def read_record(run: RunLayout, step: str) -> Record | None:
    path = run.provenance(step)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Record(step, raw["settings"], raw["inputs"], raw["data"])
    except (ValueError, KeyError, TypeError, OSError):
        return None  # a damaged record: the output counts as made from unknown settings


def expected_record(cfg: Config, run: RunLayout, step: str) -> Record:
    """The record ``step`` would get from this config and the current records of its inputs."""
    inputs = {}
    for up in UPSTREAM[step]:
        rec = read_record(run, up)
        inputs[up] = rec.hash if rec else "missing"
    data = {str(f): sha256_file(f) for f in data_files(cfg)} if step == "prepare" else {}
    return Record(step, json.loads(json.dumps(settings_of(cfg, step), default=str)), inputs, data)


def write_record(run: RunLayout, record: Record) -> None:
    atomic_write_text(run.provenance(record.step), record.to_json() + "\n")


def difference(old: Record | None, new: Record) -> str:
    """What changed, for one line: the settings first (``adapt.rank=4, the config has 8``), else the input."""
    if old is None:
        return "made by an older version or from unknown settings (no provenance record)"
    changed = [k for k in sorted(set(old.settings) | set(new.settings)) if old.settings.get(k) != new.settings.get(k)]
    if changed:
        shown = "; ".join(f"{k}={_show(old.settings.get(k))}, the config has {_show(new.settings.get(k))}"
                          for k in changed[:3])
        return f"made with {shown}" + (f" (and {len(changed) - 3} more settings)" if len(changed) > 3 else "")
    for name in sorted(set(old.data) | set(new.data)):
        if old.data.get(name) != new.data.get(name):
            return f"made from another version of the data file {name}"
    for up in sorted(set(old.inputs) | set(new.inputs)):
        if old.inputs.get(up) != new.inputs.get(up):
            return f"made from another output of `{stage_command(up)}` (rebuilt since)"
    return "made from other inputs"


def _show(value: Any) -> str:
    return "<unset>" if value is None else json.dumps(value, default=str)


def stale(cfg: Config, run: RunLayout, step: str) -> str | None:
    """Why ``step``'s existing output does not match the config and its inputs (None: it matches, or
    there is no output yet)."""
    if not output_exists(run, step):
        return None
    old, new = read_record(run, step), expected_record(cfg, run, step)
    return None if old is not None and old.hash == new.hash else difference(old, new)


def check_inputs(cfg: Config, run: RunLayout, steps: tuple[str, ...] | list[str]) -> None:
    """Every output these steps made (the inputs of the next step) matches the config, else one line
    naming the output, the setting that changed and the command that rebuilds it."""
    for up in steps:
        for s in _with_upstream(up):
            why = stale(cfg, run, s)
            if why:
                raise InputError(str(output_path(run, s)), f"{why}: rerun `{stage_command(s)}` (with --force) or "
                                                         "`mta-ray run --force`, or use another --out")


def _with_upstream(step: str) -> list[str]:
    """The step and every step above it, the earliest first (so a message names the root cause)."""
    order, todo = [], [step]
    while todo:
        s = todo.pop()
        if s not in order:
            order.append(s)
            todo.extend(UPSTREAM[s])
    return list(reversed(order))
