"""``mta-ray bench pipeline CONFIG``: the whole pipeline stage by stage (time, peak GPU memory),
then personalize throughput on 1, 2, ... GPUs of the same Ray cluster; or (``--part bank-scaling``)
the bank stage's throughput on 1, 2, ... GPUs.

Run (on a GPU machine; ``random:llama3-8b`` needs no weights, only a tokenizer):
``mta-ray bench pipeline configs/paper/llama3-8b-single-gpu.yaml model.base=random:llama3-8b
model.tokenizer=TOKENIZER data.path=USERS.json --out bench/results``;
bank and personalize on 1, 2 and 4 GPUs (a 4-GPU machine):
``mta-ray bench pipeline configs/bench/bank-scaling-8b.yaml --part bank-scaling --out bench/results`` and
``mta-ray bench pipeline configs/bench/personalize-4gpu-8b.yaml --part scaling --out bench/results``.

Peak memory is what ``nvidia-smi`` reports for each GPU while a stage runs (every
process on it, CUDA contexts included): the number that must fit the card. Each
stage starts from idle GPUs (the previous stage's workers have exited). The
scaling runs train the same users (label ``scaling-<n>gpu``), or the same anchors
(bank folder ``bank-scaling/<n>gpu``), on ``n`` resident workers started, loaded and
warmed up before the clock starts, so they compare training throughput, not model
loading. Everything runs in a fresh temporary work folder unless ``--work`` names one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mta_ray.bench.gpumem import GIB, GpuMemorySampler, gpu_names, read_activity
from mta_ray.config import Config, to_dict, with_values
from mta_ray.errors import InputError
from mta_ray.files.atomic import atomic_write_text, slug
from mta_ray.files.layout import RunLayout


def _gib(values: list[int]) -> list[float]:
    return [round(v / GIB, 2) for v in values]


def measure_stages(cfg: Config, work: Path, mem: GpuMemorySampler, record) -> list[dict[str, Any]]:
    """Every stage once, from idle GPUs; ``record(rows)`` after each (a cut-off run keeps what it measured).

    A model stage gets a fresh pool of workers (loading them is timed apart from the stage's work), and
    its workers' PyTorch peaks (allocated: live tensors; reserved: the caching allocator's hold) are
    recorded beside the card's.
    """
    import ray

    from mta_ray.engine.workers import start_workers, stop_workers
    from mta_ray.stages.run import pipeline_steps, run_step

    rows: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    for step in pipeline_steps(cfg):
        name = step.label
        mem.wait_idle()
        print(f"bench pipeline: {name} ...", flush=True)
        row: dict[str, Any] = {"stage": name}
        pool = None
        t0 = time.time()
        with mem.phase(name):
            try:
                if step.uses_models:
                    pool = start_workers(cfg, RunLayout(work).bank)
                    ray.get([w.node.remote() for w in pool])
                    row["worker_load_s"] = round(time.time() - t0, 1)
                    t0 = time.time()
                    result = run_step(step, cfg, work, workers=pool, timing=timing)
                    row["workers"] = ray.get([w.gpu_memory.remote() for w in pool])
                else:
                    result = run_step(step, cfg, work)
            except Exception as exc:  # noqa: BLE001 - recorded, and the later stages need this one
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                result = {}
            finally:
                stop_workers(pool)
        seconds = time.time() - t0
        timing[f"{name}_s"] = round(seconds, 1)
        peak = mem.peaks[name]
        row.update(seconds=round(seconds, 1), peak_gib=_gib(peak), max_peak_gib=round(max(peak, default=0) / GIB, 2),
                   gpu_activity=mem.activity.get(name, []))
        rows.append(row)
        record(rows)
        if "error" in row:
            print(f"  {name} failed: {row['error']}; stopping", flush=True)
            break
        summary = {k: v for k, v in result.items() if k != "config"} if step.stage != "evaluate" else {
            m: r["metrics"] for m, r in result["methods"].items()}
        print(f"  {name}: {seconds:.1f}s, card peak {row['peak_gib']} GiB, workers {row.get('workers', '-')}; "
              f"{summary}", flush=True)
    return rows


def run_stages_before(cfg: Config, work: Path, stage: str) -> None:
    """The steps before ``stage``, not measured: the scaling runs need their outputs, and each step skips
    what ``work`` already holds (a ``--work`` folder of an earlier call is reused)."""
    from mta_ray.stages.run import pipeline_steps, run_step

    for step in pipeline_steps(cfg):
        if step.stage == stage:
            return
        run_step(step, cfg, work)


def time_on_pool(cfg: Config, bank_dir: Path | None, mem: GpuMemorySampler, warm: Callable[[Any], Any],
                 work: Callable[[list], dict]) -> tuple[dict, dict[str, Any]]:
    """``work(pool)`` on the clock, on ``cfg.ray.actors`` workers started, loaded and warmed up first
    (``warm(worker)``: one untimed call each, its stats then dropped), so kernel compilation, the
    allocator's growth and model loading stay out of the clock; nothing polls the GPUs while it runs.

    Returns ``work``'s result and the timing: workers' nodes, seconds (unrounded), load and warm-up
    seconds, each worker's busy timeline (:func:`worker_timeline`) and PyTorch memory peaks.
    """
    import ray

    from mta_ray.engine.workers import start_workers, stop_workers

    pool = start_workers(cfg, bank_dir)
    try:
        t_load = time.time()
        nodes = ray.get([w.node.remote() for w in pool])
        load_s = time.time() - t_load
        t_warm = time.time()
        ray.get([warm(w) for w in pool])
        warm_s = time.time() - t_warm
        ray.get([w.train_stats.remote() for w in pool])  # forget the warm-up call
        t0 = time.time()
        with mem.paused():  # nothing polls the GPUs while the clock runs
            result = work(pool)
        seconds = time.time() - t0
        memory = ray.get([w.gpu_memory.remote() for w in pool])
        stats = ray.get([w.train_stats.remote() for w in pool])
    finally:
        stop_workers(pool)
    return result, {"workers": nodes, "seconds": seconds, "worker_load_s": round(load_s, 1),
                    "warm_up_s": round(warm_s, 1),
                    "worker_busy": [worker_timeline(st, t0, seconds, cfg.adapt.slots) for st in stats],
                    "worker_memory": memory}


def measure_scaling(cfg: Config, work: Path, mem: GpuMemorySampler, counts: list[int],
                    record) -> list[dict[str, Any]]:
    """Personalize (MTA) the run's users on ``n`` workers for each ``n``: users/s and speed-up over the first.

    The stages before personalize run first where ``work`` does not hold them yet (not measured). Each
    pool is loaded and warmed up first (:func:`time_on_pool`): one untimed call per worker that fills
    every slot twice (copies of the first user), so bank loading stays out of the clock too. Each row
    also gives every worker's busy time (its trainer running) beside the wall time: what is left of
    the wall is waiting (start, tail, the driver).
    """
    from mta_ray.files.layout import bank_retriever
    from mta_ray.files.tables import iter_users_with_anchors
    from mta_ray.stages.personalize import queued_users, run_personalize

    run = RunLayout(work)
    run_stages_before(cfg, work, "personalize")
    first_user = next(iter_users_with_anchors(run.users, run.embeddings, bank_retriever(cfg, run.bank)))
    warm_call = [{**first_user, "user_id": f"warm-up-{i}"} for i in range(queued_users(cfg.adapt.slots))]
    rows: list[dict[str, Any]] = []
    for n in counts:
        mem.wait_idle()
        cfg_n = with_values(cfg, {"ray.actors": n}, "bench.gpu_counts")
        label = f"scaling-{n}gpu"
        shutil.rmtree(run.store(label), ignore_errors=True)
        result, timed = time_on_pool(
            cfg_n, run.bank, mem, lambda w: w.train.remote("mta", warm_call, cfg_n, str(run.bank)),
            lambda pool: run_personalize(cfg_n, work, "mta", workers=pool, label=label))
        _add_row(rows, record, "personalize", "users", 3, n, result, timed,
                 driver_storing_s=result.get("storing_s"), warm_up_users=len(warm_call))
    return rows


def _add_row(rows: list[dict[str, Any]], record, stage: str, unit: str, digits: int, n: int, result: dict,
             timed: dict[str, Any], **extra: Any) -> None:
    """One GPU count's row (``unit`` trained per second, speed-up over the first row), recorded and printed."""
    seconds = timed.pop("seconds")
    rate = result["trained"] / seconds
    rows.append({"gpus": n, "workers": timed.pop("workers"), unit: result["trained"],
                 "failed": result.get("failed", 0), "seconds": round(seconds, 1),
                 f"{unit}_per_s": round(rate, digits), **timed, **extra})
    rows[-1]["speedup"] = round(rate / rows[0][f"{unit}_per_s"], 2)
    record(rows)
    print(f"bench pipeline: {stage} on {n} GPU(s): {rate:.{digits}f} {unit}/s "
          f"({result['trained']} {unit} in {seconds:.1f}s), speed-up {rows[-1]['speedup']}x", flush=True)


