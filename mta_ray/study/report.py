"""The study's report: metrics with 95% bootstrap intervals, paired tests, tables and PNG plots.

Reads what :mod:`mta_ray.study.driver` cached (``plan.json`` and ``preds/``) and needs no Ray or GPU,
so the report can be rebuilt anywhere: ``mta-ray study CONFIG --out WORK --report DIR --report-only``.

Intervals and paired tests: :mod:`mta_ray.core.statistics`, the code evaluate uses (each query scored
once, per-user sums resampled over users, the same resamples for every run of a protocol).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mta_ray.config import Config, to_dict
from mta_ray.core.methods import BASELINES, MERGING, PROPOSED, RAG
from mta_ray.core.metrics import HIGHER_IS_BETTER, primary_metric, query_scores, score
from mta_ray.core.statistics import UserBootstrap, blocks_in_memory, method_stats, user_index
from mta_ray.core.tasks import get_task
from mta_ray.files.atomic import atomic_write_text

NOTES_FILE = "notes.md"


def canonical(values: dict[str, Any]) -> dict[str, Any]:
    """One spelling per configuration: with a single anchor there is nothing to weigh, so no fixed alpha."""
    if values.get("merge.top_k") == 1 and values.get("merge.fixed_alpha") is not None:
        return {**values, "merge.fixed_alpha": None}
    return values


def run_metrics(task, rows: list[dict]) -> dict[str, float]:
    """The task's LaMP metrics over a run's rows."""
    return score(task, [r["pred"] for r in rows], [r["gold"] for r in rows])


def ranking(task, metrics: dict[str, float]) -> tuple[float, ...]:
    """Larger is better: the primary metric first, then the others (each signed so larger is better)."""
    primary = primary_metric(task)
    return tuple(metrics[k] if HIGHER_IS_BETTER[k] else -metrics[k]
                 for k in [primary] + [k for k in metrics if k != primary])


class Results:
    """Cached runs of one protocol: each query scored once, every run resampled over the same users
    (:mod:`mta_ray.core.statistics`, the code evaluate uses)."""

    def __init__(self, task, runs: list[dict], samples: int, seed: int):
        self.task, self.runs = task, runs
        users = [r["user_id"] for r in runs[0]["rows"]]
        for run in runs:
            if [r["user_id"] for r in run["rows"]] != users:
                raise ValueError(f"run {run['name']} has other queries than {runs[0]['name']}")
        of, self.n_users = user_index(users)
        self.n_queries = len(users)
        scores = {run["name"]: query_scores(task, [r["pred"] for r in run["rows"]], [r["gold"] for r in run["rows"]])
                  for run in runs}
        boot = UserBootstrap(self.n_users, samples, seed)
        self.stats = method_stats(task, boot, blocks_in_memory(task, boot, of, scores))

    def summary(self, run: dict) -> dict[str, Any]:
        return {"name": run["name"], "method": run["method"], "values": run["values"],
                "metrics": self.stats.point[run["name"]], "ci95": self.stats.ci95(run["name"]),
                "n_queries": self.n_queries, "n_users": self.n_users, "train_s": run["train_s"],
                "eval_s": run["eval_s"], "adapter_bytes_per_user": run.get("adapter_bytes_per_user", 0)}

    def paired(self, a: dict, b: dict) -> dict[str, Any]:
        """a minus b on the primary metric (sign: positive = a better), same users, same resamples."""
        test = self.stats.paired(a["name"], b["name"])
        wins = sum(ra["pred"] == ra["gold"] != rb["pred"] for ra, rb in zip(a["rows"], b["rows"]))
        losses = sum(rb["pred"] == rb["gold"] != ra["pred"] for ra, rb in zip(a["rows"], b["rows"]))
        return {"a": a["name"], "b": b["name"], **test, "queries_only_a_right": int(wins),
                "queries_only_b_right": int(losses)}


def runs_like(runs: list[dict], method: str, target: dict[str, Any], free: tuple[str, ...] = ()) -> list[dict]:
    """Runs of ``method`` at the default dtype whose settings equal ``target`` on every key but ``free``."""
    found = []
    for r in runs:
        v = r["values"]
        if r["method"] != method or "model.dtype" in v:
            continue
        want = canonical({**target, **{k: v[k] for k in free if k in v}})
        if all(v[k] == want.get(k) for k in v):
            found.append(r)
    return found


def _one(runs: list[dict], method: str, target: dict[str, Any]) -> dict | None:
    found = runs_like(runs, method, target)
    return found[0] if found else None


def write_report(cfg: Config, out: Path, report_dir: Path) -> dict:
    task = get_task(cfg.data.task)
    plan = json.loads((out / "plan.json").read_text())
    chosen = plan["chosen"]
    metric = primary_metric(task)
    report: dict[str, Any] = {
        "task": task.name, "model": cfg.model.base, "chosen_on_validation": chosen,
        "adapt_only_lr": plan["adapt_only_lr"], "selection": plan["selection"],
        "design": _design(cfg), "protocols": {}, "config": to_dict(cfg), "study_seconds": plan["seconds"]}
    for protocol, keys in plan["tests"].items():
        runs = [json.loads((out / "preds" / protocol / f"{k}.json").read_text()) for k in keys]
        res = Results(task, runs, cfg.eval.bootstrap, cfg.seed)
        summaries = {r["name"]: res.summary(r) for r in runs}
        mta = _one(runs, PROPOSED, chosen)
        main = {m: next(r for r in runs if r["method"] == m) for m in BASELINES if m != "merged_only"}
        main["merged_only"] = _one(runs, "merged_only", chosen)
        rags = {m: main[m] for m in RAG}
        best_rag = max(rags, key=lambda m: summaries[rags[m]["name"]]["metrics"][metric]
                       * (1 if HIGHER_IS_BETTER[metric] else -1))
        comparisons = {m: res.paired(mta, r) for m, r in main.items()}
        comparisons["best_rag"] = {**comparisons[best_rag], "which": best_rag}
        studies = _studies(runs, chosen, summaries, res)
        report["protocols"][protocol] = {
            "n_users": res.n_users, "n_queries": res.n_queries,
            "methods": {"mta": summaries[mta["name"]], **{m: summaries[r["name"]] for m, r in main.items()}},
            "comparisons": comparisons, "studies": studies, "runs": list(summaries.values())}
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    plots = _plots(report, report_dir, metric)
    from mta_ray.study.profiles import write_profiles  # profiles and bank size (issue 15); "" when not run

    extra = write_profiles(cfg, out, report_dir, plan)
    atomic_write_text(report_dir / "report.md", render(report, plots, report_dir) + extra)
    return report


def _studies(runs: list[dict], chosen: dict, summaries: dict, res: Results) -> dict[str, Any]:
    """One-factor studies around the chosen configuration, with paired tests where they answer a question."""
    out: dict[str, Any] = {}

    def series(method: str, key: str, target: dict, free: tuple[str, ...] = ()) -> list[dict]:
        rows = [{"value": r["values"].get(key), **{k: summaries[r["name"]][k] for k in ("metrics", "ci95", "name")}}
                for r in runs_like(runs, method, target, (key,) + free)]
        return sorted(rows, key=lambda x: (x["value"] is not None, x["value"] if x["value"] is not None else 0))

    k_alpha = max(chosen["merge.top_k"], 2)
    for m in MERGING:
        out[f"top_k/{m}"] = series(m, "merge.top_k", chosen)
        out[f"alpha/{m}"] = series(m, "merge.fixed_alpha", {**chosen, "merge.top_k": k_alpha})
        out[f"space/{m}"] = series(m, "merge.space", chosen)
        out[f"anchor_data/{m}"] = series(m, "bank.anchor_data", chosen)
    out["rank/mta"] = series("mta", "adapt.rank", chosen, ("adapt.alpha",))
    tests: dict[str, Any] = {}
    for m in MERGING:
        for key, a, b, label in (("merge.space", "delta", "params", "delta vs params space"),
                                 ("bank.anchor_data", "cluster", "own", "cluster-pooled vs own-history anchors")):
            ra, rb = _one(runs, m, {**chosen, key: a}), _one(runs, m, {**chosen, key: b})
            if ra and rb:
                tests[f"{m}: {label}"] = res.paired(ra, rb)
        low = [r for r in runs if r["method"] == m and r["values"].get("model.dtype")]
        if low:
            tests[f"{m}: {low[0]['values']['model.dtype']} vs default dtype"] = res.paired(low[0], _one(runs, m, chosen))
    out["tests"] = tests
    return out


def _design(cfg: Config) -> dict[str, Any]:
    st = cfg.study
    return {
        "cross_banking": f"{st.folds}-fold: each fold's users are tested with a bank built only from the other "
                         "folds' users (full histories); bank and test users never overlap",
        "paper_protocol": "train on each user's whole history; test on its one LaMP query",
        "extended_protocol": f"hold out {st.extended_items} history items per user (never trained on, not in the "
                             "prompt's retrieval pool); test on them and the LaMP query",
        "validation": f"hold out {st.validation_items} other history items per user; every hyperparameter is "
                      "chosen on these queries only, greedily in the order of `selection`",
        "bootstrap": f"{cfg.eval.bootstrap} resamples over users",
        "clusters_per_bank": cfg.bank.num_clusters,
    }


# --------------------------------------------------------------------------- plots

def _plots(report: dict, report_dir: Path, metric: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    protos = list(report["protocols"])
    fig, ax = plt.subplots(figsize=(9, 4))
    methods = list(report["protocols"][protos[0]]["methods"])
    width = 0.8 / len(protos)
    for j, p in enumerate(protos):
        ms = report["protocols"][p]["methods"]
        y = [ms[m]["metrics"][metric] for m in methods]
        lo = [ms[m]["metrics"][metric] - ms[m]["ci95"][metric][0] for m in methods]
        hi = [ms[m]["ci95"][metric][1] - ms[m]["metrics"][metric] for m in methods]
        ax.bar(np.arange(len(methods)) + j * width, y, width, yerr=[lo, hi], capsize=3,
               label=f"{p} ({report['protocols'][p]['n_queries']} queries)")
    ax.set_xticks(np.arange(len(methods)) + width * (len(protos) - 1) / 2, methods, rotation=20)
    ax.set_ylabel(metric)
    ax.set_title(f"{report['task']}: methods (95% bootstrap CI over users)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "methods.png", dpi=120)
    plt.close(fig)
    names.append("methods.png")
    for study, xlabel in (("top_k", "top-K anchors merged"), ("alpha", "fixed weight of the best anchor (None = adaptive)"),
                          ("rank", "stacked adapter rank")):
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for p in protos:
            st = report["protocols"][p]["studies"]
            for m in MERGING:
                rows = st.get(f"{study}/{m}", [])
                if not rows:
                    continue
                labels = ["adaptive" if r["value"] is None else str(r["value"]) for r in rows]
                y = np.array([r["metrics"][metric] for r in rows])
                err = [y - np.array([r["ci95"][metric][0] for r in rows]), np.array([r["ci95"][metric][1] for r in rows]) - y]
                ax.errorbar(np.arange(len(rows)), y, yerr=err, marker="o", capsize=3, label=f"{m} ({p})")
                ax.set_xticks(np.arange(len(rows)), labels)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.set_title(f"{report['task']}: {study} (95% CI)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(report_dir / f"{study}.png", dpi=120)
        plt.close(fig)
        names.append(f"{study}.png")
    return names


# --------------------------------------------------------------------------- markdown

def _cell(s: dict, k: str) -> str:
    return f"{s['metrics'][k]:.4f} [{s['ci95'][k][0]:.3f}, {s['ci95'][k][1]:.3f}]"


def render(report: dict, plots: list[str], report_dir: Path) -> str:
    lines = [f"# Study: {report['task']} with {Path(str(report['model'])).name}", ""]
    notes = report_dir / NOTES_FILE
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += ["## Design", ""] + [f"- **{k}**: {v}" for k, v in report["design"].items()] + [""]
    lines += ["## Chosen on validation", "", "```", json.dumps(report["chosen_on_validation"], indent=1),
              "```", f"adapt-only lr: {report['adapt_only_lr']}", "",
              "| step | method | candidate | validation score (acc, F1) |", "| ---: | --- | --- | --- |"]
    for i, row in enumerate(report["selection"]):
        lines.append(f"| {i + 1} | {row['method']} | {json.dumps(row['changes'])} | "
                     + ", ".join(f"{x:.4f}" for x in row["score"]) + " |")
    lines.append("")
    for p, pr in report["protocols"].items():
        ms = pr["methods"]
        keys = list(next(iter(ms.values()))["metrics"])
        lines += [f"## Protocol `{p}`: {pr['n_users']} users, {pr['n_queries']} queries", "",
                  "| method | " + " | ".join(keys) + " |", "| --- | " + " | ".join("---:" for _ in keys) + " |"]
        for m, s in ms.items():
            lines.append(f"| {m} | " + " | ".join(_cell(s, k) for k in keys) + " |")
        lines += ["", "MTA against each (paired bootstrap over users; advantage in the primary metric):", "",
                  "| vs | advantage | 95% CI | p(not better) | queries only MTA right / only other right |",
                  "| --- | ---: | --- | ---: | --- |"]
        for m, c in pr["comparisons"].items():
            label = f"best RAG ({c['which']})" if m == "best_rag" else m
            lines.append(f"| {label} | {c['advantage']:+.4f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                         f"{c['p_not_better']:.3f} | {c['queries_only_a_right']} / {c['queries_only_b_right']} |")
        st = pr["studies"]
        if st["tests"]:
            lines += ["", "Other paired tests (a minus b):", "", "| test | advantage of a | 95% CI | p(a not better) |",
                      "| --- | ---: | --- | ---: |"]
            for name, c in st["tests"].items():
                lines.append(f"| {name} | {c['advantage']:+.4f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] | "
                             f"{c['p_not_better']:.3f} |")
        for key, rows in st.items():
            if key == "tests" or len(rows) < 2:  # a study needs at least two values to say anything
                continue
            lines += ["", f"Study `{key}`:", "", "| value | " + " | ".join(keys) + " |",
                      "| --- | " + " | ".join("---:" for _ in keys) + " |"]
            for r in rows:
                v = "adaptive" if r["value"] is None else r["value"]
                lines.append(f"| {v} | " + " | ".join(_cell(r, k) for k in keys) + " |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += [f"Study wall time: {report['study_seconds']} s (preds cached; a resumed run counts only its own part).", ""]
    return "\n".join(lines)
