"""The stage runner, and ``mta-ray run``: every stage in order, each skipping work its output already holds.

Every stage runs through :func:`run_step`, which also writes the resolved config beside the
stage's output (``<step>.config.yaml``) whenever the stage did work: the one place that does.

Run: ``mta-ray run configs/demo.yaml --out runs/demo`` (what ``make demo`` does).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta_ray.config import Config
from mta_ray.core.methods import PROPOSED, TRAINED, method
from mta_ray.errors import InputError
from mta_ray.files import provenance
from mta_ray.files.atomic import atomic_write_text
from mta_ray.files.chart import CHART_NAME
from mta_ray.files.layout import RunLayout, save_resolved, verify_bank

STAGES = ("prepare", "embed", "cluster", "bank", "personalize", "evaluate")
MODEL_STAGES = ("bank", "personalize", "evaluate")
"""Stages that run model workers (and take a ``workers`` pool to reuse)."""


@dataclass(frozen=True)
class Step:
    """One stage to run; ``kind`` is the method personalize trains (``mta``, ``adapt_only``, ``oppu``)."""

    stage: str
    kind: str = ""

    @property
    def label(self) -> str:
        """The step's name in logs, timings and its resolved config's file name."""
        return f"{self.stage}-{self.kind}" if self.kind else self.stage

    @property
    def uses_models(self) -> bool:
        return self.stage in MODEL_STAGES


def pipeline_steps(cfg: Config) -> list[Step]:
    """Every step of ``mta-ray run``: MTA is personalised first, then the evaluated baselines that train."""
    from mta_ray.stages.evaluate import required_kinds

    kinds = [k for k in TRAINED if k == "mta" or k in required_kinds(cfg)]
    return ([Step("prepare"), Step("embed"), Step("cluster"), Step("bank")]
            + [Step("personalize", k) for k in kinds] + [Step("evaluate")])


def run_step(step: Step, cfg: Config, out: Path, workers: list | None = None, timing: dict | None = None,
             force: bool = False, allow_missing: bool = False, config_path: str = "CONFIG") -> dict[str, Any]:
    """Run one stage into ``out`` and, when it did work, save the resolved config beside its output.

    Before the stage: the outputs it reads must match the config (:mod:`mta_ray.files.provenance`), its
    own output is redone when stale (prepare, embed, cluster) or refused unless ``force`` (bank,
    personalize: ``force`` retrains), and model stages check the base model in the driver
    (:mod:`mta_ray.engine.preflight`); evaluate refuses users without adapters unless ``allow_missing``.
    ``workers``: a model-worker pool to reuse (model stages); ``timing``: the earlier steps' seconds
    (evaluate reports them); ``force``: also makes prepare rebuild an up-to-date users table.
    """
    run = RunLayout(out)
    plan = _check_provenance(step, cfg, run, force)
    missing = check_complete(cfg, run, allow_missing, config_path, out) if step.stage == "evaluate" else {}
    if step.uses_models:
        _preflight(step, cfg, run)
    record = _prepare_output(step, cfg, run, plan)
    summary = _call(step, cfg, out, workers, timing, force or bool(plan and plan[0]))
    if record is not None:
        provenance.write_record(run, record)
    if step.stage == "evaluate":
        _annotate_report(cfg, run, summary, missing)
    if not summary.get("skipped"):
        save_resolved(cfg, out, step.label)
    return summary


def _check_provenance(step: Step, cfg: Config, run: RunLayout, force: bool) -> tuple[bool, Path | None] | None:
    """Refuse stale inputs, and a stale trained output unless ``force``; nothing is changed yet. Returns
    None when the step keeps no record, else (rebuild: a stale quick output, what to remove first)."""
    if step.stage == "evaluate":
        provenance.check_inputs(cfg, run, evaluate_inputs(cfg))
        return None
    if step.label not in provenance.UPSTREAM:
        return None
    provenance.check_inputs(cfg, run, provenance.UPSTREAM[step.label])
    why = provenance.stale(cfg, run, step.label)
    if not why:
        return False, None
    target = provenance.output_path(run, step.label)
    folder = run.bank if step.stage == "bank" else target
    if step.label in provenance.REDONE:
        print(f"{step.label}: {target} was {why}: rebuilding it", flush=True)
        return True, target if target.is_dir() else None
    if not force:
        raise InputError(str(folder), f"{why}: pass --force to train it again, or use another --out")
    print(f"{step.label}: {folder} was {why}: removing it and training again (--force)", flush=True)
    return False, folder


def _prepare_output(step: Step, cfg: Config, run: RunLayout,
                    plan: tuple[bool, Path | None] | None) -> provenance.Record | None:
    """After every check passed: remove a stale output, and write the record of a resumable step (bank,
    personalize) before its work starts; the record of a quick step is written after it (returned)."""
    if plan is None:
        return None
    if plan[1] is not None:
        shutil.rmtree(plan[1])
    record = provenance.expected_record(cfg, run, step.label)
    if step.label in provenance.REDONE:
        return record
    provenance.write_record(run, record)
    return None


def evaluate_inputs(cfg: Config) -> list[str]:
    """The steps whose outputs evaluate reads."""
    from mta_ray.stages.evaluate import required_kinds

    merged = any(method(m).merges for m in cfg.eval.methods)
    return ["prepare", "embed"] + (["bank"] if merged else []) + [f"personalize-{k}" for k in required_kinds(cfg)]


def _preflight(step: Step, cfg: Config, run: RunLayout) -> None:
    """The base model and target modules, checked here before a worker starts; the bank's checksums."""
    from mta_ray.engine.preflight import check_model

    if step.stage == "bank":
        recipes = ["bank"]
    elif step.stage == "personalize":
        recipes = [method(step.kind or PROPOSED).recipe] + (["bank"] if method(step.kind or PROPOSED).merges else [])
    else:
        recipes = sorted({method(m).recipe for m in cfg.eval.methods if method(m).trained} | {"bank"})
    check_model(cfg, recipes)
    if step.stage != "bank" and run.bank.is_dir():
        verify_bank(run.bank)


