"""``mta-ray run``: every stage in order, each skipping work its output already holds.

Run: ``mta-ray run configs/demo.yaml --out runs/demo`` (what ``make demo`` does).
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import Config


def run_all(cfg: Config, out: Path, force_prepare: bool = False) -> dict:
    from .bank import run_bank
    from .clustering import run_cluster
    from .embed import run_embed
    from .evaluate import render_markdown, required_kinds, run_evaluate
    from .personalize import run_personalize
    from .prepare import run_prepare

    timing: dict[str, float] = {}

    def stage(name, fn, *args, **kwargs):
        t0 = time.time()
        print(f"== {name}", flush=True)
        result = fn(*args, **kwargs)
        timing[f"{name}_s"] = round(time.time() - t0, 1)
        print(f"   {name}: {result} ({timing[f'{name}_s']}s)", flush=True)
        return result

    t_start = time.time()
    stage("prepare", run_prepare, cfg, out, force=force_prepare)
    stage("embed", run_embed, cfg, out)
    stage("cluster", run_cluster, cfg, out)
    stage("bank", run_bank, cfg, out)
    for kind in ["mta"] + [k for k in required_kinds(cfg) if k != "mta"]:
        stage(f"personalize_{kind}", run_personalize, cfg, out, kind)
    timing["before_evaluate_s"] = round(time.time() - t_start, 1)
    report = stage("evaluate", lambda: run_evaluate(cfg, out, timing))
    print("\n" + render_markdown(report), flush=True)
    return report
