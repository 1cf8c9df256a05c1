"""The study report's part on MTA profiles and on bank size (``study.profiles``, ``study.bank_folds``).

Reads the runs :mod:`mta_ray.study.driver` cached and writes, beside ``report.json``:

- ``profiles.json``: per protocol, each profile's metrics with 95% intervals, its measured adapter bytes
  per user (merged-only: K anchor ids and weights), training seconds, and paired tests against the paper
  recipe, OPPU and adapt-only; the bank-size curve (merged-only, MTA, adapt-only per fold count, with the
  paired MTA-minus-adapt-only gap). ``mta-ray bench scalability bench.study_report=...`` labels its
  Pareto plot with these accuracies.
- ``bank_size.png``: quality against bank users per fold.
- a markdown section that :mod:`mta_ray.study.report` appends to ``report.md``.

Intervals and paired tests use the report's :class:`~mta_ray.study.report.Results` (bootstrap over users,
the same resamples for every run of a protocol).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mta_ray.config import Config
from mta_ray.core.methods import ABLATIONS, AROUND_MTA, PER_USER_BASELINES, PROPOSED, method
from mta_ray.core.metrics import primary_metric
from mta_ray.core.profiles import ANCHOR_RECORD_BYTES, PAPER, PROFILES, bf16_twin
from mta_ray.core.tasks import get_task
from mta_ray.files.atomic import atomic_write_text
from mta_ray.study.report import Results

PROFILES_FILE = "profiles.json"
REFERENCES = PER_USER_BASELINES
"""Baselines each profile is compared with, besides the paper recipe."""


def write_profiles(cfg: Config, out: Path, report_dir: Path, plan: dict) -> str:
    """``profiles.json`` and ``bank_size.png`` from the cached runs; the markdown section ("" if none)."""
    if not plan.get("profiles") and not plan.get("bank_size"):
        return ""
    task = get_task(cfg.data.task)
    result: dict[str, Any] = {"task": task.name, "metric": primary_metric(task), "select": plan.get("select"),
                              "fixed_from": plan.get("fixed_from", ""), "chosen": plan["chosen"],
                              "protocols": {}, "bank_size": []}
    for protocol, keys in (plan.get("profiles") or {}).items():
        runs = [_load(out, protocol, k) for k in plan["tests"][protocol]]
        result["protocols"][protocol] = profile_table(cfg, Results(task, runs, cfg.eval.bootstrap, cfg.seed),
                                                      {k: _load(out, protocol, v) for k, v in keys.items()})
    for n, entry in sorted((plan.get("bank_size") or {}).items(), key=lambda kv: int(kv[0])):
        runs = {m: _load(out / entry["out"], "paper", k) for m, k in entry["runs"].items()}
        result["bank_size"].append(bank_size_row(cfg, out / entry["out"], int(n), runs))
    if not plan.get("bank_size"):
        result["bank_size"] = earlier_bank_size(report_dir / PROFILES_FILE, result)
        result["kept_vs_this_run"] = kept_vs_this_run(result, cfg.study.folds)
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / PROFILES_FILE, json.dumps(result, indent=1, default=str) + "\n")
    plots = [plot_bank_size(result, report_dir / "bank_size.png")] if result["bank_size"] else []
    return render(result, plots)


SAME_STUDY_KEYS = ("task", "metric", "select", "fixed_from", "chosen")
"""What an earlier ``profiles.json`` must share with this run for its bank-size rows to be kept."""


def earlier_bank_size(path: Path, result: dict) -> list[dict]:
    """The bank-size rows of the ``profiles.json`` at ``path`` when this run measured none and that file
    comes from the same study settings: rerunning for more profiles alone (``study.bank_folds=[]``, minutes
    on a GPU) keeps the curve (tens of minutes) instead of dropping it. Kept rows say so."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    ours = json.loads(json.dumps({k: result[k] for k in SAME_STUDY_KEYS}, default=str))
    if any(earlier.get(k) != v for k, v in ours.items()):
        return []
    return [{**row, "from_earlier_run": True} for row in earlier.get("bank_size", [])]


