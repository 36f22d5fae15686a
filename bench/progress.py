"""A one-line progress bar on stderr, safe to advance from any thread."""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, label: str, total: int, stream=None, width: int = 30) -> None:
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.perf_counter()
        self._drawn = 0.0
        self._lock = threading.Lock()
        self._draw()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if time.perf_counter() - self._drawn > 0.25 or self.done >= self.total:
                self._draw()

    def close(self) -> None:
        with self._lock:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        self._drawn = time.perf_counter()
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = self._drawn - self._start
        self.stream.write(f"\r{self.label:<40} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s")
        self.stream.flush()
