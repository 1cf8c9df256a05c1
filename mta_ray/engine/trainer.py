"""The multi-slot LoRA trainer (Ray-free): many users' adapters in one forward/backward.

S slots each hold one user. Every iteration, each busy slot contributes its
next micro-batch; the rows run through the frozen base together, each with its
own slot's factors (:mod:`mta_ray.engine.multilora`). Per slot the trainer keeps the
data order, gradient-accumulation window, LR schedule, gradient clipping and
AdamW state, so each user's training is the same as training that user alone.
When a user finishes its epochs its slot takes the next user from the queue
(continuous refill). The same trainer trains anchors (no merged branch),
stacked adapters (with a merged branch) and OPPU-style per-user LoRAs.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mta_ray.config import LoraTrainConfig
from mta_ray.core.lora import Lora
from mta_ray.core.optim import adamw_coefficients, adamw_rows_
from mta_ray.engine.fused import apply_fused
from mta_ray.engine.lora_kernels import lora_ops
from mta_ray.engine.multilora import FlatFactors, equal_runs, inject, restore, set_merged, set_stacked

IGNORE = -100


@dataclass
class Example:
    """One tokenised (prompt, target) pair; ``labels`` is -100 on prompt tokens."""

    input_ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


@dataclass
class Job:
    """One user to train: its examples, its frozen merged LoRA, optional initial factors."""

    user_id: str
    examples: list[Example]
    merged: Lora | None = None
    init: Lora | None = None
    """Raw (unscaled) initial stacked factors; None = PEFT's default init seeded by the user."""
    seed: int = 0


@dataclass
class JobResult:
    user_id: str
    lora: Lora | None
    """Trained stacked factors (scaling folded into B), on the CPU; None when failed."""
    step_losses: list[float] = field(default_factory=list)
    steps: int = 0
    status: str = "ok"
    error: str = ""

    @property
    def final_loss(self) -> float:
        return self.step_losses[-1] if self.step_losses else float("nan")


def user_seed(seed: int, user_id: str) -> int:
    return zlib.crc32(f"{seed}:{user_id}".encode())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one user's epoch: a permutation seeded by (user seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def pad_examples(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) padded on the right to the longest example: real tokens keep
    their positions, padding is masked and ignored by the loss."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), T), dtype=torch.long)
    lab = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for n, e in enumerate(examples):
        ids[n, :len(e.input_ids)] = torch.tensor(e.input_ids)
        att[n, :len(e.input_ids)] = 1
        lab[n, :len(e.labels)] = torch.tensor(e.labels)
    return ids.to(device), att.to(device), lab.to(device)