def kept_vs_this_run(result: dict, folds: int) -> dict[str, Any]:
    """The kept row of this run's own fold count next to this run's paper-protocol scores of the same
    methods (same settings, same bank size): how far two runs of one setting differ, which the kept curve
    must be read with. Empty when no such row was kept."""
    row = next((r for r in result["bank_size"] if r.get("from_earlier_run") and r["folds"] == folds), None)
    if row is None:
        return {}
    systems = result["protocols"].get("paper", {}).get("systems", {})
    metric = result["metric"]
    now = {PROPOSED: systems[PAPER]["metrics"][metric]} if PAPER in systems else {}
    for r in systems.values():
        if r["method"] in ABLATIONS:
            now.setdefault(r["method"], r["metrics"][metric])
    pairs = {m: {"this_run": now[m], "kept": row["methods"][m]["metrics"][metric]}
             for m in AROUND_MTA if m in now and m in row["methods"]}
    return {"folds": folds, "methods": pairs} if pairs else {}


def _load(folder: Path, protocol: str, key: str) -> dict:
    return json.loads((folder / "preds" / protocol / f"{key}.json").read_text())


def profile_table(cfg: Config, res: Results, runs: dict[str, dict]) -> dict[str, Any]:
    """Each profile (and the references) with its metrics, storage and paired tests."""
    metric = primary_metric(res.task)
    paper = runs[PAPER]
    rows: dict[str, Any] = {}
    for name, run in runs.items():
        s = res.summary(run)
        size = run.get("adapter_size") or {}
        record = cfg.merge.top_k * ANCHOR_RECORD_BYTES if method(run["method"]).merges else 0
        row = {"method": run["method"], "run": run["name"], "metrics": s["metrics"], "ci95": s["ci95"],
               "bytes_per_user": size.get("bytes", run.get("adapter_bytes_per_user", 0)) + record,
               "precision": size.get("precision"), "store_file_bytes_per_user": run.get("adapter_bytes_per_user", 0),
               "train_s": run["train_s"], "eval_s": run["eval_s"],
               "summary": PROFILES[name].summary if name in PROFILES else name}
        twin = bf16_twin(name) if name in PROFILES else None
        if twin not in (None, name) and twin in runs:   # output fidelity of a storage precision
            row["fidelity"] = fidelity(run, runs[twin])
        for ref, other in (("vs_mta", paper), *((f"vs_{r}", runs[r]) for r in REFERENCES)):
            if other["name"] != run["name"]:
                row[ref] = _test(res.paired(run, other))
        if name != PAPER and name in PROFILES:
            # the target: not below the paper recipe (the paired 95% interval reaches 0 or above)
            row["not_below_paper"] = row["vs_mta"]["ci95"][1] >= 0
        rows[name] = row
    return {"metric": metric, "n_users": res.n_users, "n_queries": res.n_queries, "systems": rows}


def fidelity(run: dict, twin: dict) -> dict[str, Any]:
    """How often ``run`` (e.g. int8 storage) answers exactly as ``twin`` (the same training in bf16)."""
    pairs = list(zip(run["rows"], twin["rows"]))
    return {"vs": twin["name"], "same_outputs": sum(a["output"] == b["output"] for a, b in pairs) / len(pairs),
            "same_predictions": sum(a["pred"] == b["pred"] for a, b in pairs) / len(pairs)}


def _test(t: dict) -> dict:
    return {k: t[k] for k in ("advantage", "ci95", "p_not_better", "queries_only_a_right", "queries_only_b_right")}


def bank_size_row(cfg: Config, folder: Path, folds: int, runs: dict[str, dict]) -> dict[str, Any]:
    """One fold count: bank users per fold, each method's quality, MTA's paired gaps."""
    res = Results(get_task(cfg.data.task), list(runs.values()), cfg.eval.bootstrap, cfg.seed)
    fold_of = json.loads((folder / "folds.json").read_text())
    sizes = [sum(f != i for f in fold_of.values()) for i in range(folds)]
    row = {"folds": folds, "bank_users": float(np.mean(sizes)), "bank_users_per_fold": sizes,
           "n_queries": res.n_queries,
           "methods": {m: {k: res.summary(r)[k] for k in ("metrics", "ci95")} for m, r in runs.items()}}
    for other in reversed(ABLATIONS):
        if "mta" in runs and other in runs:
            row[f"mta_vs_{other}"] = _test(res.paired(runs["mta"], runs[other]))
    return row


