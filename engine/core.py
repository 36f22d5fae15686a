"""The engine core: request state machine, KV bookkeeping and outputs, one step at a time.

Single-threaded by design: `Engine` runs it on its own thread and feeds it commands. The
scheduling decision is delegated to a `SchedulingPolicy`; everything that must stay
consistent (blocks, finishing, streaming) stays here.
"""
from __future__ import annotations

import bisect
import itertools
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np

from engine.block_manager import BlockManager, chain_hash
from engine.detokenizer import IncrementalDetokenizer
from engine.batch import StepBatch, StepRow, placeholder
from engine.executor import Executor, StepHandle, TokenChoice
from engine.scheduling import RequestView, Scheduler, StepContext
from engine.request import (
    FinishReason,
    GenerationRequest,
    ModelLimits,
    RequestOutput,
    TokenLogprob,
    validate_output,
    validate_prompt_ids,
    validate_sampling,
    validate_stopping,
)
from engine.sampling import SampleSpec
from engine.sequence import Sequence, SeqStatus


@dataclass
class CoreStats:
    """Host time around the executor: the scheduling decision and building the rows, then
    turning sampled tokens into outputs (stop checks, detokenization). Neither includes
    waiting for the device."""

    schedule_seconds: float = 0.0
    output_seconds: float = 0.0


@dataclass
class _Launched:
    handle: StepHandle
    seqs: list[Sequence]  # the step's rows, in order
    sampled: list[tuple[Sequence, int]]  # per sampled row: the sequence and its placeholder's index


@dataclass
class SchedulerConfig:
    max_batch_tokens: int = 2048  # tokens computed per step, prefill chunks included
    max_num_seqs: int = 64  # sequences per step


