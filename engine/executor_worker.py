"""CPU executor with a device worker thread: a CPU "stream".

Launched steps queue up and the worker runs them in launch order, so the scheduler thread can
prepare step N+1 while the worker computes step N (torch releases the GIL inside its kernels).
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from engine.executor import Executor, StepHandle, StepResult
from engine.kv_cache import KVCache
from engine.batch import StepBatch


class WorkerExecutor(Executor):
    def __init__(self, model: torch.nn.Module, kv: KVCache, device: torch.device, seed: int = 0) -> None:
        super().__init__(model, kv, device, seed)
        self._jobs: queue.SimpleQueue[StepHandle | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="tandem-device", daemon=True)
        self._worker.start()

    def launch(self, batch: StepBatch, prev: StepHandle | None = None) -> StepHandle:
        handle = self._prepare(batch, prev)
        handle.extra["done"] = threading.Event()
        self._jobs.put(handle)
        return handle

    def collect(self, handle: StepHandle) -> StepResult:
        handle.extra["done"].wait()
        return super().collect(handle)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join()

    def _run(self) -> None:
        while (handle := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                if handle.prev is not None and handle.prev.error is not None:
                    raise RuntimeError("the previous step failed") from handle.prev.error
                self._compute(handle, torch.from_numpy(handle.host.flat))
            except BaseException as exc:  # noqa: BLE001 - handed to collect()
                handle.error = exc
            self._account(handle, start, time.perf_counter())
            handle.extra["done"].set()
