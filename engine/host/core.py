"""The engine core: one step at a time, from the scheduler's decision to the requests' outputs.

Single-threaded by design: `Engine` runs it on its own thread and feeds it commands. The
scheduling decision is delegated to a scheduler through its port (`SchedulerPort`, which
returns a `StepPlan`); the requests' state lives in `RequestQueues` and their blocks in
`KVAccounting`; launching, collecting, stop checks and outputs stay here.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import structlog

from tandem.engine.config import EngineConfig
from tandem.engine.device.batch import StepBatch, StepRow
from tandem.engine.device.executor import Executor, ExecutorStats, StepHandle, StepTrace, TokenChoice
from tandem.engine.device.placeholders import placeholder
from tandem.engine.device.sampling import GrammarMasks, SampleSpec
from tandem.engine.host import clock
from tandem.engine.host.block_manager import BlockManager
from tandem.engine.host.detokenizer import IncrementalDetokenizer, Tokenizer
from tandem.engine.host.grammar import Grammars, GrammarState, allocate_masks, fill_masks
from tandem.engine.host.kv_accounting import KVAccounting
from tandem.engine.host.kv_events import KvEventLog
from tandem.engine.host.queues import RequestQueues
from tandem.engine.host.scheduling import SchedulerPort
from tandem.engine.host.sequence import SampleFamily, SeqStatus, Sequence, sample_key
from tandem.engine.request import (
    FinishReason,
    GenerationRequest,
    ModelLimits,
    RequestOutput,
    TokenLogprob,
    validate_constraint,
    validate_n,
    validate_output,
    validate_prompt_ids,
    validate_prompt_text,
    validate_sampling,
    validate_stopping,
)

log = structlog.get_logger("tandem.engine")


@dataclass
class CoreStats:
    """Host time around the executor: the scheduling decision and building the rows, then
    turning sampled tokens into outputs (stop checks, detokenization). Neither includes
    waiting for the device."""

    schedule_seconds: float = 0.0
    output_seconds: float = 0.0
    mask_seconds: float = 0.0  # filling grammar masks (structured output), on the engine thread


@dataclass
class _Launched:
    handle: StepHandle
    seqs: list[Sequence]  # the step's rows, in order
    sampled: list[tuple[Sequence, int]]  # per sampled row: the sequence and its placeholder's index
    grammar: tuple[GrammarMasks, list[GrammarState]] | None = None  # masks to fill once tokens are known
    rows: list[tuple[Sequence, int]] = field(default_factory=list)  # what the scheduler chose: (seq, tokens)
    step_index: int = 0
    launched_at: float = 0.0


class EngineCore:
    def __init__(
        self,
        executor: Executor,
        blocks: BlockManager,
        tokenizer: Tokenizer,
        limits: ModelLimits,
        eos_token_ids: tuple[int, ...],
        scheduler: SchedulerPort,
        config: EngineConfig | None = None,
    ) -> None:
        self.executor = executor
        self.kv = KVAccounting(blocks)
        self.queues = RequestQueues()
        self.tokenizer = tokenizer
        # The longest token's spelling (byte-level BPE: its bytes; SentencePiece: its characters):
        # bounds how many characters a prompt of N tokens can have.
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.limits = limits
        self.eos_token_ids = frozenset(eos_token_ids)
        self.config = config or EngineConfig()  # its step limits are read afresh every step
        self.scheduler = scheduler
        self.overlap = scheduler.overlap
        self._inflight: _Launched | None = None  # overlap mode: the step launched, not yet completed
        self.num_steps = 0
        self.last_step: list[tuple[str, int]] = []  # (request id, tokens) of the latest step
        self.stats = CoreStats()
        self._rejected: list[RequestOutput] = []  # requests a policy refused, reported with the next outputs
        self.grammars = Grammars(tokenizer, limits.vocab_size, eos_token_ids)

    # -- requests --------------------------------------------------------------------------
    def make_sequence(self, request: GenerationRequest) -> Sequence:
        """Validate and tokenize; raises InvalidRequestError. Touches no engine state, so it
        may run on the caller's thread."""
        prompt = request.prompt
        if isinstance(prompt, str):
            validate_prompt_text(prompt, self.limits, self.max_token_chars)
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
        validate_prompt_ids(ids, self.limits)
        validate_sampling(request.sampling, self.limits)
        validate_stopping(request.stopping, self.limits, len(ids))
        validate_output(request.output, self.limits)
        validate_constraint(request.constraint, self.limits)
        validate_n(request, self.limits)
        request_id = request.request_id or uuid.uuid4().hex
        prompt_ids = np.asarray(ids, dtype=np.int64)
        arrival_time = clock.now()
        samples = [self._sample(request, request_id, i, prompt_ids, arrival_time) for i in range(request.n)]
        samples[0].family.followers = samples[1:]
        return samples[0]

    def _sample(
        self, request: GenerationRequest, request_id: str, index: int, prompt_ids: np.ndarray, arrival_time: float
    ) -> Sequence:
        """Sample `index` of a request; sample i draws with seed + i (each independent)."""
        if index and request.sampling.seed is not None:
            request = replace(request, sampling=replace(request.sampling, seed=request.sampling.seed + index))
        stopping = request.stopping
        detok = IncrementalDetokenizer(self.tokenizer, stopping.stop_strings, stopping.include_stop_string)
        family = SampleFamily(request_id, index)
        seq = Sequence(sample_key(request_id, index), request, prompt_ids, detok, arrival_time, family)
        if request.constraint is not None:
            seq.output.grammar = self.grammars.state(request.constraint)
        return seq

    def add(self, seq: Sequence) -> None:
        self.queues.add(seq)
        self.scheduler.engine_request_added(self.kv, seq)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Finish every sample of a request still running as aborted (none: unknown or finished)."""
        outputs = []
        for index in range(self.limits.requests.max_n):
            seq = self.queues.lookup(sample_key(request_id, index))
            if seq is None:
                continue
            for follower in seq.family.followers:  # not yet forked: no blocks, no queue
                follower.status = SeqStatus.FINISHED
                outputs.append(self._finished_output(follower, FinishReason.ABORTED, []))
            seq.family.followers = []
            outputs.append(self._finish(seq, FinishReason.ABORTED, []))
        return outputs

    def has_work(self) -> bool:
        return bool(self.queues.waiting or self.queues.running or self._inflight is not None)

    # -- what tests, tools and the engine's stats read ------------------------------------------
    @property
    def blocks(self) -> BlockManager:
        return self.kv.blocks

    @property
    def waiting(self) -> deque[Sequence]:
        return self.queues.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.queues.running

    @property
    def num_requests(self) -> int:
        return len(self.queues)

    @property
    def num_preemptions(self) -> int:
        return self.queues.num_preemptions

    @property
    def num_blocks_used(self) -> int:
        return self.kv.blocks.num_used

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt tokens served from the prefix cache since start."""
        return self.kv.blocks.stats.hit_tokens

    @property
    def kv_events(self) -> KvEventLog | None:
        """The prefix cache's stored and removed blocks, for routers (None: caching is off)."""
        blocks = self.kv.blocks
        return blocks.events if blocks.enable_prefix_caching else None

    @property
    def device_stats(self) -> ExecutorStats:
        """Where step time goes (the executor's counters)."""
        return self.executor.stats

    @property
    def model(self):  # a transformers PreTrainedModel (Any: built at run time)
        """The weights the executor runs (benchmarks measure them)."""
        return self.executor.model

    def clear_prefix_cache(self) -> None:
        self.kv.blocks.clear_cache()

    def trace_steps(self) -> list[StepTrace]:
        """Turn the executor's step trace on: each step's shape is appended to the list returned."""
        self.executor.stats.trace = []
        return self.executor.stats.trace

    def pause_device(self) -> None:
        """The engine ran out of work: the gap until the next step is not device idle time."""
        self.executor.pause()

    def watch_ranks(self, on_death: Callable[[str], None]) -> None:
        """Under tensor parallelism, call `on_death` (from a thread) if a follower rank exits."""
        if self.executor.tp is not None:
            self.executor.tp.watch(on_death)

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step; return the outputs of the step that completes.

        Synchronous mode completes the step it launched. Overlap mode (a scheduler with
        `overlap = True`) launches step N+1 before completing step N: N+1 is planned with a
        placeholder for every token N samples, which the device fills in from N's output.
        """
        launched = self._launch() if (self.queues.waiting or self.queues.running) else None
        if self.overlap:
            done, self._inflight = self._inflight, launched
        else:
            done = launched
        rejected, self._rejected = self._rejected, []
        if done is None:
            return rejected
        try:
            return rejected + self._complete(done)
        except BaseException:
            self.release_masks()  # the in-flight step must not wait for masks that will never come
            raise

    def release_masks(self) -> None:
        """Let a step launched with unfilled grammar masks finish (its outputs are dropped):
        on a failure, and before the executor closes."""
        if self._inflight is not None and self._inflight.grammar is not None:
            masks, _ = self._inflight.grammar
            self._inflight.grammar = None
            masks.done()
            self.executor.masks_filled(self._inflight.handle)

    def close(self) -> None:
        self.release_masks()
        self.executor.close()

    def _launch(self) -> _Launched | None:
        started = time.perf_counter()
        config = self.config
        plan = self.scheduler.engine_plan(
            self.queues, self.kv, config.max_batch_tokens, config.max_num_seqs, self.num_steps
        )
        for seq, kind, reason in plan.rejected:
            for out in self.abort(seq.family.parent_id):
                out.rejected = (plan.label, kind, reason)
                self._rejected.append(out)
        chosen = plan.scheduled
        self.last_step = [(seq.request_id, n) for seq, n in chosen]
        if not chosen:
            return None
        self.num_steps += 1
        rows = [self._row(seq, n) for seq, n in chosen]
        copies: list[tuple[int, int]] = []
        samplers = [  # per sampled row: the sequence, then the samples that fork off it this step
            [seq, *self._fork(seq, row, copies)] for (seq, _), row in zip(chosen, rows) if row.sample is not None
        ]
        grammar = self._grammar_masks([seq for group in samplers for seq in group])
        self.stats.schedule_seconds += time.perf_counter() - started
        prev = self._inflight.handle if self._inflight is not None else None
        handle = self.executor.launch(StepBatch(rows, grammar[0] if grammar else None, copies), prev)
        for seq, n in chosen:
            seq.kv.num_computed += n
        sampled: list[tuple[Sequence, int]] = []
        for seq in (seq for group in samplers for seq in group):
            seq.append(placeholder(len(sampled)))
            sampled.append((seq, seq.num_tokens - 1))
            if seq.num_output >= seq.request.stopping.max_new_tokens:
                # Certainly its last token: nothing more to schedule. It keeps its blocks
                # until the step completes, so its full blocks still reach the prefix cache.
                self.queues.drain(seq)
        seqs = [seq for seq, _ in chosen] + [seq for group in samplers for seq in group[1:]]
        pending = grammar if grammar and not grammar[0].ready.is_set() else None
        return _Launched(handle, seqs, sampled, pending, chosen, self.num_steps, started)

    def _fork(self, seq: Sequence, row: StepRow, copies: list[tuple[int, int]]) -> list[Sequence]:
        """The other samples of `seq`'s request, as this step completes its prompt: they share
        its full prompt blocks (reference counts) and get a copy of the partial last one (copied
        on the device after the forward writes it); their first tokens are drawn from the same
        logits. Without a free block each, they go their own way instead (prefix-cache hits)."""
        if not seq.family.followers:
            return []
        followers, seq.family.followers = seq.family.followers, []
        full, partial = divmod(seq.num_prompt, self.kv.block_size)
        if partial and len(followers) > self.kv.blocks.num_free:
            for follower in followers:
                self.add(follower)
            return []
        shared = seq.kv.block_table[:full]
        for follower in followers:
            self.kv.blocks.acquire(shared)
            follower.kv.block_table = list(shared)
            if partial:
                [block] = self.kv.blocks.allocate(1)
                follower.kv.block_table.append(block)
                copies.append((seq.kv.block_table[full], block))
            follower.kv.num_computed = seq.num_prompt
            follower.kv.num_cached_tokens = seq.kv.num_cached_tokens
            self.queues.add_running(follower, seq.queue.queue_seconds)
            self.scheduler.engine_request_added(self.kv, follower)
            row.forks.append(self._sample_spec(follower))
        return followers

    def _grammar_masks(self, sampled: list[Sequence]) -> tuple[GrammarMasks, list[GrammarState]] | None:
        """Masks for the constrained rows among `sampled`. Filled now when every token they
        depend on is known; under overlap with a step in flight, once it completes."""
        states = [(i, seq.output.grammar) for i, seq in enumerate(sampled) if seq.output.grammar is not None]
        if not states:
            return None
        bits = allocate_masks(len(states), self.limits.vocab_size, pin=self.executor.device.type == "cuda")
        masks = GrammarMasks([i for i, _ in states], bits)
        grammar = (masks, [state for _, state in states])
        if self._inflight is None:
            self._fill(grammar)
        return grammar

    def _fill(self, grammar: tuple[GrammarMasks, list[GrammarState]]) -> None:
        started = time.perf_counter()
        masks, states = grammar
        fill_masks(states, masks.bits)
        masks.done()
        self.stats.mask_seconds += time.perf_counter() - started

    def _complete(self, launched: _Launched) -> list[RequestOutput]:
        result = self.executor.collect(launched.handle)
        started = time.perf_counter()
        live = [
            (seq, i, c) for (seq, i), c in zip(launched.sampled, result.choices) if seq.status is not SeqStatus.FINISHED
        ]
        for seq, index, choice in live:
            seq.set_token(index, choice.token_id)
        refused = {
            seq.request_id
            for seq, _, choice in live
            if seq.output.grammar is not None and not seq.output.grammar.consume(choice.token_id)
        }
        inflight = self._inflight  # overlap: the next step is running; its masks needed these tokens
        if inflight is not None and inflight.grammar is not None:
            grammar, inflight.grammar = inflight.grammar, None
            self._fill(grammar)
            self.executor.masks_filled(inflight.handle)
        for seq in launched.seqs:
            if seq.status is not SeqStatus.FINISHED:
                self.kv.register_full_blocks(seq)
        outputs = []
        for seq, index, choice in live:
            if seq.status is not SeqStatus.FINISHED:  # a stop earlier in this loop can't end it, but be exact
                outputs.append(self._on_token(seq, choice, index - seq.num_prompt + 1, seq.request_id in refused))
        self.stats.output_seconds += time.perf_counter() - started
        seconds = time.perf_counter() - launched.launched_at
        self.scheduler.engine_step_done(self.kv, launched.step_index, launched.rows, seconds)
        return outputs

    def _row(self, seq: Sequence, n: int) -> StepRow:
        start = seq.kv.num_computed
        row = StepRow(seq.tokens[start : start + n], start, seq.kv.block_table)
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

    def _on_token(self, seq: Sequence, choice: TokenChoice, count: int, refused: bool = False) -> RequestOutput:
        """Stop checks, detokenization and the output for `seq`'s `count`-th token. `refused`:
        its grammar refused the token (only where a mask left no token at all)."""
        token, output = choice.token_id, seq.output
        output.last_token_time = clock.now()
        if output.logprobs is not None:
            # The batch computes the largest top-N any row asked for; each gets its own N.
            assert choice.logprob is not None, "a step computes logprobs when any row asks for them"
            output.logprobs.append(TokenLogprob(token, choice.logprob, choice.top[: seq.request.output.top_logprobs]))
        stopping = seq.request.stopping
        reason = None
        grammar_ended = output.grammar is not None and output.grammar.ended
        if refused:
            assert output.grammar is not None
            log.warning("grammar_refused_token", request_id=seq.request_id, token=token, error=output.grammar.error)
            return self._finish(seq, FinishReason.ABORTED, [])
        if token in self.eos_token_ids and (not stopping.ignore_eos or grammar_ended):
            reason = FinishReason.EOS
        elif token in stopping.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
        else:
            output.detokenizer.push(token)
            if count < stopping.min_new_tokens:
                output.detokenizer.ignore_stops_so_far()
            elif output.detokenizer.find_stop():
                reason = FinishReason.STOP_STRING
            elif count >= stopping.max_new_tokens:
                reason = FinishReason.LENGTH
        new_lps = output.logprobs[-1:] if output.logprobs is not None else None
        if reason is None:
            return self._output(seq, [token], output.detokenizer.delta(final=False), new_lps)
        return self._finish(seq, reason, [token], new_lps)

    def _finish(
        self, seq: Sequence, reason: FinishReason, tokens: list[int], lps: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        self.queues.remove(seq)
        # NOTE: in overlap mode a step still in flight may write these blocks. Freeing them
        # now is safe: only later steps can reuse them, and the device runs steps in order.
        self.kv.release(seq)
        out = self._finished_output(seq, reason, tokens, lps)
        self.scheduler.engine_request_finished(self.kv, seq, reason.value)
        return out

    def _finished_output(
        self, seq: Sequence, reason: FinishReason, tokens: list[int], lps: list[TokenLogprob] | None = None
    ) -> RequestOutput:
        detokenizer = seq.output.detokenizer
        seq.output.finish_reason = reason
        if reason is not FinishReason.STOP_STRING:
            detokenizer.flush()
        out = self._output(seq, tokens, detokenizer.delta(final=True), lps)
        out.finished = True
        out.finish_reason = reason
        if reason is FinishReason.STOP_STRING:
            out.stop = detokenizer.stopped_by
        elif reason in (FinishReason.EOS, FinishReason.STOP_TOKEN):
            out.stop = tokens[-1]
        return out

    def _output(self, seq: Sequence, tokens: list[int], text: str, lps) -> RequestOutput:
        return RequestOutput(
            request_id=seq.family.parent_id,
            index=seq.family.index,
            token_ids=tokens,
            text=text,
            logprobs=lps,
            num_prompt_tokens=seq.num_prompt,
            num_cached_tokens=seq.kv.num_cached_tokens or 0,
            queue_seconds=seq.queue.queue_seconds,
        )

    def check_invariants(self) -> None:
        """Block accounting holds (while a step is in flight too)."""
        q = self.queues
        self.kv.check(q.running + q.draining, list(q.waiting))
