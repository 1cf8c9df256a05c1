"""The Ray actor that keeps one base model resident and trains or generates for many users.

Bank, personalize and evaluate all use it: a worker loads the base once,
loads the bank's anchor LoRAs once, and then serves batches of users: it
builds their examples, merges their anchors (the merge happens where the bank
is, so only anchor ids and weights cross the network), runs the multi-slot
trainer, and returns each user's adapter.

It is a threaded actor: several ``train`` calls prepare their users at once
(CPU) and feed one continuous trainer (``continuous.ContinuousTrainer``) that
keeps the GPU's slots filled across calls; ``generate`` takes the same GPU lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import ray
import torch

from mta_ray.config import Config, LoraTrainConfig
from mta_ray.core.lora import Lora, merge, staged
from mta_ray.core.methods import method
from mta_ray.core.tasks import get_task
from mta_ray.engine.continuous import ContinuousTrainer
from mta_ray.engine.encoding import encode_prompt, job_examples
from mta_ray.engine.trainer import Job, MultiSlotTrainer
from mta_ray.errors import InputError
from mta_ray.files.layout import anchor_paths
from mta_ray.files.peft_format import load_peft
from mta_ray.files.store import AdapterStore, pack

ANCHOR = "anchor"
"""``train``'s kind for the bank's anchor LoRAs (the other kinds are the trained methods)."""


def train_config(cfg: Config, kind: str) -> LoraTrainConfig:
    """The training recipe of ``kind``: the bank's for anchors, else the method's (``adapt`` or ``oppu``)."""
    return cfg.bank if kind == ANCHOR else getattr(cfg, method(kind).recipe)


def storage_precision(cfg: Config, kind: str) -> str:
    """How ``kind``'s adapters are stored: the stacked adapter at ``adapt.storage_precision``, others bf16."""
    return cfg.adapt.storage_precision if train_config(cfg, kind) is cfg.adapt else "bfloat16"


def merged_rank(cfg: Config) -> int:
    """Rank of a user's merged LoRA: K anchors side by side in delta space, one anchor's rank in params."""
    return cfg.bank.rank * (cfg.merge.top_k if cfg.merge.space == "delta" else 1)


CALLS_PER_WORKER = 8
"""Concurrent calls a worker accepts (the driver queues at most a few; the rest are small queries)."""