def measure_bank_scaling(cfg: Config, work: Path, mem: GpuMemorySampler, counts: list[int],
                         record) -> list[dict[str, Any]]:
    """Train the run's anchors (one per cluster, ``bank.num_clusters``) on ``n`` workers for each ``n``:
    anchors/s and speed-up over the first; the bank stage's :func:`measure_scaling`.

    The stages before the bank run first where ``work`` lacks them (not measured). Each count trains
    into its own folder (``bank-scaling/<n>gpu``, emptied first), so every count trains every anchor,
    the way ``run_bank`` does (one call per anchor, dealt round the workers). Pools are loaded and
    warmed up first (:func:`time_on_pool`), with copies of the first anchor filling every slot twice.
    """
    import pyarrow.parquet as pq

    from mta_ray.core.tasks import get_task
    from mta_ray.engine.preflight import check_model
    from mta_ray.engine.workers import ANCHOR
    from mta_ray.files.tables import task_negatives
    from mta_ray.stages.bank import anchor_payload, run_bank
    from mta_ray.stages.personalize import queued_users

    if cfg.bank.engine != "multislot":
        raise InputError("bank.engine", "--part bank-scaling times the multi-slot workers: set bank.engine=multislot")
    run = RunLayout(work)
    run_stages_before(cfg, work, "bank")
    check_model(cfg, ["bank"])  # what the stage runner checks before a bank, here before any worker starts
    first = anchor_payload(cfg, run, pq.read_table(run.anchors).slice(0, 1).to_pylist())[0]
    negatives = task_negatives(run.users, get_task(cfg.data.task), cfg.seed)
    warm_call = [{**first, "user_id": f"warm-up-{i}"} for i in range(queued_users(cfg.adapt.slots))]
    rows: list[dict[str, Any]] = []
    for n in counts:
        mem.wait_idle()
        cfg_n = with_values(cfg, {"ray.actors": n}, "bench.gpu_counts")
        bank_dir = work / "bank-scaling" / f"{n}gpu"
        shutil.rmtree(bank_dir, ignore_errors=True)
        result, timed = time_on_pool(
            cfg_n, None, mem, lambda w: w.train.remote(ANCHOR, warm_call, cfg_n, negatives=negatives),
            lambda pool: run_bank(cfg_n, work, workers=pool, bank_dir=bank_dir))
        _add_row(rows, record, "bank", "anchors", 4, n, result, timed, warm_up_anchors=len(warm_call))
    return rows


