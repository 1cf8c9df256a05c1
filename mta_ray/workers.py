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

from .config import Config, LoraTrainConfig
from .encoding import encode_prompt, user_examples
from .lora import Lora, load_peft, merge, staged
from .continuous import ContinuousTrainer
from .store import AdapterStore, pack
from .tasks import get_task
from .trainer import Job, MultiSlotTrainer


def train_config(cfg: Config, kind: str) -> LoraTrainConfig:
    return {"anchor": cfg.bank, "mta": cfg.adapt, "adapt_only": cfg.adapt, "oppu": cfg.oppu}[kind]


def merged_rank(cfg: Config) -> int:
    return cfg.bank.rank * (cfg.merge.top_k if cfg.merge.space == "delta" else 1)


CALLS_PER_WORKER = 8
"""Concurrent calls a worker accepts (the driver queues at most a few; the rest are small queries)."""


@ray.remote(max_restarts=2, max_task_retries=2, max_concurrency=CALLS_PER_WORKER)
class ModelWorker:
    def __init__(self, cfg: Config, bank_dir: str | None, threads: int):
        from .models import load_base

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
                import json
                manifest_path = Path(bank_dir, "manifest.json")
                anchors = json.loads(manifest_path.read_text())["anchors"] if manifest_path.is_file() else []
                self._banks[bank_dir] = {a["anchor_id"]: load_peft(Path(bank_dir) / a["path"]) for a in anchors}
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

    def train(self, kind: str, users: list[dict[str, Any]], cfg: Config | None = None,
              bank_dir: str | None = None, packed: bool = False) -> list[dict[str, Any]]:
        """Train one adapter per user; ``users``: {user_id, history, anchors, weights, negatives?}.

        ``cfg`` overrides the training settings of this call (the base model stays the one loaded);
        ``bank_dir`` picks the bank the anchors come from (default: the worker's); ``packed``: return
        each adapter as the store keeps it (``store.Packed``, bf16) rather than as a Lora.
        """
        arrived = time.time()
        cfg = cfg or self.cfg
        tcfg = train_config(cfg, kind)
        jobs = []
        for u in users:
            examples = [ex for h in u.get("histories", [u.get("history")])
                        for ex in user_examples(self.task, h, self.tokenizer, cfg.data.history_k,
                                                cfg.model.max_prompt_tokens, cfg.model.chat_template,
                                                u.get("negatives", ()))]
            merged = (self.merged_for(u.get("anchors", []), u.get("weights", []), cfg, bank_dir)
                      if kind == "mta" else None)
            if merged is not None:  # the GPU thread only copies it into a slot
                merged = staged(merged, self.model.dtype, pin=self.device == "cuda")
            jobs.append(Job(u["user_id"], examples, merged=merged, seed=cfg.seed))
        R = merged_rank(cfg) if kind == "mta" else 0
        slots, max_rows = max(1, cfg.adapt.slots), cfg.adapt.max_rows

        def build() -> MultiSlotTrainer:
            return MultiSlotTrainer(self.model, tcfg, slots=slots, merged_rank=R,
                                    pad_id=self.tokenizer.pad_token_id, seed=cfg.seed, max_rows=max_rows)

        # Calls with equal training settings share the running trainer (and its slots).
        queued = time.time()
        results = self._trainer.train(repr((tcfg, R, slots, max_rows, cfg.seed)), jobs, build)
        out = [{"user_id": r.user_id, "lora": pack(r.lora) if packed and r.lora is not None else r.lora,
                "steps": r.steps, "final_loss": r.final_loss, "status": r.status, "error": r.error}
               for r in results]
        with self._stats_lock:
            self._call_spans.append((arrived, queued, time.time(), len(users)))
        return out

    def generate(self, requests: list[dict[str, Any]], targets: list[str], cfg: Config | None = None,
                 bank_dir: str | None = None) -> list[str]:
        """Greedy answers; each request: {prompt, anchors, weights, store, row} (store/row: stacked adapter)."""
        from .generation import generate

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
    from .raysetup import init_ray

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
    from .raysetup import worker_plan

    plan = worker_plan(cfg)
    return [ModelWorker.options(**plan.options).remote(cfg, str(bank_dir) if bank_dir else None, plan.threads)
            for _ in range(plan.count)]
