"""Start or join Ray, and decide how many model workers to run and with what resources."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from mta_ray.config import Config

FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MTA_RAY_CACHE", "TOKENIZERS_PARALLELISM",
                 "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                 "PYTORCH_CUDA_ALLOC_CONF", "DS_ACCELERATOR", "DS_BUILD_OPS")
"""Environment variables of the driver that its Ray workers get too (offline hubs, caches, NCCL switches)."""
DEFAULT_ENV = {"TOKENIZERS_PARALLELISM": "false"}
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Where ``ray job submit`` hands its driver the job's config (its runtime env among it)."""


def job_runtime_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The runtime env of the Ray job this driver runs in (``ray job submit``, a KubeRay RayJob); empty
    when it runs outside a job."""
    raw = environ.get(JOB_CONFIG_ENV, "")
    if not raw:
        return {}
    try:
        return json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def driver_runtime_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The runtime env ``ray.init`` adds: the forwarded variables the job does not set already.

    Ray merges a job's runtime env with the driver's and refuses any key given twice, so what the job
    sets (``--runtime-env-json``, ``runtimeEnvYAML``) is left to the job; its workers get it from there.
    """
    env = {**DEFAULT_ENV, **{k: environ[k] for k in FORWARDED_ENV if k in environ}}
    taken = job_runtime_env(environ).get("env_vars") or {}
    env = {k: v for k, v in env.items() if k not in taken}
    return {"env_vars": env} if env else {}


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` (or the cluster of a submitted job: ``RAY_ADDRESS``) when set, else start an
    embedded local Ray (the default)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"runtime_env": driver_runtime_env(os.environ), "log_to_driver": True,
                              "logging_level": "WARNING"}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")  # `ray job submit` sets RAY_ADDRESS
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or None, include_dashboard=False, **kwargs)
        start_reaper(ray._private.worker._global_node.get_session_dir_path())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def start_reaper(session_dir: str) -> None:
    """Watch this driver from a separate process that ends the embedded Ray's processes when the driver
    dies without shutting Ray down (:mod:`mta_ray.engine.reaper`)."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-m", "mta_ray.engine.reaper", str(os.getpid()), session_dir],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True, env={**os.environ, "PYTHONPATH": _package_root()})


def _package_root() -> str:
    """The folder holding this ``mta_ray`` (so the watcher runs the same code as the driver)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")


@dataclass
class WorkerPlan:
    count: int
    options: dict[str, Any]
    threads: int
    """torch CPU threads per worker (Ray sets 1 by default)."""
    gpu: bool


def worker_plan(cfg: Config) -> WorkerPlan:
    """One model worker per GPU (or per ``gpus_per_actor`` share); CPU-only: workers split the CPUs."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), int(res.get("CPU", 1))
    if gpus >= cfg.ray.gpus_per_actor > 0:
        count = cfg.ray.actors or max(1, int(gpus / cfg.ray.gpus_per_actor))
        return WorkerPlan(count, {"num_gpus": cfg.ray.gpus_per_actor, "num_cpus": 1}, 4, True)
    count = cfg.ray.actors or 1
    per = max(1, cpus // count)
    return WorkerPlan(count, {"num_cpus": per}, per, False)