def worker_timeline(stats: dict[str, Any], t0: float, seconds: float, slots: int) -> dict[str, Any]:
    """One worker's ``train_stats`` over a timed run that started at wall time ``t0``: its counters,
    busy fraction, occupancy, seconds per iteration, and when it sat idle (before its first trainer
    run, between runs, after its last), with its calls' (arrived, queued, returned) and its runs'
    (start, end) as seconds since ``t0``: where a worker lost time, and whether the call was late."""
    stats = dict(stats)
    calls, runs = stats.pop("spans", []), stats.pop("run_spans", [])
    row: dict[str, Any] = {k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}
    row.update(busy_fraction=round(stats["busy_s"] / seconds, 3),
               occupancy=round(stats["slot_iterations"] / max(1, stats["iterations"] * slots), 3),
               s_per_iteration=round(stats["busy_s"] / max(1, stats["iterations"]), 4))
    runs = sorted((a - t0, b - t0) for a, b in runs)
    if runs:
        row["idle_s"] = {"before_first_run": round(runs[0][0], 2),
                         "between_runs": round(sum(b[0] - a[1] for a, b in zip(runs, runs[1:])), 2),
                         "after_last_run": round(seconds - runs[-1][1], 2)}
    row["run_timeline"] = [[round(a, 2), round(b, 2)] for a, b in runs]
    row["call_timeline"] = [[round(a - t0, 2), round(q - t0, 2), round(d - t0, 2), n] for a, q, d, n in sorted(calls)]
    return row


class _Recorder:
    """Rewrites the result JSON after every measurement (a cut-off run keeps what it measured)."""

    def __init__(self, path: Path, result: dict[str, Any], has_gpus: bool):
        self.path, self.result, self.has_gpus = path, result, has_gpus

    def __call__(self, key: str):
        def write(rows: list[dict[str, Any]]) -> None:
            self.result[key] = rows
            if key == "stages":
                worst = max(rows, key=lambda r: r["max_peak_gib"])
                self.result.update(largest_stage=worst["stage"], largest_peak_gib=worst["max_peak_gib"],
                                   fits_budget=worst["max_peak_gib"] <= self.result["budget_gib"]
                                   if self.has_gpus else None)
            atomic_write_text(self.path, json.dumps(self.result, indent=1) + "\n")
        return write


