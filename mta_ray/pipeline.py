"""``mta-ray run``: every stage in order, each skipping work its output already holds.

Run: ``mta-ray run configs/demo.yaml --out runs/demo`` (what ``make demo`` does).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .config import Config


MODEL_STAGES = ("bank", "personalize", "evaluate")
"""Stages that run model workers (a stage name starting with one of these)."""


def pipeline_stages(cfg: Config, out: Path, timing: dict[str, float], force_prepare: bool = False) -> list[tuple[str, Callable[..., Any]]]:
    """(name, call) of every stage in order; evaluate reports the ``timing`` gathered before it.

    The calls of model stages take an optional ``workers`` pool (default: each starts its own).
    """
    from .bank import run_bank
    from .clustering import run_cluster
    from .embed import run_embed
    from .evaluate import required_kinds, run_evaluate
    from .personalize import run_personalize
    from .prepare import run_prepare

    kinds = ["mta"] + [k for k in required_kinds(cfg) if k != "mta"]
    return [("prepare", lambda: run_prepare(cfg, out, force=force_prepare)),
            ("embed", lambda: run_embed(cfg, out)),
            ("cluster", lambda: run_cluster(cfg, out)),
            ("bank", lambda workers=None: run_bank(cfg, out, workers=workers)),
            *[(f"personalize_{k}", lambda workers=None, k=k: run_personalize(cfg, out, k, workers=workers))
              for k in kinds],
            ("evaluate", lambda workers=None: run_evaluate(cfg, out, timing, workers))]


def run_all(cfg: Config, out: Path, force_prepare: bool = False) -> dict:
    from .evaluate import render_markdown

    timing: dict[str, float] = {}
    t_start = time.time()
    report: Any = None
    for name, call in pipeline_stages(cfg, out, timing, force_prepare):
        if name == "evaluate":
            timing["before_evaluate_s"] = round(time.time() - t_start, 1)
        t0 = time.time()
        print(f"== {name}", flush=True)
        report = call()
        if name != "evaluate":
            timing[f"{name}_s"] = round(time.time() - t0, 1)
        print(f"   {name}: {report if name != 'evaluate' else 'done'} ({time.time() - t0:.1f}s)", flush=True)
    print("\n" + render_markdown(report), flush=True)
    return report
