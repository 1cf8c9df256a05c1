"""``mta-ray export``: one user's personalised model as a standard PEFT LoRA adapter.

The adapter is the merged anchors plus the stacked adapter, exact in delta
space (merge in ``params`` space is exported as what it computes, too):
``PeftModel.from_pretrained(base, DIR)`` reproduces our outputs.

Run: ``mta-ray export configs/demo.yaml --run runs/demo --out exported/ user_id=synth-00005``
"""

from __future__ import annotations

from pathlib import Path

from mta_ray.config import Config
from mta_ray.core.lora import Lora, merge, stack
from mta_ray.core.methods import PROPOSED
from mta_ray.errors import InputError
from mta_ray.files.layout import RunLayout, anchor_paths
from mta_ray.files.peft_format import load_peft, save_peft
from mta_ray.files.store import AdapterStore


def personalised_lora(cfg: Config, run_dir: Path, user_id: str) -> tuple[Lora, dict]:
    """A user's whole adapter (merged anchors + stacked adapter as one LoRA) and its store row."""
    run = RunLayout(run_dir)
    store = AdapterStore(run.store(PROPOSED))
    row = store.rows_by_user().get(user_id)
    if row is None:
        raise InputError(str(store.path), f"user {user_id!r} is not personalised in this run")
    if row["status"] != "ok":
        raise InputError(str(store.path), f"user {user_id!r} failed: {row['error']}")
    paths = anchor_paths(run.bank)
    merged = merge([load_peft(paths[a]) for a in row["anchors"]], list(row["weights"]), cfg.merge.space)
    return stack(merged, store.load(row)), row


def run_export(cfg: Config, run: Path, out: Path, user_id: str) -> dict:
    lora, row = personalised_lora(cfg, run, user_id)
    save_peft(lora, out, base_model=cfg.model.base)
    return {"user_id": user_id, "anchors": row["anchors"], "weights": row["weights"], "path": str(out)}
