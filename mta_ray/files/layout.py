"""The run folder: every file and folder a run holds, named here once, and the bank's manifest.

```
<out>/
  users.parquet          prepare    one row per user: user_id, task, history, queries (persona: synthetic)
  personas.json          prepare    the synthetic generator's persona table (synthetic data only)
  embeddings.parquet/    embed      part files; row i is the user of row i of users.parquet; _hash
  clusters.parquet       cluster    user_id, cluster
  anchors.parquet        cluster    the most active user of each cluster
  bank/                  bank       manifest.json + one PEFT adapter folder per anchor (anchor-NNNN/)
  adapters/<label>/      personalize  a sharded adapter store per trained method (or study variant),
                                      with losses-NNNNN.parquet (each user's step losses) beside its index
  predictions/<method>.parquet  evaluate  every answer, parsed prediction, gold and per-query scores
  report.json, report.md evaluate   built from predictions/ alone (``mta-ray evaluate --report-only``)
  loss-curves.png        evaluate   training loss over optimizer steps (bank anchors, each trained method)
  <step>.config.yaml     every stage  the resolved config of the last run of that step that did work
  <step>.provenance.json every stage  what the step's output was made from (``files.provenance``)
```
Stages read and write the folder through :class:`RunLayout`, never through each other.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mta_ray.config import Config, dump_yaml
from mta_ray.core.adaptive import AnchorRetriever
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.checksums import folder_checksums, verify_folder

MANIFEST = "manifest.json"


class RunLayout:
    """The paths of one run folder (nothing is created until a stage writes)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    users = property(lambda self: self.root / "users.parquet")
    personas = property(lambda self: self.root / "personas.json")
    embeddings = property(lambda self: self.root / "embeddings.parquet")
    embeddings_stamp = property(lambda self: self.root / "embeddings.parquet" / "_hash")
    clusters = property(lambda self: self.root / "clusters.parquet")
    anchors = property(lambda self: self.root / "anchors.parquet")
    bank = property(lambda self: self.root / "bank")
    adapters = property(lambda self: self.root / "adapters")
    report_json = property(lambda self: self.root / "report.json")
    report_md = property(lambda self: self.root / "report.md")
    predictions_dir = property(lambda self: self.root / "predictions")
    loss_curves_png = property(lambda self: self.root / "loss-curves.png")

    def store(self, label: str) -> Path:
        """``adapters/<label>``: the label is a trained method (``mta``...) or a study variant's name."""
        return self.adapters / label

    def predictions(self, method: str) -> Path:
        """``predictions/<method>.parquet``: every answer of a method with its per-query scores (evaluate)."""
        return self.predictions_dir / f"{method}.parquet"

    def resolved_config(self, step: str) -> Path:
        return self.root / f"{step}.config.yaml"

    def provenance(self, step: str) -> Path:
        return self.root / f"{step}.provenance.json"

    def outputs(self) -> list[Path]:
        """Everything a run writes at the top of the folder (files and folders)."""
        return [self.users, self.personas, self.embeddings, self.clusters, self.anchors, self.bank,
                self.adapters, self.report_json, self.report_md]

    def overwrites(self, path: Path) -> bool:
        """Whether a run into this folder writes ``path`` (one of its outputs, or inside one of them)."""
        target = Path(os.path.abspath(path))
        for out in self.outputs():
            out = Path(os.path.abspath(out))
            if target == out or out in target.parents:
                return True
        root = Path(os.path.abspath(self.root))
        return target.parent == root and target.name.endswith((".config.yaml", ".provenance.json"))


def check_writable_folder(path: Path, flag: str) -> None:
    """``path`` is a folder this process can write into, or can be created as one (nothing is created)."""
    if path.exists() and not path.is_dir():
        raise InputError(str(path), f"{flag} is a file, not a folder")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(str(path), f"{flag} lies under {probe}, which is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise InputError(str(path), f"{flag}: cannot write into {probe}: {exc.strerror or exc}") from None


def save_resolved(cfg: Config, folder: str | Path, step: str) -> Path:
    """Write the resolved config as ``<folder>/<step>.config.yaml`` (what made the outputs beside it)."""
    path = RunLayout(folder).resolved_config(step)
    atomic_write_text(path, dump_yaml(cfg))
    return path


# --------------------------------------------------------------------------- the bank

def anchor_folder(cluster: int) -> str:
    """An anchor's folder inside the bank: named by cluster, never by user id (user ids are keys, not paths)."""
    return f"anchor-{cluster:04d}"


def read_manifest(bank_dir: str | Path) -> dict[str, Any]:
    """The bank's manifest ``{"anchors": [{anchor_id, cluster, user_id, path, retrieval_emb, ...}]}``
    (no anchors when the bank has not been trained)."""
    path = Path(bank_dir) / MANIFEST
    if not path.is_file():
        return {"anchors": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(manifest, dict) and isinstance(manifest["anchors"], list)
        return manifest
    except (ValueError, KeyError, AssertionError):
        raise InputError(str(path), "the bank's manifest is damaged: delete the bank and rerun "
                                    "`mta-ray bank`") from None


def write_manifest(bank_dir: str | Path, anchors: list[dict[str, Any]]) -> None:
    """Write the manifest; each anchor gets the checksums of its adapter's files (``files``) the first
    time it is listed, and every read (:func:`anchor_paths`) verifies them."""
    for a in anchors:
        if "files" not in a:
            a["files"] = folder_checksums(Path(bank_dir) / a["path"])
    atomic_write_text(Path(bank_dir) / MANIFEST, json.dumps({"anchors": anchors}, indent=1))


def verify_bank(bank_dir: str | Path) -> None:
    """Every anchor's files as the manifest recorded them, else an InputError naming the file and anchor."""
    for a in read_manifest(bank_dir)["anchors"]:
        verify_folder(Path(bank_dir) / a["path"], a.get("files") or {},
                      f"anchor {a['anchor_id']}, user {a.get('user_id')!r}")


def anchor_paths(bank_dir: str | Path) -> dict[str, Path]:
    """Anchor id -> its PEFT adapter folder, for every anchor of the bank's manifest (checksums verified)."""
    verify_bank(bank_dir)
    return {a["anchor_id"]: Path(bank_dir) / a["path"] for a in read_manifest(bank_dir)["anchors"]}


def bank_retriever(cfg: Config, bank_dir: str | Path) -> AnchorRetriever:
    """Top-K anchors and merge weights (``merge:`` settings) over the anchors of this bank's manifest."""
    anchors = read_manifest(bank_dir)["anchors"]
    if not anchors:
        raise InputError(str(bank_dir), "the bank is empty (run `mta-ray bank` first)")
    m = cfg.merge
    return AnchorRetriever([a["anchor_id"] for a in anchors], np.array([a["retrieval_emb"] for a in anchors]),
                           m.top_k, m.min_similarity, m.fixed_alpha)
