"""Training losses kept beside an adapter store, and the report's loss-curve PNG.

``adapters/<label>/losses-NNNNN.parquet``: (user_id, losses: float32 per optimizer step: the step's
window loss), one part per store shard, written just before the shard (same users, same order): a
user stored in the store always has its losses; a killed run may leave losses of users it will train
again, so readers keep a user's last row. The bank keeps each anchor's losses in its manifest row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mta_ray.files.atomic import atomic_path

LOSSES_SCHEMA = pa.schema([("user_id", pa.string()), ("losses", pa.list_(pa.float32()))])
CURVE_USERS = 20_000
"""Users (the first ones stored) whose losses the loss-curve plot reads: quantiles need no more."""


class LossLog:
    """Collects users' step losses and writes them as one part per ``every`` users (the store's shard size)."""

    def __init__(self, folder: Path, every: int):
        self.folder, self.every = Path(folder), every
        self._rows: list[dict] = []

    def add(self, user_id: str, losses: Sequence[float]) -> None:
        self._rows.append({"user_id": user_id, "losses": [float(x) for x in losses]})
        if len(self._rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in self.folder.glob("losses-*.parquet")
                   if (m := re.match(r"losses-(\d+)\.parquet$", p.name))]
        with atomic_path(self.folder / f"losses-{max(numbers, default=-1) + 1:05d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(self._rows, schema=LOSSES_SCHEMA), tmp)
        self._rows = []


def iter_losses(folder: Path, limit: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(user_id, step losses) of the users of a store's loss parts, part by part (duplicates not removed)."""
    seen = 0
    for part in sorted(Path(folder).glob("losses-*.parquet")):
        for row in pq.read_table(part, schema=LOSSES_SCHEMA).to_pylist():
            yield row["user_id"], np.asarray(row["losses"], dtype=np.float64)
            seen += 1
            if limit is not None and seen >= limit:
                return


def step_quantiles(curves: Sequence[np.ndarray], qs: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, quantiles (len(qs), steps), users per step): the loss distribution at each optimizer step
    over the users that reached it (users train for different numbers of steps)."""
    n = max((len(c) for c in curves), default=0)
    grid = np.full((len(curves), n), np.nan)
    for i, c in enumerate(curves):
        grid[i, :len(c)] = c
    counts = np.sum(np.isfinite(grid), axis=0)
    keep = counts > 0
    grid, counts = grid[:, keep], counts[keep]
    quant = np.nanquantile(grid, qs, axis=0) if grid.size else np.zeros((len(qs), 0))
    return np.arange(1, n + 1)[keep], quant, counts


def loss_curves_png(curves_by_method: dict[str, list[np.ndarray]], path: Path, title: str) -> bool:
    """One panel per method: median window loss over optimizer steps, 25-75% and 10-90% bands across
    users. Returns whether a PNG was written (False when no method has losses)."""
    curves_by_method = {m: c for m, c in curves_by_method.items() if c}
    if not curves_by_method:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves_by_method), figsize=(4.5 * len(curves_by_method), 3.6), squeeze=False)
    for ax, (m, curves) in zip(axes[0], curves_by_method.items()):
        steps, q, counts = step_quantiles(curves)
        ax.fill_between(steps, q[0], q[4], alpha=0.2, color="C0", label="10-90%")
        ax.fill_between(steps, q[1], q[3], alpha=0.35, color="C0", label="25-75%")
        ax.plot(steps, q[2], color="C0", marker="o", ms=3, label="median")
        ax.set_title(f"{m} ({len(curves)} users)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("window loss")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True