def check_complete(cfg: Config, run: RunLayout, allow_missing: bool, config_path: str,
                   out: Path) -> dict[str, int]:
    """Users without an adapter of a method evaluate scores: refused (one line: how many, and the command
    that trains them), or with ``allow_missing`` counted and reported as missing (their answers are
    empty, so they score as wrong): never the bare base in the trained method's place."""
    from mta_ray.files.store import MAX_ATTEMPTS, AdapterStore
    from mta_ray.files.tables import iter_user_rows
    from mta_ray.stages.evaluate import required_kinds

    kinds = required_kinds(cfg)
    if not kinds or not run.users.is_file():
        return {}
    users = {r["user_id"] for r in iter_user_rows(run.users, ["user_id"])}
    missing = {}
    for kind in kinds:
        rows = AdapterStore(run.store(kind)).index().select(["user_id", "status"]).to_pylist()
        ok = {r["user_id"] for r in rows if r["status"] == "ok"}
        failures: dict[str, int] = {}
        for r in rows:
            if r["status"] != "ok" and r["user_id"] not in ok:
                failures[r["user_id"]] = failures.get(r["user_id"], 0) + 1
        lacking = users - ok
        if not lacking:
            continue
        missing[kind] = len(lacking)
        if allow_missing:
            continue
        exhausted = sum(1 for u in lacking if failures.get(u, 0) >= MAX_ATTEMPTS)
        how = (f"`mta-ray personalize {config_path} --out {out} --kind {kind}` trains the "
               f"{len(lacking) - exhausted} not yet trained or failed fewer than {MAX_ATTEMPTS} times"
               if exhausted < len(lacking) else f"all of them failed {MAX_ATTEMPTS} times (the store's error column says why)")
        raise InputError(str(run.store(kind)), f"{len(lacking)} of {len(users)} users have no {kind} adapter "
                                               f"({len([u for u in lacking if u in failures])} failed): {how}; "
                                               "or evaluate with --allow-missing to report them as missing")
    return missing


def _annotate_report(cfg: Config, run: RunLayout, report: dict, missing: dict[str, int]) -> None:
    """Add to the report the provenance hashes of the outputs it was computed from and, when some users
    were evaluated without an adapter (``--allow-missing``), how many (json; markdown too when missing)."""
    from mta_ray.stages.evaluate import render_markdown

    records = {s: provenance.read_record(run, s) for s in evaluate_inputs(cfg)}
    report["provenance"] = {s: r.hash for s, r in records.items() if r is not None}
    if missing:
        report["missing_users"] = missing
    atomic_write_text(run.report_json, json.dumps(report, indent=1) + "\n")
    if missing:
        note = "; ".join(f"{k}: {n} users had no adapter (answers left empty, scored as wrong)"
                         for k, n in missing.items())
        atomic_write_text(run.report_md, render_markdown(report) + f"\n## Missing adapters\n\n{note}\n")
        print(f"evaluate: missing adapters reported: {note}", flush=True)


