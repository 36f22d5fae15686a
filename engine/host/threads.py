"""Run one-off torch work (building a model, measuring) on a thread that exits afterwards.

NOTE: every thread that runs a torch parallel region keeps its own OpenMP team until it exits,
and libgomp, once it manages more threads than there are CPUs, spins only ~100 iterations
before sleeping: every parallel region then pays a futex wake-up. With a model built on the
main thread and stepped on the engine thread, a bench-llama decode step on 2 cores took 64 ms
instead of 51-55. So setup runs here, and the thread that steps the model is the only
long-lived one that has run torch work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_fresh_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread, waited for; its exception is re-raised here."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="tandem-setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
