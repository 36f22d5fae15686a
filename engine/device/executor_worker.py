"""CPU executor with a device worker thread: a CPU "stream".

Launched steps queue up and the worker runs them in launch order, so the scheduler thread can
prepare step N+1 while the worker computes step N (torch releases the GIL inside its kernels).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tandem.engine.device.batch import StepBatch
from tandem.engine.device.executor import Executor, StepHandle, StepResult
from tandem.engine.device.kv_cache import KVCache

if TYPE_CHECKING:
    from tandem.engine.device.tensor_parallel import TensorParallel


@dataclass
class WorkerStep(StepHandle):
    done: threading.Event = field(default_factory=threading.Event)  # set once the worker ran it


class WorkerExecutor(Executor):
    def __init__(
        self,
        model: Any,
        kv: KVCache,
        device: torch.device,
        seed: int = 0,
        attention: str = "auto",
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__(model, kv, device, seed, attention, tp)
        self._jobs: queue.SimpleQueue[WorkerStep | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="tandem-device", daemon=True)
        self._worker.start()

    def launch(self, batch: StepBatch, prev: StepHandle | None = None) -> StepHandle:
        handle = self._prepare(batch, prev, WorkerStep)
        self._jobs.put(handle)
        return handle

    def collect(self, handle: StepHandle) -> StepResult:
        assert isinstance(handle, WorkerStep), "a handle of another executor"
        handle.done.wait()
        return super().collect(handle)

    def close(self) -> None:
        self._jobs.put(None)
        self._worker.join()
        super().close()

    def _run(self) -> None:
        while (handle := self._jobs.get()) is not None:
            start = time.perf_counter()
            try:
                if handle.prev is not None and handle.prev.error is not None:
                    raise RuntimeError("the previous step failed") from handle.prev.error
                self._compute(handle, torch.from_numpy(handle.host.flat))
            except BaseException as exc:  # noqa: BLE001 - handed to collect()
                handle.error = exc
                if self.tp is not None:  # the followers wait in this step's collectives
                    self.tp.abort(repr(exc))
            self._account(handle, start, time.perf_counter())
            handle.done.set()
