"""Continuous batching of per-user training jobs inside one model worker.

The driver sends a worker its users in calls, several queued at a time. Run one
trainer per call and every call ends with its slots draining one by one while
the GPU waits for the next call to tokenise and merge; and a slower worker can
only be evened out call by call. Here a call only queues its jobs and waits for
its own results: one thread owns the GPU and keeps the multi-slot trainer's
slots filled from the shared queue, across calls, so a worker drains only when
it has nothing left to do, and calls can be small enough to balance workers.

No Ray here: the worker (``workers.ModelWorker``, a threaded Ray actor) owns one.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from mta_ray.engine.trainer import Job, JobResult, MultiSlotTrainer


@dataclass
class _Ticket:
    """One call's share of the queue: how many results it still waits for, and what came back."""

    remaining: int
    results: list[JobResult] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class _Entry:
    key: Hashable
    job: Job
    ticket: _Ticket
    build: Callable[[], MultiSlotTrainer]


class ContinuousTrainer:
    """Queues the jobs of concurrent calls and trains them on one thread, ``key`` by ``key``.

    Jobs with equal ``key`` share a trainer (built by the first one's ``build``, under
    ``gpu_lock``); a different key waits until the running trainer has drained. ``run_spans`` holds
    each trainer's [start, end] wall time, booked when it starts (end None while it runs, so a call
    that got its results back already sees its run), ``runs`` and ``busy_seconds`` follow from them;
    ``iterations`` and ``slot_iterations`` are the finished runs' iterations and busy slots.
    """

    def __init__(self, gpu_lock: threading.Lock | None = None):
        self.gpu_lock = gpu_lock or threading.Lock()
        self._cond = threading.Condition()
        self._queue: deque[_Entry] = deque()
        self._thread: threading.Thread | None = None
        self.run_spans: list[list[float | None]] = []
        self.iterations = 0
        self.slot_iterations = 0

    def train(self, key: Hashable, jobs: list[Job], build: Callable[[], MultiSlotTrainer]) -> list[JobResult]:
        """Queue ``jobs`` and wait for their results (completion order). A trainer error raises here
        in every call with jobs in that run or queued for its key."""
        if not jobs:
            return []
        ticket = _Ticket(len(jobs))
        with self._cond:
            self._queue.extend(_Entry(key, job, ticket, build) for job in jobs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="continuous-trainer", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            while ticket.remaining and ticket.error is None:
                self._cond.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.results

    def take_stats(self) -> dict[str, Any]:
        """The counters since the last call (then zeroed): runs, busy seconds, iterations, busy slots,
        and each run's (start, end) wall time. A run still going is cut at this call: its time so far
        is counted here, the rest (and its iterations) next time."""
        with self._cond:
            now = time.time()
            spans = [(start, now if end is None else end) for start, end in self.run_spans]
            stats = {"runs": len(spans), "busy_s": sum(end - start for start, end in spans),
                     "iterations": self.iterations, "slot_iterations": self.slot_iterations, "run_spans": spans}
            self.run_spans = [span for span in self.run_spans if span[1] is None]
            for span in self.run_spans:  # the same lists: the run closes them when it ends
                span[0] = now
            self.iterations, self.slot_iterations = 0, 0
        return stats

    @property
    def runs(self) -> int:
        return len(self.run_spans)

    @property
    def busy_seconds(self) -> float:
        now = time.time()
        return sum((now if end is None else end) - start for start, end in self.run_spans)

    # ------------------------------------------------------------------ the training thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                head = self._queue[0]
            self._run(head.key, head.build)

    def _take(self, key: Hashable) -> _Entry | None:
        with self._cond:
            for i, entry in enumerate(self._queue):
                if entry.key == key:
                    del self._queue[i]
                    return entry
        return None

    def _run(self, key: Hashable, build: Callable[[], MultiSlotTrainer]) -> None:
        """One trainer, fed with ``key``'s jobs as slots free up, until none is queued and all slots are empty."""
        feed = _Feed(self, key)

        def deliver(result: JobResult) -> None:
            with self._cond:
                ticket = feed.delivered(result.user_id)
                ticket.results.append(result)
                ticket.remaining -= 1
                if not ticket.remaining:
                    feed.tickets.pop(id(ticket), None)
                    self._cond.notify_all()

        span: list[float | None] = [time.time(), None]
        with self._cond:
            self.run_spans.append(span)
        trainer = None
        try:
            with self.gpu_lock:
                trainer = build()
                try:
                    trainer.run(feed, on_result=deliver)
                finally:
                    trainer.close()
        except BaseException as exc:  # noqa: BLE001 - handed to the calls that wait on this run
            with self._cond:  # every call of this run fails, its queued jobs too (a retry starts afresh)
                failed = {**feed.tickets, **{id(e.ticket): e.ticket for e in self._queue if e.key == key}}
                for t in failed.values():
                    t.error = exc
                self._queue = deque(e for e in self._queue if id(e.ticket) not in failed)
                self._cond.notify_all()
        finally:
            with self._cond:
                span[1] = time.time()
                if trainer is not None:
                    self.iterations += trainer.iterations
                    self.slot_iterations += trainer.slot_iterations


class _Feed:
    """The jobs of one key as the trainer asks for them. The trainer iterates it afresh at every free
    slot: it stops when nothing is queued now and yields again once a later call has queued more."""

    def __init__(self, owner: ContinuousTrainer, key: Hashable):
        self.owner, self.key = owner, key
        self.waiting: dict[str, deque[_Ticket]] = defaultdict(deque)
        """User id -> the tickets of its jobs taken so far, in order (results are routed by user id)."""
        self.tickets: dict[int, _Ticket] = {}
        """The tickets with jobs taken and results still due (a failed run fails these calls)."""

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self) -> Job:
        entry = self.owner._take(self.key)
        if entry is None:
            raise StopIteration
        self.waiting[entry.job.user_id].append(entry.ticket)
        self.tickets[id(entry.ticket)] = entry.ticket
        return entry.job

    def delivered(self, user_id: str) -> _Ticket:
        """The ticket a finished job of ``user_id`` belongs to (the first taken of that user)."""
        queue = self.waiting[user_id]
        ticket = queue.popleft()
        if not queue:
            del self.waiting[user_id]
        return ticket
