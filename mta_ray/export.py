"""``mta-ray export``: one user's personalised model as a standard PEFT LoRA adapter.

The adapter is the merged anchors plus the stacked adapter, exact in delta
space (merge in ``params`` space is exported as what it computes, too):
``PeftModel.from_pretrained(base, DIR)`` reproduces our outputs.

Run: ``mta-ray export configs/demo.yaml --run runs/demo --out exported/ user_id=synth-00005``
"""

from __future__ import annotations

from pathlib import Path

from .bank import read_manifest
from .config import Config
from .errors import InputError
from .lora import load_peft, merge, save_peft, stack
from .personalize import store_dir
from .store import AdapterStore


def personalised_lora(cfg: Config, run: Path, user_id: str):
    store = AdapterStore(store_dir(run, "mta"))
    row = store.rows_by_user().get(user_id)
    if row is None:
        raise InputError(str(store.path), f"user {user_id!r} is not personalised in this run")
    if row["status"] != "ok":
        raise InputError(str(store.path), f"user {user_id!r} failed: {row['error']}")
    paths = {a["anchor_id"]: run / "bank" / a["path"] for a in read_manifest(run)["anchors"]}
    merged = merge([load_peft(paths[a]) for a in row["anchors"]], list(row["weights"]), cfg.merge.space)
    return stack(merged, store.load(row)), row


def run_export(cfg: Config, run: Path, out: Path, user_id: str) -> dict:
    lora, row = personalised_lora(cfg, run, user_id)
    save_peft(lora, out, base_model=cfg.model.base)
    return {"user_id": user_id, "anchors": row["anchors"], "weights": row["weights"], "path": str(out)}