def plot_bank_size(result: dict, path: Path) -> str:
    """Quality (95% CI) against bank users per fold, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, rows = result["metric"], result["bank_size"]
    x = np.array([r["bank_users"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(rows[0]["methods"]):
        y = np.array([r["methods"][m]["metrics"][metric] for r in rows])
        lo = y - np.array([r["methods"][m]["ci95"][metric][0] for r in rows])
        hi = np.array([r["methods"][m]["ci95"][metric][1] for r in rows]) - y
        ax.errorbar(x + (i - 1) * 0.4, y, yerr=[lo, hi], marker="o", capsize=3, label=m)
    ax.set_xticks(x, [f"{r['bank_users']:.0f}\n({r['folds']} folds)" for r in rows])
    ax.set_xlabel("bank users per fold")
    ax.set_ylabel(metric)
    ax.set_title(f"{result['task']}: quality vs bank size, paper protocol (95% CI)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def _ci(c: list[float]) -> str:
    return f"[{c[0]:+.3f}, {c[1]:+.3f}]"


def _kept_vs_this_run_line(drift: dict) -> list[str]:
    if not drift:
        return []
    same = ", ".join(f"{m} {v['this_run']:.4f} (kept row {v['kept']:.4f})" for m, v in drift["methods"].items())
    return [f"The same setting in this run ({drift['folds']} folds, the profile table above): {same}. A difference "
            "is the variation between two runs of one setting (GPU training is not bit-reproducible, and the code "
            "may have changed between the runs): read the kept curve with it.", ""]


def render(result: dict, plots: list[str]) -> str:
    """The markdown section appended to ``report.md``."""
    metric = result["metric"]
    lines = ["## MTA profiles", ""]
    if result["select"] == "fixed":
        lines += [f"Settings fixed (no validation search), from {result['fixed_from'] or 'the config'}: "
                  f"`{json.dumps(result['chosen'])}`.", ""]
    for p, pr in result["protocols"].items():
        lines += [f"Protocol `{p}` ({pr['n_users']} users, {pr['n_queries']} queries). Paired differences in "
                  f"{metric} (95% CI); storage per user: the stored adapter's values at its precision (from the "
                  "store's layout) plus K anchor ids and weights (merged-only: only those). `not below paper`: the paired interval against the paper recipe reaches 0.", "",
                  f"| profile | {metric} | stored / user | train s | vs paper MTA | vs OPPU | vs adapt-only | "
                  "not below paper | same outputs as bf16 |", "| --- | ---: | ---: | ---: | --- | --- | --- | --- | ---: |"]
        for name, r in pr["systems"].items():
            m, c = r["metrics"][metric], r["ci95"][metric]
            cells = [f"{r[k]['advantage']:+.4f} {_ci(r[k]['ci95'])}" if k in r else "" for k in
                     ("vs_mta", "vs_oppu", "vs_adapt_only")]
            flag = {True: "yes", False: "**no**"}.get(r.get("not_below_paper"), "")
            lines.append(f"| {name} | {m:.4f} [{c[0]:.3f}, {c[1]:.3f}] | {r['bytes_per_user']:,.0f} B | "
                         f"{r['train_s']:.1f} | " + " | ".join(cells) + f" | {flag} | "
                         + (f"{r['fidelity']['same_outputs']:.3f}" if "fidelity" in r else "") + " |")
        lines.append("")
    if result["bank_size"]:
        kept = any(r.get("from_earlier_run") for r in result["bank_size"])
        lines += ["## Quality against bank size", "",
                  "Paper protocol; a fold's users are tested with a bank built from the other folds' users, so "
                  "more folds mean bigger banks (the clusters per bank stay `bank.num_clusters`)."
                  + (" These rows are kept from an earlier run of this report with the same settings (this run "
                     "measured no bank sizes)." if kept else ""), "",
                  f"| folds | bank users | merged-only | MTA | adapt-only | MTA - adapt-only | MTA - merged-only |",
                  "| ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for r in result["bank_size"]:
            ms = r["methods"]
            cells = [f"{ms[m]['metrics'][metric]:.4f} [{ms[m]['ci95'][metric][0]:.3f}, {ms[m]['ci95'][metric][1]:.3f}]"
                     if m in ms else "" for m in AROUND_MTA]
            gaps = [f"{r[k]['advantage']:+.4f} {_ci(r[k]['ci95'])}" if k in r else ""
                    for k in ("mta_vs_adapt_only", "mta_vs_merged_only")]
            lines.append(f"| {r['folds']} | {r['bank_users']:.0f} | " + " | ".join(cells + gaps) + " |")
        lines.append("")
        lines += _kept_vs_this_run_line(result.get("kept_vs_this_run") or {})
    lines += [f"![{p}]({p})" for p in plots] + ([""] if plots else [])
    return "\n".join(lines)

