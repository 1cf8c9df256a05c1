"""What the export's rank cap costs: kept energy, update error and answers of capped adapters vs our model.

For each cap, every user of a personalised run is exported (``stages.export``); then every query is
answered greedily by (a) our model as evaluation runs it (merged branch + stacked branch, exact) and
(b) the exported adapter alone, prompts built by the shipped recipe (``engine.serving.user_prompt``).
Reported per cap: rank written, users truncated, kept energy and relative update error (mean and worst
over users' modules), share of answers identical to our model's (generated text, and the parsed
prediction that is scored), accuracy (classification tasks) and adapter bytes per user. Loading an exported folder with PEFT gives the same function as our engine
(``tests/test_export.py``), so (b) runs on our engine, batched.

Run: ``python -m mta_ray.bench.export_fidelity configs/demo.yaml --run runs/demo --caps 8 16 32``
(JSON in ``bench/results/export-fidelity-<config>.json``; the exports go to ``--work``, default a temp folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mta_ray.config import Config, load_config, with_values
from mta_ray.core.lora import merge
from mta_ray.core.tasks import get_task
from mta_ray.engine.generation import generate
from mta_ray.engine.serving import PromptRecipe, user_prompt
from mta_ray.files.layout import RunLayout, anchor_paths
from mta_ray.files.models import load_base
from mta_ray.files.peft_format import load_peft
from mta_ray.files.store import AdapterStore
from mta_ray.files.tables import iter_user_rows
from mta_ray.stages.export import INDEX_FILE, INFO_FILE, run_config, run_export


def _queries(run: Path, recipe: PromptRecipe, tokenizer: Any) -> list[dict]:
    """Every query of the run's users with the ids our model reads (the shipped recipe's prompt)."""
    users = RunLayout(run).users
    return [{"user_id": u["user_id"], "gold": q["gold"],
             "ids": user_prompt(recipe, users, u["user_id"], q["input"], tokenizer).token_ids}
            for u in iter_user_rows(users, ["user_id", "queries"]) for q in u["queries"]]


def _answers(model: Any, tok: Any, queries: list[dict], max_new: int, merged: dict, stacked: dict,
             targets: list[str], batch: int = 16) -> list[str]:
    out: list[str] = []
    for i in range(0, len(queries), batch):
        chunk = queries[i:i + batch]
        out += generate(model, tok, [q["ids"] for q in chunk], max_new,
                        [merged.get(q["user_id"]) for q in chunk], [stacked.get(q["user_id"]) for q in chunk],
                        targets)
    return out


def _ours(resolved: Config, run: Path) -> tuple[dict, dict]:
    """Each user's merged branch and stacked adapter, as evaluation loads them."""
    store = AdapterStore(RunLayout(run).store("mta"))
    paths = anchor_paths(RunLayout(run).bank)
    merged, stacked = {}, {}
    for row in store.iter_rows():
        if row["status"] == "ok":
            merged[row["user_id"]] = merge([load_peft(paths[a]) for a in row["anchors"]], list(row["weights"]),
                                           resolved.merge.space)
            stacked[row["user_id"]] = store.load(row)
    return merged, stacked


def _cap_row(cap: int, out: Path, answers: list[str], ours: list[str], queries: list[dict], task: Any,
             seconds: float) -> dict:
    index = pq.read_table(out / INDEX_FILE).to_pylist()
    modules = [m for r in index for m in json.loads((out / r["folder"] / INFO_FILE).read_text())["modules"].values()]
    parsed, ours_parsed = [task.parse_output(a) for a in answers], [task.parse_output(a) for a in ours]
    row = {"max_rank": cap, "rank": max(r["rank"] for r in index), "users": len(index),
           "truncated_users": sum(not r["exact"] for r in index),
           "kept_energy_mean": sum(m["kept_energy"] for m in modules) / len(modules),
           "kept_energy_min": min(m["kept_energy"] for m in modules),
           "rel_error_mean": sum(m["rel_error"] for m in modules) / len(modules),
           "rel_error_max": max(m["rel_error"] for m in modules),
           "same_text_as_ours": sum(a == b for a, b in zip(answers, ours)) / len(ours),
           "same_prediction_as_ours": sum(a == b for a, b in zip(parsed, ours_parsed)) / len(ours),
           "bytes_per_user": sum((out / r["folder"] / "adapter_model.safetensors").stat().st_size
                                 for r in index) / len(index), "export_s": round(seconds, 1)}
    if task.kind == "classification":
        row["accuracy"] = sum(p == q["gold"] for p, q in zip(parsed, queries)) / len(queries)
    return row


def run_fidelity(cfg: Config, run: Path, caps: list[int], work: Path) -> dict:
    resolved = run_config(cfg, run)
    model, tok = load_base(resolved.model, "cpu")
    task = get_task(resolved.data.task)
    max_new = resolved.eval.max_new_tokens or task.max_new_tokens
    targets = sorted(set(resolved.adapt.target_modules) | set(resolved.bank.target_modules))
    merged, stacked = _ours(resolved, run)
    recipe = PromptRecipe.from_config(resolved, "")
    queries = [q for q in _queries(run, recipe, tok) if q["user_id"] in stacked]
    ours = _answers(model, tok, queries, max_new, merged, stacked, targets)
    parsed = [task.parse_output(a) for a in ours]
    result: dict[str, Any] = {"run": str(run), "task": task.name, "base": resolved.model.base, "queries": len(queries),
                              "ours": {"accuracy": sum(p == q["gold"] for p, q in zip(parsed, queries)) / len(queries)}
                              if task.kind == "classification" else {}, "caps": []}
    for cap in caps:
        out = work / f"cap{cap}"
        t0 = time.time()
        run_export(with_values(cfg, {"export.max_rank": cap, "export.dtype": "bfloat16"}), run, out)
        seconds = time.time() - t0
        exported = {r["user_id"]: load_peft(out / r["folder"]) for r in pq.read_table(out / INDEX_FILE).to_pylist()}
        answers = _answers(model, tok, queries, max_new, {}, exported, targets)
        result["caps"].append(_cap_row(cap, out, answers, ours, queries, task, seconds))
        print(json.dumps(result["caps"][-1]), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--caps", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        result = run_fidelity(cfg, args.run, args.caps, args.work or Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"export-fidelity-{Path(args.config).stem}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"export fidelity -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
