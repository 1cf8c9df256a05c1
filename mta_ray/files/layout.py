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
```
Stages read and write the folder through :class:`RunLayout`, never through each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mta_ray.config import Config, dump_yaml
from mta_ray.core.adaptive import AnchorRetriever
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text

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
    return json.loads(path.read_text()) if path.is_file() else {"anchors": []}


def write_manifest(bank_dir: str | Path, anchors: list[dict[str, Any]]) -> None:
    atomic_write_text(Path(bank_dir) / MANIFEST, json.dumps({"anchors": anchors}, indent=1))


def anchor_paths(bank_dir: str | Path) -> dict[str, Path]:
    """Anchor id -> its PEFT adapter folder, for every anchor of the bank's manifest."""
    return {a["anchor_id"]: Path(bank_dir) / a["path"] for a in read_manifest(bank_dir)["anchors"]}


def bank_retriever(cfg: Config, bank_dir: str | Path) -> AnchorRetriever:
    """Top-K anchors and merge weights (``merge:`` settings) over the anchors of this bank's manifest."""
    anchors = read_manifest(bank_dir)["anchors"]
    if not anchors:
        raise InputError(str(bank_dir), "the bank is empty (run `mta-ray bank` first)")
    m = cfg.merge
    return AnchorRetriever([a["anchor_id"] for a in anchors], np.array([a["retrieval_emb"] for a in anchors]),
                           m.top_k, m.min_similarity, m.fixed_alpha)
