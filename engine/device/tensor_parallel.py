"""Tensor parallelism on torch.distributed: rank 0 decides, the other ranks follow.

Rank 0 holds the engine core, the scheduler and the server. Each step it launches, it sends
the step's host batch (token ids or placeholders, positions, slots, block tables: everything
`device_step` reads) to the followers on a control group; every rank then runs the same
forward, in which transformers' TP plan shards the layers and all-reduces on the default group,
and the LM head gathers the logits on every rank. Only rank 0 samples. Under async overlap a
step's placeholders are the previous step's sampled tokens: rank 0 broadcasts them after
sampling, and the followers keep them for the next step.

NOTE: two groups. The control group carries step messages from the engine thread at launch
and has no timeout: an idle server sends nothing for hours. A gloo send completes only once
the receiver has posted its receive, so each follower takes messages on a thread of their own:
under overlap the message for step N+1 is taken while the follower computes step N. The
default group carries the forward's collectives and the sampled tokens, from the thread that
computes, with the step timeout. A follower whose leader vanished sees its parent change and
exits; a leader whose follower died fails the engine from a watcher thread (at start-up, one
that died before joining fails the rendezvous at once); a step that fails
on rank 0 under overlap kills the followers (`abort`), since rank 0's engine thread may be
waiting for them to take the next step while they wait in the failed step's collective.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
import torch
import torch.distributed as dist

from tandem.engine.config import EngineConfig
from tandem.engine.device import faults
from tandem.engine.device.batch import HostBatch

log = structlog.get_logger("tandem.engine")

CONTROL_TIMEOUT = timedelta(days=3650)  # step messages: a server may sit idle for hours
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # the forward's collectives, when no step timeout is set
POLL_S = 0.2  # how often the leader checks its followers and a follower its leader
STOP_WAIT_S = 10.0  # for the followers to take the stop message, then for them to exit


@dataclass(frozen=True)
class StepMessage:
    host: HostBatch
    samples: int  # tokens rank 0 samples in this step (0: none)


@dataclass(frozen=True)
class Rank:
    """What a rank needs to join the group."""

    rank: int
    world: int
    store: str  # file:// rendezvous shared by the ranks (one machine)
    config: EngineConfig
    share_tokens: bool  # overlap: each step's sampled tokens resolve the next step's placeholders


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """cuda:rank on a GPU machine, else the CPU for every rank."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return torch.device("cuda", rank) if device.type == "cuda" else device


def check_devices(config: EngineConfig) -> None:
    """Refuse more ranks than devices (GPUs, or CPU cores: each rank needs at least one)."""
    n = config.tensor_parallel
    device = rank_device(config, 0)
    have = torch.cuda.device_count() if device.type == "cuda" else len(os.sched_getaffinity(0))
    kind = "CUDA devices" if device.type == "cuda" else "CPU cores"
    if n > have:
        raise ValueError(f"tensor_parallel {n} needs {n} {kind}; this machine has {have}")


def _join(me: Rank, followers: Seq[mp.process.BaseProcess] | None = None) -> Any:
    """Init the default group (the forward's collectives) and return the control group.
    Rank 0 passes its `followers`: one that exits before joining fails the join at once."""
    device = rank_device(me.config, me.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the cores: one OpenMP team each, not N teams on every core
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // me.world))
    timeout = me.config.step_timeout_s or DEFAULT_COLLECTIVE_TIMEOUT_S
    backend = "nccl" if device.type == "cuda" else "gloo"

    def init() -> Any:
        dist.init_process_group(
            backend, init_method=me.store, rank=me.rank, world_size=me.world, timeout=timedelta(seconds=timeout)
        )
        return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    return init() if followers is None else _watched(init, followers)


def _watched(init: Callable[[], Any], followers: Seq[mp.process.BaseProcess]) -> Any:
    """Rank 0's rendezvous on a thread, watching the followers. NOTE: the rendezvous waits for
    every rank until the collective timeout (600 s by default) and cannot be interrupted; a
    follower that died first fails it here instead, and the waiting thread is left behind
    (a daemon: the engine does not start, and its store is removed)."""
    done: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()

    def run() -> None:
        try:
            done.put((init(), None))
        except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread below
            done.put((None, exc))

    threading.Thread(target=run, name="tandem-tp-join", daemon=True).start()
    while True:
        try:
            group, error = done.get(timeout=POLL_S)
        except queue.Empty:
            for rank, p in enumerate(followers, start=1):
                if p.exitcode is not None:
                    raise RuntimeError(
                        f"tensor-parallel rank {rank} exited with code {p.exitcode} before joining"
                    ) from None
            continue
        if error is not None:
            raise error
        return group


def gather(value: int, group: Any) -> list[int]:
    """Every rank's `value`, in rank order (each rank calls this at the same point)."""
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, torch.tensor([value], dtype=torch.int64), group=group)
    return [int(t.item()) for t in out]