def _call(step: Step, cfg: Config, out: Path, workers: list | None, timing: dict | None, force: bool) -> dict:
    if step.stage == "prepare":
        from mta_ray.stages.prepare import run_prepare
        return run_prepare(cfg, out, force=force)
    if step.stage == "embed":
        from mta_ray.stages.embed import run_embed
        return run_embed(cfg, out)
    if step.stage == "cluster":
        from mta_ray.stages.cluster import run_cluster
        return run_cluster(cfg, out)
    if step.stage == "bank":
        from mta_ray.stages.bank import run_bank
        return run_bank(cfg, out, workers=workers)
    if step.stage == "personalize":
        from mta_ray.stages.personalize import run_personalize
        return run_personalize(cfg, out, step.kind or "mta", workers=workers)
    if step.stage == "evaluate":
        from mta_ray.stages.evaluate import run_evaluate
        return run_evaluate(cfg, out, workers=workers, timing=timing)
    raise ValueError(f"unknown stage {step.stage!r}; known: {', '.join(STAGES)}")


def run_all(cfg: Config, out: Path, force_prepare: bool = False, allow_missing: bool = False,
            config_path: str = "CONFIG") -> dict:
    """Every step of :func:`pipeline_steps` in order; returns evaluate's report.

    The model stages share one resident worker pool (one base-model load for bank, every personalize
    and evaluate), started when the first of them runs, after the driver has checked the base model:
    embed's Ray Data actors need the CPUs before, and a DeepSpeed bank (``bank.engine=deepspeed``) its
    Ray Train workers.
    """
    from mta_ray.engine.workers import stop_workers
    from mta_ray.stages.evaluate import render_markdown

    timing: dict[str, float] = {}
    t_start = time.time()
    report: Any = None
    pool: list | None = None
    try:
        for step in pipeline_steps(cfg):
            if step.stage == "evaluate":
                timing["before_evaluate_s"] = round(time.time() - t_start, 1)
            t0 = time.time()
            print(f"== {step.label}", flush=True)
            if step.uses_models and pool is None and not _deepspeed_bank(step, cfg):
                _preflight(step, cfg, RunLayout(out))
                pool = _start_pool(cfg, out, timing)
            report = run_step(step, cfg, out, workers=pool, timing=timing, force=force_prepare,
                              allow_missing=allow_missing, config_path=config_path)
            if step.stage != "evaluate":
                timing[f"{step.label}_s"] = round(time.time() - t0, 1)
            print(f"   {step.label}: {report if step.stage != 'evaluate' else 'done'} ({time.time() - t0:.1f}s)",
                  flush=True)
    finally:
        stop_workers(pool)
    print("\n" + render_markdown(report), flush=True)
    run = RunLayout(out)
    print(f"Files: {run.report_md} (this table), {run.report_json} (with every interval and comparison), "
          f"{run.root / CHART_NAME} (the chart); adapters in {run.root / 'adapters'}/, bank in {run.bank}/; "
          f"total {time.time() - t_start:.0f}s", flush=True)
    return report


def _deepspeed_bank(step: Step, cfg: Config) -> bool:
    return step.stage == "bank" and cfg.bank.engine == "deepspeed"


def _start_pool(cfg: Config, out: Path, timing: dict[str, float]) -> list:
    """Start Ray (or join it) and the model workers, and wait until each has loaded the base model."""
    import ray

    from mta_ray.engine.raysetup import init_ray
    from mta_ray.engine.workers import start_workers

    t0 = time.time()
    init_ray(cfg)
    pool = start_workers(cfg, RunLayout(out).bank)
    ray.get([w.node.remote() for w in pool])
    timing["workers_start_s"] = round(time.time() - t0, 1)
    print(f"   {len(pool)} model worker(s) ready, kept for every model stage ({timing['workers_start_s']}s)",
          flush=True)
    return pool
