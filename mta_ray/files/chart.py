"""The report's picture: every method's primary metric with its 95% interval, as a PNG beside report.md.

Called by evaluate with the report it writes; ``mta-ray run`` prints where it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mta_ray.core.methods import PROPOSED
from mta_ray.core.metrics import HIGHER_IS_BETTER, primary_metric
from mta_ray.core.tasks import get_task
from mta_ray.files.atomic import atomic_path

CHART_NAME = "report.png"


def write_chart(report: dict[str, Any], folder: str | Path) -> Path | None:
    """Draw ``report``'s methods (bars: the primary metric, whiskers: its 95% bootstrap interval) into
    ``folder/report.png``; MTA's bar is highlighted. Returns the path, or None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report.get("methods") or {}
    if not methods:
        return None
    metric = primary_metric(get_task(report["task"]))
    names = list(methods)
    values = [methods[m]["metrics"][metric] for m in names]
    lows = [v - methods[m]["ci95"][metric][0] for m, v in zip(names, values)]
    highs = [methods[m]["ci95"][metric][1] - v for m, v in zip(names, values)]
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    colors = ["#d62728" if m == PROPOSED else "#7f7f7f" for m in names]
    ax.bar(names, values, color=colors, yerr=[lows, highs], capsize=4, error_kw={"elinewidth": 1})
    for i, v in enumerate(values):
        ax.annotate(f"{v:.2f}", (i, v), xytext=(0, 2), textcoords="offset points", ha="left", fontsize=8)
    n = max(methods[m]["n"] for m in names)
    better = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    ax.set_ylabel(f"{metric} ({better} is better)")
    ax.set_title(f"{report['task']}: {metric} per method, 95% bootstrap intervals over users ({n} queries)",
                 fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(folder) / CHART_NAME
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
