"""Progress of a benchmark phase on stderr, safe to advance from any thread: a redrawn bar on a
terminal; elsewhere (CI, log files) one line when the phase ends, with no carriage returns."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.done = 0
        self._start = time.perf_counter()
        self._drawn = 0.0
        self._lock = threading.Lock()
        if self.live:
            self._draw()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self.live and (time.perf_counter() - self._drawn > 0.25 or self.done >= self.total):
                self._draw()

    def close(self) -> None:
        with self._lock:
            if self.live:
                self._draw()
                self.stream.write("\n")
            else:
                self.stream.write(f"{self._line()}\n")
            self.stream.flush()

    def _line(self) -> str:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        return f"{self.label:<40} [{bar}] {self.done}/{self.total} {time.perf_counter() - self._start:6.1f}s"

    def _draw(self) -> None:
        self._drawn = time.perf_counter()
        self.stream.write(f"\r{self._line()}")
        self.stream.flush()
