"""One progress log line for every long stage: done/total, rate, ETA, as plain lines that read well in
``ray job logs`` (no carriage returns, no bars), at most one line every ``every_s`` seconds.

    progress = Progress("bank", "anchors", total=50)
    progress.add(1)   # -> "bank: 12/50 anchors (24%), 0.41 anchors/s, ETA 1m33s"
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def duration(seconds: float) -> str:
    """``95`` -> ``1m35s``; ``4000`` -> ``1h06m``."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts work done toward ``total`` (0: unknown) and logs ``stage: done/total unit, rate, ETA``.

    ``every_s``: least seconds between two lines (the first and the last always print); ``clock`` and
    ``out``: for tests.
    """

    def __init__(self, stage: str, unit: str, total: int = 0, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, out: TextIO | None = None):
        self.stage, self.unit, self.total, self.every_s = stage, unit, total, every_s
        self.clock, self.out = clock, out
        self.t0 = clock()
        self.done = 0
        self._last: float | None = None

    @property
    def rate(self) -> float:
        return self.done / max(1e-9, self.clock() - self.t0)

    def line(self, note: str = "") -> str:
        rate = self.rate
        head = f"{self.stage}: {self.done}/{self.total} {self.unit}" if self.total else \
               f"{self.stage}: {self.done} {self.unit}"
        if self.total:
            head += f" ({100 * self.done / self.total:.0f}%)"
        head += f", {rate:.3g} {self.unit}/s, {duration(self.clock() - self.t0)} elapsed"
        if self.total and self.done < self.total:
            head += f", ETA {duration((self.total - self.done) / rate) if rate > 0 else '?'}"
        return head + (f", {note}" if note else "")

    def add(self, n: int = 1, note: str = "", force: bool = False) -> None:
        """Book ``n`` more done and log a line if one is due (always when the total is reached)."""
        self.done += n
        now = self.clock()
        finished = bool(self.total) and self.done >= self.total
        if force or finished or self._last is None or now - self._last >= self.every_s:
            self._last = now
            print(self.line(note), file=self.out or sys.stdout, flush=True)