class EngineCore:
    def __init__(
        self,
        executor: Executor,
        blocks: BlockManager,
        tokenizer,
        limits: ModelLimits,
        eos_token_ids: tuple[int, ...],
        scheduler: Scheduler,
        config: SchedulerConfig | None = None,
    ) -> None:
        self.executor = executor
        self.blocks = blocks
        self.tokenizer = tokenizer
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.config = config or SchedulerConfig()
        self.scheduler = scheduler
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self.overlap = bool(getattr(scheduler, "overlap", False))
        self._inflight: _Launched | None = None  # overlap mode: the step launched, not yet completed
        self._draining: list[Sequence] = []  # last token in flight: unschedulable, blocks still held
        self.num_preemptions = 0
        self.num_steps = 0
        self.last_step: list[tuple[str, int]] = []  # (request id, tokens) of the latest step
        self.stats = CoreStats()

    # -- requests --------------------------------------------------------------------------
    def make_sequence(self, request: GenerationRequest) -> Sequence:
        """Validate and tokenize; raises InvalidRequestError. Touches no engine state, so it
        may run on the caller's thread."""
        prompt = request.prompt
        if isinstance(prompt, str):
            if not prompt:
                from engine.errors import InvalidRequestError

                raise InvalidRequestError("prompt", "must not be empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
        validate_prompt_ids(ids, self.limits)
        validate_sampling(request.sampling, self.limits)
        validate_stopping(request.stopping, self.limits, len(ids))
        validate_output(request.output, self.limits)
        request_id = request.request_id or uuid.uuid4().hex
        detok = IncrementalDetokenizer(self.tokenizer, request.stopping.stop_strings)
        return Sequence(request_id, request, np.asarray(ids, dtype=np.int64), 0, detok, time.monotonic())

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._by_id:
            from engine.errors import InvalidRequestError

            raise InvalidRequestError("request_id", f"{seq.request_id!r} is already in flight")
        seq.arrival = next(self._arrivals)
        self._by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request as aborted; None if it is unknown or already finished."""
        seq = self._by_id.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, FinishReason.ABORTED, [])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight is not None)

    @property
    def num_requests(self) -> int:
        return len(self._by_id)

    # -- what the scheduling context calls ------------------------------------------------
    def lookup(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def view(self, seq: Sequence) -> RequestView:
        if seq.view is None:
            seq.view = RequestView(seq, self)
        return seq.view

    def _chain_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The first `num_blocks` prefix-cache hashes of `seq` (tokens only ever grow)."""
        bs, hashes, tokens = self.blocks.block_size, seq.chain_hashes, seq.tokens
        for i in range(len(hashes), num_blocks):
            hashes.append(chain_hash(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes[:num_blocks]

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        # At least one token is always left to compute, so the step yields logits.
        if not self.blocks.enable_prefix_caching:
            return []
        hashes = self._chain_hashes(seq, (seq.num_tokens - 1) // self.blocks.block_size)
        return self.blocks.match_prefix(hashes, seq.tokens)

    def prefix_hit_blocks(self, seq: Sequence) -> tuple[int, int]:
        """(cached blocks a waiting `seq` would reuse, how many of them have no owner now)."""
        hits = self._prefix_hits(seq)
        return len(hits), self.blocks.num_unreferenced(hits)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Free blocks that starting `num_tokens` of `seq` would consume."""
        bs = self.blocks.block_size
        if seq.status is SeqStatus.RUNNING:
            return max(0, -(-(seq.num_computed + num_tokens) // bs) - len(seq.block_table))
        hits, unowned = self.prefix_hit_blocks(seq)
        computed = hits * bs
        num_tokens = min(num_tokens, seq.num_tokens - computed)
        return -(-(computed + num_tokens) // bs) - hits + unowned

    def start(self, seq: Sequence, num_tokens: int) -> int:
        """Admit `seq` if it waits, then reserve blocks for its next `num_tokens` (the caller
        checked they fit). Returns the token count, clamped to what is left to compute."""
        if seq.status is SeqStatus.WAITING:
            self._match_prefix(seq)
            self._admit(seq)
        num_tokens = min(num_tokens, seq.num_uncomputed)
        bs = self.blocks.block_size
        needed = -(-(seq.num_computed + num_tokens) // bs) - len(seq.block_table)
        if needed > 0:
            seq.block_table.extend(self.blocks.allocate(needed))
        return num_tokens

    def _match_prefix(self, seq: Sequence) -> None:
        hits = self._prefix_hits(seq)
        self.blocks.acquire(hits)
        seq.block_table = list(hits)
        seq.num_registered = len(hits)
        seq.num_computed = len(hits) * self.blocks.block_size

    def _admit(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = seq.num_computed
            seq.queue_seconds = time.monotonic() - seq.arrival_time
            self.blocks.record_lookup(seq.num_tokens, seq.num_computed)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def release(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks; its K/V must be recomputed if it runs again."""
        self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.num_registered = 0
        seq.num_computed = 0

    def preempt(self, seq: Sequence) -> None:
        """Back to the waiting queue at its arrival place, keeping its generated tokens."""
        self.running.remove(seq)
        self.release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        keys = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.arrival), seq)

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step that completes.

        Synchronous mode completes the step it launched. Overlap mode (a scheduler with
        `overlap = True`) launches step N+1 before completing step N: N+1 is planned with a
        placeholder for every token N samples, which the device fills in from N's output.
        """
        launched = self._launch() if (self.waiting or self.running) else None
        if self.overlap:
            done, self._inflight = self._inflight, launched
        else:
            done = launched
        return self._complete(done) if done is not None else []

    def _launch(self) -> _Launched | None:
        started = time.perf_counter()
        ctx = StepContext(self, self.scheduler.name or type(self.scheduler).__name__)
        self.scheduler.schedule(ctx)
        chosen = [(view._seq, n) for view, n in ctx.scheduled]
        self.last_step = [(seq.request_id, n) for seq, n in chosen]
        if not chosen:
            return None
        self.num_steps += 1
        rows = [self._row(seq, n) for seq, n in chosen]
        self.stats.schedule_seconds += time.perf_counter() - started
        prev = self._inflight.handle if self._inflight is not None else None
        handle = self.executor.launch(StepBatch(rows), prev)
        sampled: list[tuple[Sequence, int]] = []
        for (seq, n), row in zip(chosen, rows):
            seq.num_computed += n
            if row.sample is None:
                continue
            seq.append(placeholder(len(sampled)))
            sampled.append((seq, seq.num_tokens - 1))
            if seq.num_output >= seq.request.stopping.max_new_tokens:
                # Certainly its last token: nothing more to schedule. It keeps its blocks
                # until the step completes, so its full blocks still reach the prefix cache.
                self.running.remove(seq)
                self._draining.append(seq)
                seq.status = SeqStatus.DRAINING
        return _Launched(handle, [seq for seq, _ in chosen], sampled)

    def _complete(self, launched: _Launched) -> list[RequestOutput]:
        result = self.executor.collect(launched.handle)
        started = time.perf_counter()
        live = [(seq, i, c) for (seq, i), c in zip(launched.sampled, result.choices) if seq.status is not SeqStatus.FINISHED]
        for seq, index, choice in live:
            seq.set_token(index, choice.token_id)
        for seq in launched.seqs:
            if seq.status is not SeqStatus.FINISHED:
                self._register_full_blocks(seq)
        outputs = []
        for seq, index, choice in live:
            if seq.status is not SeqStatus.FINISHED:  # a stop earlier in this loop can't end it, but be exact
                outputs.append(self._on_token(seq, choice, index - seq.num_prompt + 1))
        self.stats.output_seconds += time.perf_counter() - started
        return outputs

    def _row(self, seq: Sequence, n: int) -> StepRow:
        start = seq.num_computed
        row = StepRow(seq.tokens[start : start + n], start, seq.block_table)
        if start + n == seq.num_tokens:
            row.sample = self._sample_spec(seq)
        return row

    def _sample_spec(self, seq: Sequence) -> SampleSpec:
        req = seq.request
        suppressed: tuple[int, ...] = ()
        if seq.num_output < req.stopping.min_new_tokens:
            stops = set(req.stopping.stop_token_ids)
            if not req.stopping.ignore_eos:
                stops |= self.eos_token_ids
            suppressed = tuple(sorted(stops))
        penalties = req.sampling.has_penalties
        return SampleSpec(
            params=req.sampling,
            num_generated=seq.num_output,
            suppressed=suppressed,
            prompt_ids=seq.prompt_ids if penalties else None,
            output_ids=seq.output_ids if penalties else None,
            logprobs=req.output.logprobs,
            top_logprobs=req.output.top_logprobs,
        )

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Make newly completed blocks findable by later requests with the same prefix."""
        if not self.blocks.enable_prefix_caching:
            return
        bs, full = self.blocks.block_size, seq.num_computed // self.blocks.block_size
        if full <= seq.num_registered:
            return
        hashes = self._chain_hashes(seq, full)
        tokens = seq.tokens
        for i in range(seq.num_registered, full):
            self.blocks.register(seq.block_table[i], hashes[i], tokens[i * bs : (i + 1) * bs])
        seq.num_registered = full

    def _on_token(self, seq: Sequence, choice: TokenChoice, count: int) -> RequestOutput:
        """Stop checks, detokenization and the output for `seq`'s `count`-th token."""
        token = choice.token_id
        if seq.logprobs is not None:
            # The batch computes the largest top-N any row asked for; each gets its own N.
            seq.logprobs.append(TokenLogprob(token, choice.logprob, choice.top[: seq.request.output.top_logprobs]))
        stopping = seq.request.stopping
        reason = None
        if token in self.eos_token_ids and not stopping.ignore_eos:
            reason = FinishReason.EOS
        elif token in stopping.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        else:
            seq.detokenizer.push(token)
            if count < stopping.min_new_tokens:
                seq.detokenizer.ignore_stops_so_far()
            elif seq.detokenizer.find_stop():
                reason = FinishReason.STOP_STRING
            elif count >= stopping.max_new_tokens:
                reason = FinishReason.LENGTH
        new_lps = seq.logprobs[-1:] if seq.logprobs is not None else None
        if reason is None:
            return self._output(seq, [token], seq.detokenizer.delta(final=False), new_lps)
        return self._finish(seq, reason, [token], new_lps)

    def _finish(
        self, seq: Sequence, reason: FinishReason, tokens: list[int], lps: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.DRAINING:
            self._draining.remove(seq)
        # NOTE: in overlap mode a step still in flight may write these blocks. Freeing them
        # now is safe: only later steps can reuse them, and the device runs steps in order.
        self.release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        del self._by_id[seq.request_id]
        if reason is not FinishReason.STOP_STRING:
            seq.detokenizer.flush()
        out = self._output(seq, tokens, seq.detokenizer.delta(final=True), lps)
        out.finished = True
        out.finish_reason = reason
        return out

    def _output(self, seq: Sequence, tokens: list[int], text: str, lps) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=tokens,
            text=text,
            logprobs=lps,
            num_prompt_tokens=seq.num_prompt,
            num_cached_tokens=seq.num_cached_tokens or 0,
            queue_seconds=seq.queue_seconds,
        )

    def check_invariants(self) -> None:
        """Block accounting holds (while a step is in flight too)."""
        self.blocks.check_invariants([s.block_table for s in self.running + self._draining])
        for seq in self.waiting:
            assert not seq.block_table, f"waiting {seq.request_id} holds blocks"
