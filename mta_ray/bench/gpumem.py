"""Peak GPU memory of whole phases, as the card sees it (every process, CUDA contexts included).

Why not ``torch.cuda.max_memory_allocated``: the pipeline's GPU work runs in Ray
actors and Ray Data workers, not in the driver, and what must fit a 48 GB card
is everything on it. A thread polls ``nvidia-smi`` and keeps each phase's peak
per GPU. The driver itself never touches CUDA.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from typing import Iterator

MIB = 1024 ** 2
GIB = 1024 ** 3


def query_gpus(field: str) -> list[str]:
    """One ``nvidia-smi --query-gpu`` field per GPU (empty when there is no NVIDIA GPU or no nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        text = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_used_bytes() -> list[int]:
    """Used memory of each GPU in bytes."""
    return [int(float(v)) * MIB for v in query_gpus("memory.used")]


ACTIVITY_FIELDS = ("clocks.sm", "power.draw", "utilization.gpu")
"""What :func:`read_activity` reads: SM clock (MHz), board power (W), busy time (%)."""


def read_activity() -> list[tuple[float, ...]]:
    """Each GPU's SM clock, power and utilisation now (a throttled or starved GPU shows here)."""
    rows = []
    for line in query_gpus(",".join(ACTIVITY_FIELDS)):
        try:
            rows.append(tuple(float(v) for v in line.split(",")))
        except ValueError:  # "[N/A]" on some boards
            return []
    return rows


def gpu_names() -> list[str]:
    """Names of the machine's GPUs, without initialising CUDA in this process."""
    return query_gpus("name")


class GpuMemorySampler:
    """Polls every ``interval`` seconds; :meth:`phase` records the peak of each GPU while it runs and,
    with ``activity`` (a reader like :func:`read_activity`), the mean SM clock, power and utilisation."""

    def __init__(self, interval: float = 0.2, reader=read_used_bytes, activity=None):
        self.interval = interval
        self._read = reader
        self._activity = activity
        self._lock = threading.Lock()
        self._peak: list[int] = []
        self._activity_rows: list[list[tuple[float, ...]]] = []
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self.peaks: dict[str, list[int]] = {}
        """Phase name -> peak used bytes per GPU."""
        self.activity: dict[str, list[dict[str, float]]] = {}
        """Phase name -> per GPU, the mean of each of :data:`ACTIVITY_FIELDS` over the phase's samples."""

    def __enter__(self) -> "GpuMemorySampler":
        self._thread = threading.Thread(target=self._loop, name="gpu-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _sample(self) -> list[int]:
        used = self._read()
        with self._lock:
            if len(self._peak) != len(used):
                self._peak = list(used)
            else:
                self._peak = [max(a, b) for a, b in zip(self._peak, used)]
        return used

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self._paused.is_set():
                continue
            self._sample()
            if self._activity:
                rows = self._activity()
                with self._lock:
                    self._activity_rows.append(rows)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Peak per GPU from entering to leaving (sampled once more at both ends)."""
        with self._lock:
            self._peak, self._activity_rows = [], []
        self._sample()
        try:
            yield
        finally:
            self._sample()
            with self._lock:
                self.peaks[name] = list(self._peak)
                rows = [r for r in self._activity_rows if r]
                if rows and all(len(r) == len(rows[0]) for r in rows):
                    self.activity[name] = [
                        {f: round(sum(r[g][i] for r in rows) / len(rows), 1) for i, f in enumerate(ACTIVITY_FIELDS)}
                        for g in range(len(rows[0]))]

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No polling inside: ``nvidia-smi`` takes the driver's lock, and polling busy GPUs 5-10 times a
        second measurably slowed training on them (bench/results/README.md); timed runs go without it."""
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def wait_idle(self, below_bytes: int = 2 * GIB, timeout: float = 120.0) -> list[int]:
        """Wait until every GPU uses less than ``below_bytes`` (the last phase's actors have exited)."""
        deadline = time.time() + timeout
        used = self._read()
        while used and max(used) >= below_bytes and time.time() < deadline:
            time.sleep(self.interval)
            used = self._read()
        return used
