"""Start or join Ray, and decide how many model workers to run and with what resources."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mta_ray.config import Config

FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "MTA_RAY_CACHE", "TOKENIZERS_PARALLELISM",
                 "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                 "PYTORCH_CUDA_ALLOC_CONF", "DS_ACCELERATOR", "DS_BUILD_OPS")


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` when set, else start an embedded local Ray (the default)."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True,
                              "logging_level": "WARNING"}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS", "")  # `ray job submit` sets RAY_ADDRESS
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or None, include_dashboard=False, **kwargs)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


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