@ray.remote(max_restarts=2, max_task_retries=2, max_concurrency=CALLS_PER_WORKER)
class ModelWorker:
    def __init__(self, cfg: Config, bank_dir: str | None, threads: int):
        from mta_ray.files.models import load_base

        if not torch.cuda.is_available():
            torch.set_num_threads(threads)
        elif cfg.ray.gpu_memory_gib > 0:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.ray.gpu_memory_gib * 2 ** 30 / total))
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_base(cfg.model, self.device)
        self.task = get_task(cfg.data.task)
        self.bank_dir = bank_dir
        self._banks: dict[str, dict[str, Lora]] = {}
        self._stores: dict[str, Any] = {}
        self._gpu = threading.Lock()
        self._cache_lock = threading.Lock()
        self._trainer = ContinuousTrainer(self._gpu)
        self._call_spans: list[tuple[float, float, float, int]] = []
        """Each ``train`` call's (arrived, queued, returned) wall times and users, since the last query."""
        self._stats_lock = threading.Lock()

    def _bank(self, bank_dir: str | None) -> dict[str, Lora]:
        """A bank's anchor LoRAs, loaded once per folder (studies switch between several banks)."""
        bank_dir = bank_dir or self.bank_dir
        if not bank_dir:
            return {}
        with self._cache_lock:
            if bank_dir not in self._banks:
                self._banks[bank_dir] = {aid: load_peft(path) for aid, path in anchor_paths(bank_dir).items()}
            return self._banks[bank_dir]

    def _store(self, path: str) -> Any:
        """One AdapterStore per folder (its layout is read once, not per request)."""
        with self._cache_lock:
            if path not in self._stores:
                self._stores[path] = AdapterStore(path)
            return self._stores[path]

    def node(self) -> str:
        return f"{os.uname().nodename}:{self.device}"

    def gpu_memory(self) -> dict[str, float]:
        """Peak PyTorch GPU memory of this worker since it started, in GiB (empty on CPU)."""
        if self.device != "cuda":
            return {}
        gib = 2 ** 30
        return {"allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
                "reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2),
                "device_gib": round(torch.cuda.get_device_properties(0).total_memory / gib, 2)}

    def train_stats(self) -> dict[str, Any]:
        """Since the last query: ``train`` calls and their users, seconds spent preparing them (CPU,
        beside the GPU), each call's (arrived, queued, returned) wall times and users; trainer runs
        (each ends with its slots drained), their (start, end) wall times, the seconds they ran, their
        iterations and busy slots: the benchmarks tell a worker's busy time from its waiting time, slow
        iterations from empty slots, and a late call from a slow one, with them."""
        with self._stats_lock:
            spans, self._call_spans = self._call_spans, []
        return {"calls": len(spans), "users": sum(n for *_, n in spans),
                "setup_s": sum(queued - arrived for arrived, queued, _, _ in spans), "spans": spans,
                **self._trainer.take_stats()}

    def merged_for(self, anchors: list[str], weights: list[float], cfg: Config,
                   bank_dir: str | None = None) -> Lora | None:
        if not anchors:
            return None
        bank = self._bank(bank_dir)
        return merge([bank[a] for a in anchors], weights, cfg.merge.space)

    def _job(self, u: dict[str, Any], cfg: Config, merges: bool, bank_dir: str | None,
             negatives: list[tuple[str, str]]) -> Job:
        """One user's training job: its examples and, when the method ``merges``, its merged LoRA staged for
        the GPU (the training thread then only copies it into a slot)."""
        examples = job_examples(self.task, u, self.tokenizer, cfg, negatives)
        merged = self.merged_for(u.get("anchors", []), u.get("weights", []), cfg, bank_dir) if merges else None
        if merged is not None:
            merged = staged(merged, self.model.dtype, pin=self.device == "cuda")
        return Job(u["user_id"], examples, merged=merged, seed=cfg.seed)

    def train(self, kind: str, users: list[dict[str, Any]], cfg: Config | None = None,
              bank_dir: str | None = None, packed: bool = False,
              negatives: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Train one adapter per user; ``users``: {user_id, history, anchors, weights} (an anchor:
        {user_id: anchor id, histories, owners: the users whose histories they are}).

        ``cfg`` overrides the training settings of this call (the base model stays the one loaded);
        ``bank_dir`` picks the bank the anchors come from (default: the worker's); ``packed``: return
        each adapter as the store keeps it (``store.Packed``, at :func:`storage_precision`) rather than as a Lora;
        ``negatives``: (user_id, item input) pool of tasks whose questions need other users' items
        (LaMP-1; ``files.tables.negative_pool``): each user draws from the other users' items.
        """
        arrived = time.time()
        cfg = cfg or self.cfg
        tcfg = train_config(cfg, kind)
        merges = kind != ANCHOR and method(kind).merges
        jobs = [self._job(u, cfg, merges, bank_dir, negatives or []) for u in users]
        R = merged_rank(cfg) if merges else 0
        merged_targets = list(cfg.bank.target_modules) if merges else None  # the merged LoRA covers the bank's
        slots, max_rows = max(1, cfg.adapt.slots), cfg.adapt.max_rows

        kernel = cfg.adapt.lora_kernel
        if kernel == "triton" and self.device != "cuda":
            raise InputError("adapt.lora_kernel", f"triton runs on CUDA GPUs only and worker {self.node()} "
                                                  "has none (set adapt.lora_kernel=bmm)")

        def build() -> MultiSlotTrainer:
            return MultiSlotTrainer(self.model, tcfg, slots=slots, merged_rank=R,
                                    pad_id=self.tokenizer.pad_token_id, seed=cfg.seed, max_rows=max_rows,
                                    merged_targets=merged_targets, lora_kernel=kernel)

        # Calls with equal training settings share the running trainer (and its slots).
        queued = time.time()
        key = repr((tcfg, R, merged_targets, slots, max_rows, cfg.seed, kernel))
        results = self._trainer.train(key, jobs, build)
        precision = storage_precision(cfg, kind)
        out = [{"user_id": r.user_id, "lora": pack(r.lora, precision) if packed and r.lora is not None else r.lora,
                "steps": r.steps, "final_loss": r.final_loss, "losses": list(r.step_losses), "status": r.status,
                "error": r.error}
               for r in results]
        with self._stats_lock:
            self._call_spans.append((arrived, queued, time.time(), len(users)))
        return out

    def generate(self, requests: list[dict[str, Any]], targets: list[str], cfg: Config | None = None,
                 bank_dir: str | None = None) -> list[str]:
        """Greedy answers; each request: {prompt, anchors, weights, store, row} (store/row: stacked adapter)."""
        from mta_ray.engine.generation import generate

        cfg = cfg or self.cfg
        max_new = cfg.eval.max_new_tokens or self.task.max_new_tokens
        out: list[str] = []
        bs = cfg.eval.batch_size
        for i in range(0, len(requests), bs):
            chunk = requests[i:i + bs]
            prompts = [encode_prompt(self.tokenizer, r["prompt"], cfg.model.max_prompt_tokens,
                                     cfg.model.chat_template) for r in chunk]
            merged = [self.merged_for(r.get("anchors", []), r.get("weights", []), cfg, bank_dir) for r in chunk]
            stacked = [self._store(r["store"]).load(r["row"]) if r.get("store") else None for r in chunk]
            with self._gpu:  # never beside a training run (it swaps the model's layers)
                out += generate(self.model, self.tokenizer, prompts, max_new, merged, stacked, targets)
        return out


@contextlib.contextmanager
def worker_pool(cfg: Config, bank_dir: Path | None = None, workers: list | None = None) -> Iterator[list[Any]]:
    """``workers`` when a caller passes its own pool (left running), else a fresh pool stopped on exit."""
    if workers is not None:
        yield workers
        return
    from mta_ray.engine.raysetup import init_ray

    init_ray(cfg)
    pool = start_workers(cfg, bank_dir)
    try:
        yield pool
    finally:
        stop_workers(pool)


def stop_workers(pool: list[Any] | None) -> None:
    """Kill a pool's workers (their GPU memory is freed once the processes exit)."""
    for w in pool or []:
        ray.kill(w)


def start_workers(cfg: Config, bank_dir: Path | None) -> list[Any]:
    """One resident-model worker per GPU (or the CPU share); see :func:`raysetup.worker_plan`."""
    from mta_ray.engine.raysetup import worker_plan

    plan = worker_plan(cfg)
    return [ModelWorker.options(**plan.options).remote(cfg, str(bank_dir) if bank_dir else None, plan.threads)
            for _ in range(plan.count)]