NOTES = {
    "stages": "peak_gib: nvidia-smi memory.used per GPU during the stage (all processes; sampled every 0.2 s, "
              "with SM clock, power and utilisation in gpu_activity)",
    "scaling": "scaling: the same users personalised (MTA) on n resident workers, model loading and a warm-up "
               "call excluded, no GPU polling while timed (worker_memory: each worker's PyTorch peaks)",
    "bank-scaling": "bank_scaling: the run's anchors trained into an empty bank on n resident workers (one call "
                    "per anchor, as the bank stage), model loading and a warm-up call excluded, no GPU polling "
                    "while timed (worker_busy: each worker's trainer runs and calls; worker_memory: its PyTorch peaks)",
}
PARTS = {"all": ("stages", "scaling"), "stages": ("stages",), "scaling": ("scaling",),
         "bank-scaling": ("bank-scaling",)}
"""What each ``--part`` measures (``all``: the stages, then personalize on 1..G GPUs)."""


def result_path(cfg: Config, results_dir: Path, part: str, names: list[str]) -> Path:
    """``pipeline-<part>-<shape>-<device>-x<G>.json``; ``bank-scaling-<shape>-<device>-x<G>.json`` for the bank."""
    device = names[0] if names else "cpu"
    shape = cfg.model.base.split(":", 1)[-1] if cfg.model.base.startswith("random:") else Path(cfg.model.base).stem
    stem = part if part == "bank-scaling" else f"pipeline-{part}"
    return results_dir / f"{stem}-{slug(shape)}-{slug(device)}-x{len(names)}.json"


def run_pipeline_bench(cfg: Config, results_dir: Path, part: str = "all", work: Path | None = None) -> dict:
    """``part``: ``stages`` (time and memory of each stage), ``scaling`` (personalize on 1..G GPUs), ``all``
    (both), or ``bank-scaling`` (the bank on 1..G GPUs).

    ``work``: a work folder to use and keep (a later ``scaling`` call reuses its bank); default: a
    temporary folder, removed at the end. The JSON is rewritten after every measurement.
    """
    import ray

    from mta_ray.engine.raysetup import init_ray

    names = gpu_names()
    if not names:
        print("bench pipeline: no NVIDIA GPU found (nvidia-smi): peak memory will be empty", flush=True)
    init_ray(cfg)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    counts = [n for n in cfg.bench.gpu_counts if n <= max(gpus, 1)]
    not_run = [{"gpus": n, "why": f"the Ray cluster has {gpus} GPU(s)"}
               for n in cfg.bench.gpu_counts if n not in counts]
    temporary = work is None
    work = Path(tempfile.mkdtemp(prefix="mta-bench-pipeline-")) if work is None else work
    work.mkdir(parents=True, exist_ok=True)
    path = result_path(cfg, results_dir, part, names)
    budget = cfg.bench.memory_budget_gib
    result: dict[str, Any] = {
        "benchmark": "pipeline", "part": part, "device": names[0] if names else "cpu", "gpus": names,
        "model": cfg.model.base, "budget_gib": budget, "config": to_dict(cfg),
        "note": "; ".join(NOTES[p] for p in PARTS[part]),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    record = _Recorder(path, result, bool(names))
    print(f"bench pipeline ({part}): {names or ['cpu']}, base {cfg.model.base}, work folder {work}", flush=True)
    try:
        with GpuMemorySampler(activity=read_activity) as mem:
            if "stages" in PARTS[part]:
                measure_stages(cfg, work, mem, record("stages"))
            if {"scaling", "bank-scaling"} & set(PARTS[part]):
                result["scaling_not_run"] = not_run
            if "scaling" in PARTS[part]:
                measure_scaling(cfg, work, mem, counts, record("scaling"))
            if "bank-scaling" in PARTS[part]:
                measure_bank_scaling(cfg, work, mem, counts, record("bank_scaling"))
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    if "largest_stage" in result:
        print(f"bench pipeline: largest stage {result['largest_stage']} at {result['largest_peak_gib']} GiB "
              f"(budget {budget} GiB)", flush=True)
    print(f"bench pipeline: -> {path}", flush=True)
    return result
