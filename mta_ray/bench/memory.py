"""``mta-ray bench memory CONFIG``: the driver's peak memory per stage for N and 10N users (flat or not).

Run: ``mta-ray bench memory configs/bench/memory.yaml --out bench/results``

Each stage runs as its own ``mta-ray <stage>`` process on the same synthetic users, so the
kernel's peak resident set of that process (``ru_maxrss`` from ``wait4``) is the stage's own. Stages
stream the users and embeddings tables through Ray Data and parquet batches, so the peak should not
grow with the number of users; what does grow is listed in the result (the stored-users set of
personalize, the clusters read by the bank). Ray's worker processes are not the driver and are not
counted: Ray Data spreads the tables' blocks over the cluster's object store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mta_ray.config import Config, to_dict
from mta_ray.files.atomic import atomic_write_text

STAGES = ("prepare", "embed", "cluster", "bank", "personalize", "evaluate")


def run_stage_process(args: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, seconds, peak RSS in MiB) of one ``mta-ray`` command run as a child process."""
    t0 = time.time()
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mta_ray.cli", *args], stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.time() - t0, usage.ru_maxrss / 1024  # Linux: KiB


def run_memory_bench(cfg: Config, results_dir: Path, config_path: str, overrides: list[str]) -> dict[str, Any]:
    sizes = sorted(cfg.bench.memory_users)
    work = Path(tempfile.mkdtemp(prefix="mta-bench-memory-"))
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"benchmark": "memory", "device": "cpu driver", "users": sizes, "stages": rows,
                              "config": to_dict(cfg)}
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "memory-driver-rss.json"
    print(f"bench memory: N = {sizes}, work folder {work}", flush=True)
    for n in sizes:
        out = work / f"users-{n}"
        for stage in STAGES:
            code, seconds, rss = run_stage_process(
                [stage, config_path, *overrides, f"data.synthetic.num_users={n}", "--out", str(out)], work / "log.txt")
            rows.append({"users": n, "stage": stage, "exit_code": code, "seconds": round(seconds, 1),
                         "peak_rss_mib": round(rss, 1)})
            print(f"  N={n} {stage}: peak RSS {rss:.0f} MiB, {seconds:.1f}s" + (f", EXIT {code}" if code else ""),
                  flush=True)
            atomic_write_text(path, json.dumps(result, indent=1) + "\n")
            if code:
                raise RuntimeError(f"bench memory: `mta-ray {stage}` failed for N={n}; see {work / 'log.txt'}")
    small, large = sizes[0], sizes[-1]
    rss = {(r["users"], r["stage"]): r["peak_rss_mib"] for r in rows}
    result["growth"] = {s: round(rss[(large, s)] / rss[(small, s)], 3) for s in STAGES}
    result["note"] = (f"peak RSS of each stage's driver process for {small} and {large} synthetic users; growth = "
                      "ratio (1.0 = flat)")
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    print(f"bench memory: growth {large}/{small} users per stage: {result['growth']} -> {path}", flush=True)
    return result