def plan_windows(n: int, cfg: LoraTrainConfig, seed: int) -> list[list[list[int]]]:
    """Optimizer steps as windows of micro-batches of example indices, all epochs.

    An epoch's micro-batches are consecutive ``batch_size`` examples of its
    order; ``grad_accum`` micro-batches make one step, and an epoch's last
    window may be shorter (it still steps).
    """
    windows = []
    for epoch in range(cfg.epochs):
        order = epoch_order(n, seed, epoch)
        micro = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        windows += [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
    return windows


def lr_multiplier(step: int, total: int, cfg: LoraTrainConfig) -> float:
    """LR factor at optimizer step ``step`` (0-based), as transformers' schedules compute it."""
    warmup = math.ceil(total * cfg.warmup_ratio)
    if step < warmup:
        return step / max(1, warmup)
    if cfg.scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass
class _Slot:
    job: Job
    windows: list[list[list[int]]]
    window_tokens: list[int]
    step: int = 0          # optimizer steps taken
    micro: int = 0         # micro-batch index inside the current window
    losses: list[float] = field(default_factory=list)
    failed: bool = False   # its loss went non-finite (found one iteration late; its result is out)


@dataclass
class _ReadBack:
    """One optimizer step's results on their way to the host: the stepped slots' window losses and the
    factors of the jobs that took their last step. Read one iteration later, so the host never waits
    for the GPU to drain (it waits for the previous iteration while this one runs)."""

    entries: list[tuple[int, _Slot, int, torch.Tensor | None]]
    """(slot, its job's state then, the step taken (0-based), and when that was the job's last step its
    factors row (P,) on the host, else None)."""
    losses: torch.Tensor                    # (k,) float64 on the host, filled once ``ready`` has passed
    ready: torch.cuda.Event | None          # None on the CPU (copies done at once)


class MultiSlotTrainer:
    """Trains stacked LoRAs for a queue of users, ``slots`` users at a time."""

    def __init__(self, model: nn.Module, cfg: LoraTrainConfig, slots: int, merged_rank: int = 0,
                 pad_id: int = 0, seed: int = 0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 fused: bool | None = None, max_rows: int = 0, merged_targets: Sequence[str] | None = None,
                 shared_inputs: bool = True, lora_kernel: str = "bmm"):
        """``fused``: swap in compiled RMSNorm/SiLU-mul/rotary kernels (default: on CUDA only).

        ``max_rows``: most sequences in one forward/backward (0 = all busy slots at once); busy slots
        are split into groups under it, which changes nothing but peak memory (slots' gradients are
        separate rows of the factor tensors).

        ``merged_targets``: the modules the frozen merged LoRAs adapt (the bank's ``target_modules``;
        default: the stacked adapter's own); every one of them carries the merged branch.

        ``shared_inputs``: q/k/v and gate/up computed together, factors per slot and cast once per pass (the
        engine's path); False keeps the reference path (each linear on its own, factors gathered per row
        and cast per layer), which the benchmark measures beside it.

        ``lora_kernel``: ``bmm`` (torch's batched matmuls) or ``triton`` (:mod:`mta_ray.engine.lora_kernels`)
        for the LoRA branches' down- and up-projections.
        """
        self.model, self.cfg, self.slots, self.pad_id, self.seed = model, cfg, slots, pad_id, seed
        self.max_rows = max_rows
        self.betas, self.eps = betas, eps
        self.device = next(model.parameters()).device
        self.shared_inputs = shared_inputs
        self.router, self.layers = inject(model, cfg.target_modules, slots, cfg.rank, merged_rank,
                                          cfg.alpha / cfg.rank, cfg.dropout, merged_targets, shared_inputs)
        self.router.ops = lora_ops(lora_kernel)
        self.factors = FlatFactors(self.layers)
        """Every slot's trainable factors (and gradients) as one (S, P) row each: the optimizer's unit."""
        self.compute_dtype = next(iter(self.layers.values())).merged_A.dtype  # the base weights' dtype
        self.exp_avg = torch.zeros_like(self.factors.data)
        self.exp_avg_sq = torch.zeros_like(self.factors.data)
        self.body = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        if fused is None:
            fused = self.device.type == "cuda"
        self._undo_fused = apply_fused(model) if fused else None
        self._window_loss = torch.zeros(slots, dtype=torch.float64, device=self.device)
        """Each slot's loss over its current accumulation window, summed on the device."""
        self.iterations = 0
        """Iterations run (one micro-batch of every busy slot each)."""
        self.slot_iterations = 0
        """Sum over iterations of the busy slots: ``slot_iterations / (iterations * slots)`` is occupancy."""

    def close(self) -> None:
        """Put the model back as it was (plain modules)."""
        if self._undo_fused:
            self._undo_fused()
            self._undo_fused = None
        restore(self.model, self.layers)

    # ------------------------------------------------------------------ slots
    def _load(self, s: int, job: Job) -> _Slot:
        set_merged(self.layers, s, job.merged)
        if job.init is not None:
            set_stacked(self.layers, s, job.init)
        else:
            row = self.factors.init_row(torch.Generator().manual_seed(user_seed(job.seed, job.user_id)))
            self.factors.data[s].copy_(self._to_device(row))
        with torch.no_grad():
            for t in (self.exp_avg, self.exp_avg_sq, self.factors.grad):
                t[s].zero_()
        windows = plan_windows(len(job.examples), self.cfg, user_seed(job.seed, job.user_id))
        tokens = [sum(job.examples[i].target_tokens for mb in w for i in mb) for w in windows]
        return _Slot(job, windows, tokens)

    def run(self, jobs: Iterable[Job], on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
        """Train every job; results in completion order, returned or, with ``on_result``, handed to it
        as they come (and not kept: a long-running feed of jobs does not pile up adapters here).

        ``jobs`` is iterated afresh whenever a slot is free, so an iterator that stops while empty and
        resumes later (``continuous._Feed``) keeps feeding the same run.

        Losses (and finished adapters) reach the host one iteration late (:class:`_ReadBack`): a slot
        whose loss went non-finite has run one more micro-batch by then (its own rows only) and fails.
        """
        queue: Iterator[Job] = iter(jobs)
        state: list[_Slot | None] = [None] * self.slots
        results: list[JobResult] = []
        emit = on_result or results.append

        def refill(s: int) -> None:
            for job in queue:
                if not job.examples:
                    emit(JobResult(job.user_id, None, status="failed", error="no training examples"))
                    continue
                state[s] = self._load(s, job)
                return

        for s in range(self.slots):
            refill(s)
        self.model.train()
        pending: _ReadBack | None = None
        while any(st is not None for st in state):
            busy = [s for s in range(self.slots) if state[s] is not None]
            self.iterations += 1
            self.slot_iterations += len(busy)
            self._forward_backward(state, busy)
            stepping = []
            for s in busy:
                st = state[s]
                st.micro += 1
                if st.micro == len(st.windows[st.step]):
                    stepping.append(s)
            launched = None
            if stepping:
                launched = self._read_back(state, stepping, self._optimizer_step(state, stepping))
                for s in stepping:
                    st = state[s]
                    st.step, st.micro = st.step + 1, 0
                    if st.step == len(st.windows):
                        state[s] = None  # done: its factors are on their way to the host
            if pending is not None:
                self._settle(pending, state, emit)  # meanwhile the GPU runs this iteration
            pending = launched
            for s in range(self.slots):
                if state[s] is None:
                    refill(s)
        if pending is not None:
            self._settle(pending, state, emit)
        self.router.route(None)
        self.model.eval()
        return results

    def _read_back(self, state: list[_Slot | None], stepping: list[int], idx: torch.Tensor) -> _ReadBack:
        """Queue the copies of the stepped slots' window losses (then zeroed) and of the factors of the
        jobs that have just taken their last step, without waiting for them."""
        losses = self._window_loss.index_select(0, idx)
        self._window_loss.index_fill_(0, idx, 0.0)
        entries = []
        for s in stepping:
            st = state[s]
            last = st.step + 1 == len(st.windows)
            entries.append((s, st, st.step, self._to_host(self.factors.data[s]) if last else None))
        host_losses = self._to_host(losses)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return _ReadBack(entries, host_losses, ready)

    def _settle(self, back: _ReadBack, state: list[_Slot | None], emit: Callable[[JobResult], None]) -> None:
        """Book a read-back's losses: a non-finite one fails its job (and frees its slot if it still
        holds it); a job's last step emits its adapter."""
        if back.ready is not None:
            back.ready.synchronize()
        for (s, st, step, row), loss in zip(back.entries, back.losses.tolist()):
            if st.failed:
                continue
            if not math.isfinite(loss):
                st.failed = True
                emit(JobResult(st.job.user_id, None, st.losses, step, "failed",
                               f"non-finite loss at step {step + 1}"))
                if state[s] is st:
                    state[s] = None
                continue
            st.losses.append(loss)
            if row is not None:
                emit(JobResult(st.job.user_id, self.factors.unpack(row), st.losses, step + 1))

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on the host; on CUDA into pinned memory, without waiting (valid once an event
        recorded after it has passed)."""
        if self.device.type != "cuda":
            return t.detach().clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    # ------------------------------------------------------------------ one iteration
    def _forward_backward(self, state: list[_Slot | None], busy: list[int]) -> None:
        """One micro-batch of every busy slot, in groups of at most ``max_rows`` sequences; each slot's
        weighted loss is added to ``_window_loss`` on the device."""
        group: list[int] = []
        rows = 0
        for s in busy:
            st = state[s]
            n = len(st.windows[st.step][st.micro])
            if group and self.max_rows and rows + n > self.max_rows:
                self._pass(state, group)
                group, rows = [], 0
            group.append(s)
            rows += n
        self._pass(state, group)

    def _pass(self, state: list[_Slot | None], busy: list[int]) -> None:
        """Forward and backward of the busy slots' current micro-batches, without waiting for the GPU.

        Everything data-dependent (padding, which positions are targets, their rows, slots and loss
        weights) is worked out on the host and copied from pinned memory without blocking: a pageable
        copy, a boolean-mask gather or a ``.tolist()`` would make the host wait for the previous pass
        before it could launch this one (a GPU that waits for its host was 55% busy on the 8B shape).
        """
        rows, weights, examples = [], [], []
        for s in busy:
            st = state[s]
            for i in st.windows[st.step][st.micro]:
                examples.append(st.job.examples[i])
                rows.append(s)
                weights.append(1.0 / max(1, st.window_tokens[st.step]))
        input_ids, attention, labels = pad_examples(examples, self.pad_id, "cpu")
        N, T = input_ids.shape
        target = labels[:, 1:]                                            # (N, T-1): token t+1 is predicted at t
        n_idx, t_idx = (target != IGNORE).nonzero(as_tuple=True)          # (M,) row-major, like a boolean mask
        position = n_idx * T + t_idx                                      # rows of hidden.reshape(N*T, H)
        rows_of = torch.tensor(rows)
        host = {"input_ids": input_ids, "rows": rows_of, "position": position, "target": target[n_idx, t_idx],
                "weight": torch.tensor(weights, dtype=torch.float32)[n_idx], "slot": rows_of[n_idx]}
        runs = equal_runs(rows) if self.shared_inputs else None  # equal runs: layers index factors per slot
        if runs is not None:
            host["runs"] = torch.tensor(runs[0])
        if not bool(attention.all()):
            host["attention"] = attention      # no padding: None lets SDPA take its causal flash path
        dev = {k: self._to_device(v) for k, v in host.items()}
        self.router.route(dev["rows"], dev.get("runs"), runs[1] if runs else 0)
        if self.shared_inputs:
            self.factors.bind(self.compute_dtype)
        try:
            weighted = self._loss(dev, N, T)
            weighted.sum().backward()
        finally:
            self.factors.unbind()
        self._window_loss.index_add_(0, dev["slot"], weighted.detach().double())

    def _loss(self, dev: dict[str, torch.Tensor], N: int, T: int) -> torch.Tensor:
        """Each target token's cross-entropy times its loss weight, (M,)."""
        hidden = self.body(input_ids=dev["input_ids"], attention_mask=dev.get("attention"),
                           use_cache=False).last_hidden_state                                 # (N, T, H)
        logits = self.head(hidden.reshape(N * T, -1).index_select(0, dev["position"]))        # (M, V)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits.float(), dev["target"], reduction="none") * dev["weight"]

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor to the trainer's device without making the host wait (pinned, non-blocking)."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ per-slot AdamW
    def _optimizer_step(self, state: list[_Slot | None], slots: list[int]) -> torch.Tensor:
        """AdamW with per-slot clipping, LR and step count for ``slots`` only (:func:`adamw_rows_`).
        Returns the slots' index on the device."""
        cfg = self.cfg
        idx = self._to_device(torch.tensor(slots))
        coefficients = self._to_device(adamw_coefficients(
            [cfg.lr * lr_multiplier(state[s].step, len(state[s].windows), cfg) for s in slots],
            [state[s].step + 1 for s in slots], self.betas))
        adamw_rows_(self.factors.data, self.factors.grad, self.exp_avg, self.exp_avg_sq, idx, coefficients,
                    self.betas, self.eps, cfg.weight_decay, cfg.max_grad_norm)
        return idx