class TensorParallel:
    """Rank 0's side: starts the followers, sends them each step, watches them."""

    def __init__(self, config: EngineConfig, share_tokens: bool, build: Callable[[EngineConfig, Any], Any]) -> None:
        """`build(config, control)`: a follower's executor (tandem.engine.build.build_follower),
        passed in so that this module does not import the engine."""
        self.world = config.tensor_parallel
        self.share_tokens = share_tokens
        self._dir = tempfile.mkdtemp(prefix="tandem-tp-")
        store = Path(self._dir, "store").as_uri()
        spawn = mp.get_context("spawn")  # a fork would copy the server's threads and torch state
        self.followers = [
            spawn.Process(
                target=follow,
                args=(Rank(r, self.world, store, config, share_tokens), build),
                name=f"tandem-tp-rank{r}",
                daemon=True,
            )
            for r in range(1, self.world)
        ]
        self._closed = False
        self._ready = False  # set by started(): before it, a follower may be in a start-up collective
        self._aborted: str | None = None
        self._threads = torch.get_num_threads()  # _join shares the cores out; close() gives them back
        # NOTE: followers ignore SIGTERM, so multiprocessing's own exit hook (SIGTERM, then an
        # unbounded join) would wait forever on idle ones when close() was never reached (an
        # engine left unclosed, a wedged engine thread): kill them first (atexit runs LIFO).
        atexit.register(self._kill)
        try:
            for p in self.followers:
                p.start()
            self.control = _join(Rank(0, self.world, store, config, share_tokens), self.followers)
        except BaseException:
            self._stop_processes(wait_s=0.0)
            raise

    # -- each step -------------------------------------------------------------------------
    def send_step(self, host: HostBatch, samples: int) -> None:
        try:
            dist.broadcast_object_list([StepMessage(host, samples)], src=0, group=self.control)
        except RuntimeError as exc:
            if self._aborted is not None:  # the real error, not the killed followers' reset sockets
                raise RuntimeError(self._aborted) from exc
            raise

    def abort(self, reason: str) -> None:
        """A step failed on rank 0 after the followers had it: they wait in its collectives, and
        the engine thread may wait for them to take the next step. Kill them: both fail now."""
        if self._aborted is None:
            self._aborted = f"a step failed on rank 0: {reason}"
            self._kill()

    def send_tokens(self, tokens: torch.Tensor) -> None:
        if self.share_tokens:
            dist.broadcast(tokens, src=0)

    # -- life ------------------------------------------------------------------------------
    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call `on_death` (from a thread) once, when a follower exits before close()."""

        def run() -> None:
            while not self._closed:
                for rank, p in enumerate(self.followers, start=1):
                    if p.exitcode is not None and not self._closed and self._aborted is None:
                        on_death(f"tensor-parallel rank {rank} exited with code {p.exitcode}")
                        return
                time.sleep(POLL_S)

        threading.Thread(target=run, name="tandem-tp-watch", daemon=True).start()

    def started(self) -> None:
        """Every rank has its shard and pool: from now on the followers wait for step messages."""
        self._ready = True

    def close(self) -> None:
        """Tell the followers to stop and wait for them. The stop message is sent from a thread
        given STOP_WAIT_S: a follower that failed start-up, or is stuck in a step's collective
        after rank 0's step failed, never takes it, and the control group has no timeout; such
        a follower is killed."""
        if self._closed:
            return
        self._closed = True
        if self._ready and all(p.is_alive() for p in self.followers):
            sender = threading.Thread(target=self._send_stop, name="tandem-tp-stop", daemon=True)
            sender.start()
            sender.join(STOP_WAIT_S)
        self._stop_processes()
        atexit.unregister(self._kill)
        _finish()
        torch.set_num_threads(self._threads)

    def _send_stop(self) -> None:
        try:
            dist.broadcast_object_list([None], src=0, group=self.control)
        except RuntimeError as exc:  # a follower died meanwhile
            log.warning("tensor_parallel_stop_failed", error=str(exc)[:200])

    def _kill(self) -> None:
        for p in self.followers:
            if p.is_alive():
                p.kill()

    def _stop_processes(self, wait_s: float = STOP_WAIT_S) -> None:
        deadline = time.monotonic() + wait_s
        for p in self.followers:
            if p.pid is None:  # never started
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for path in Path(self._dir).glob("*"):
            path.unlink(missing_ok=True)
        Path(self._dir).rmdir()


# -- the followers ---------------------------------------------------------------------------
def follow(me: Rank, build: Callable[[EngineConfig, Any], Any]) -> None:
    """A follower's process: load this rank's shard and KV pool, then run every step rank 0 sends."""
    # Rank 0 drains and stops the followers: a terminal's Ctrl-C or a pod's SIGTERM to the
    # whole process group must not end a follower mid-collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with_parent()
    if (plan := faults.from_env()) is not None:
        plan.exit_before_join(me.rank)
    control = _join(me)
    executor = build(replace(me.config, device=str(rank_device(me.config, me.rank))), control)
    inbox: queue.SimpleQueue[StepMessage | None] = queue.SimpleQueue()
    threading.Thread(target=_take_messages, args=(control, inbox), name="tandem-tp-inbox", daemon=True).start()
    last: torch.Tensor | None = None  # the previous step's sampled tokens (overlap)
    while (msg := inbox.get()) is not None:
        executor.follow_step(msg.host, last)
        if me.share_tokens:
            last = None
            if msg.samples:
                last = torch.empty(msg.samples, dtype=torch.int64, device=executor.device)
                dist.broadcast(last, src=0)
    executor.close()
    _finish()


def _take_messages(control: Any, inbox: queue.SimpleQueue) -> None:
    """A follower's control-group receiver: rank 0's sends complete as soon as this takes them."""
    while True:
        box: list[StepMessage | None] = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=control)
        except RuntimeError:  # rank 0 is gone: the parent watch ends this process
            return
        inbox.put(box[0])
        if box[0] is None:
            return


def _finish() -> None:
    """Leave the group once this rank's device work is done (NCCL work may still be queued)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_with_parent() -> None:
    parent = os.getppid()

    def run() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(1)  # the leader is gone: no step will ever come

    threading.Thread(target=run, name="tandem-tp-parent", daemon=True).start()
