"""CUDA executor for overlap: separate streams for input copies, compute and output copies.

Per step: the host fills one of two pinned input buffers (double-buffered, so preparing step
N+1 never overwrites what step N's copy still reads), copies it on the h2d stream, the
compute stream waits for that copy and runs the forward pass and sampling, and the d2h stream
waits for compute and copies the sampled tokens into pinned host memory. The only host wait
is in `collect`, on the d2h event of the step being read, which the engine does after the
next step is already launched. Busy and idle time come from CUDA events on the compute
stream, so they are the device's own timeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tandem.engine.device.batch import StepBatch
from tandem.engine.device.executor import Executor, StepHandle, StepResult
from tandem.engine.device.kv_cache import KVCache
from tandem.engine.device.sampling import SampleOutput

if TYPE_CHECKING:
    from tandem.engine.device.tensor_parallel import TensorParallel


@dataclass
class CudaStep(StepHandle):
    """Events on the device timeline, and the pinned host copy of the sampled tokens."""

    start: torch.cuda.Event | None = None  # compute began (compute stream)
    end: torch.cuda.Event | None = None  # compute ended
    done: torch.cuda.Event | None = None  # outputs copied to the host (d2h stream)
    host_out: SampleOutput | None = None
    prev_end: torch.cuda.Event | None = None  # the previous step's end: the idle gap before this one
    logits: torch.Tensor | None = None  # set while sampling waits for grammar masks (masks_filled)


class CudaExecutor(Executor):
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
        self.h2d = torch.cuda.Stream(device)
        self.compute = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]  # last h2d copy out of each buffer
        self._slot = 0
        self._last_end: torch.cuda.Event | None = None
        # Weights and KV pools were written on the default stream, which the new streams do
        # not wait for.
        torch.cuda.synchronize(device)

    def pause(self) -> None:
        self._last_end = None

    def launch(self, batch: StepBatch, prev: StepHandle | None = None) -> StepHandle:
        # Sampling tensors are copied on h2d too: a pageable copy synchronizes its stream,
        # and the compute stream may still be busy with the previous step.
        with torch.cuda.stream(self.h2d):
            handle = self._prepare(batch, prev, CudaStep)
        if handle.sampling is not None:
            for t in handle.sampling.tensors():
                t.record_stream(self.compute)
        flat, copied = self._copy_inputs(handle.host.flat)
        handle.start = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.compute):
            self.compute.wait_event(copied)
            handle.start.record(self.compute)
            logits = self._forward_step(handle, flat)
        handle.prev_end, self._last_end = self._last_end, None
        grammar = handle.sampling.grammar if handle.sampling is not None else None
        if grammar is not None and not grammar.ready.is_set():
            # NOTE: its masks need the previous step's tokens; the engine fills them (and calls
            # masks_filled) before it launches the next step, so steps still run in order.
            handle.logits = logits
        else:
            self._launch_tail(handle, logits)
        return handle

    def masks_filled(self, handle: StepHandle) -> None:
        assert isinstance(handle, CudaStep)
        if handle.logits is not None:
            logits, handle.logits = handle.logits, None
            self._launch_tail(handle, logits)

    def _launch_tail(self, handle: CudaStep, logits: torch.Tensor) -> None:
        """Sampling on the compute stream, then the copy of its output to the host."""
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.compute):
            if handle.sampling is not None:
                self._sample_step(handle, logits)
            end.record(self.compute)
        host_out = None
        with torch.cuda.stream(self.d2h):
            self.d2h.wait_event(end)
            if handle.output is not None:
                host_out = self._copy_outputs(handle.output)
            done = torch.cuda.Event()
            done.record(self.d2h)
        handle.end, handle.done, handle.host_out = end, done, host_out
        self._last_end = end

    def collect(self, handle: StepHandle) -> StepResult:
        assert isinstance(handle, CudaStep) and handle.done and handle.start and handle.end
        handle.done.synchronize()  # the one host wait per step
        handle.prev = None
        start, end, prev_end = handle.start, handle.end, handle.prev_end
        idle = prev_end.elapsed_time(start) / 1e3 if prev_end is not None else None
        self.stats.record(handle.host, start.elapsed_time(end) / 1e3, idle)
        return self._read(handle.host_out)

    def _copy_inputs(self, flat: np.ndarray) -> tuple[torch.Tensor, torch.cuda.Event]:
        slot, self._slot = self._slot, self._slot ^ 1
        copied_before = self._copied[slot]
        if copied_before is not None:
            copied_before.synchronize()  # the copy that last read this buffer (step N-1) is done
        buf = self._pinned[slot]
        if buf is None or buf.numel() < flat.size:
            buf = self._pinned[slot] = torch.empty(max(flat.size, 4096) * 2, dtype=torch.int64, pin_memory=True)
        np.copyto(buf.numpy()[: flat.size], flat)
        with torch.cuda.stream(self.h2d):
            dev = buf[: flat.size].to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.h2d)
        dev.record_stream(self.compute)  # allocated on h2d, used on compute
        self._copied[slot] = copied
        return dev, copied

    def _copy_outputs(self, out: SampleOutput) -> SampleOutput:
        def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            t.record_stream(self.d2h)  # allocated on compute, read on d2h
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            return host

        tokens = to_host(out.tokens)
        assert tokens is not None
        return SampleOutput(tokens, to_host(out.logprobs), to_host(out.top_ids), to_host(out.top_logprobs))
