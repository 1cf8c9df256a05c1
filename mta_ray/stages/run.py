"""The stage runner, and ``mta-ray run``: every stage in order, each skipping work its output already holds.

Every stage runs through :func:`run_step`, which also writes the resolved config beside the
stage's output (``<step>.config.yaml``) whenever the stage did work: the one place that does.

Run: ``mta-ray run configs/demo.yaml --out runs/demo`` (what ``make demo`` does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mta_ray.config import Config
from mta_ray.core.methods import TRAINED
from mta_ray.files.chart import CHART_NAME
from mta_ray.files.layout import RunLayout, save_resolved

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
             force: bool = False) -> dict[str, Any]:
    """Run one stage into ``out`` and, when it did work, save the resolved config beside its output.

    ``workers``: a model-worker pool to reuse (model stages); ``timing``: the earlier steps' seconds
    (evaluate reports them); ``force``: prepare rebuilds an up-to-date users table.
    """
    summary = _call(step, cfg, out, workers, timing, force)
    if not summary.get("skipped"):
        save_resolved(cfg, out, step.label)
    return summary


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


def run_all(cfg: Config, out: Path, force_prepare: bool = False) -> dict:
    """Every step of :func:`pipeline_steps` in order; returns evaluate's report.

    The model stages share one resident worker pool (one base-model load for bank, every personalize
    and evaluate), started when the first of them runs: embed's Ray Data actors need the CPUs before,
    and a DeepSpeed bank (``bank.engine=deepspeed``) its Ray Train workers.
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
                pool = _start_pool(cfg, out, timing)
            report = run_step(step, cfg, out, workers=pool, timing=timing, force=force_prepare)
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
