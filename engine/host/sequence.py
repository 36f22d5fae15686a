"""Engine-side state of one request, split by concern: tokens, KV, queues, output, samples."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from tandem.engine.host.detokenizer import IncrementalDetokenizer
from tandem.engine.host.grammar import GrammarState
from tandem.engine.request import FinishReason, GenerationRequest, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DRAINING = "draining"  # its last token is still being computed; holds no blocks
    FINISHED = "finished"


def sample_key(request_id: str, index: int) -> str:
    """The engine's own id of sample `index` (the caller's id for sample 0). NOTE: \x1f cannot
    occur in an id the service accepts (printable ASCII), so keys never collide with ids."""
    return request_id if index == 0 else f"{request_id}\x1f{index}"


@dataclass(slots=True)
class KVState:
    """Its KV cache blocks (tandem.engine.host.kv_accounting keeps these)."""

    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V is in the cache
    chain_hashes: list[int] = field(default_factory=list)  # prefix-cache hashes of the leading full blocks
    num_registered: int = 0  # leading blocks of block_table findable in the prefix cache
    num_cached_tokens: int | None = None  # prefix-cache hit at first admission


@dataclass(slots=True)
class QueueState:
    """Its place and times in the queues (tandem.engine.host.queues keeps these)."""

    arrival_time: float  # clock.now() when the engine received it
    waiting_since: float  # arrival, or its latest preemption
    arrival_index: int = 0  # order number, given when it joins the queues; preemption keeps it
    queue_seconds: float | None = None  # receipt to first admission
    num_preemptions: int = 0


@dataclass(slots=True)
class OutputState:
    """What turning its sampled tokens into outputs needs and records."""

    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprob] | None  # None unless the request asked for them
    grammar: GrammarState | None = None  # structured output: consumed every output token so far
    finish_reason: FinishReason | None = None
    last_token_time: float | None = None


@dataclass(slots=True)
class SampleFamily:
    """n samples of one prompt: `Sequence.request_id` is unique per sample (sample_key); outputs
    go out under the caller's id with the sample's index."""

    parent_id: str  # the caller's request id
    index: int = 0
    followers: list[Sequence] = field(default_factory=list)  # the other samples, until they fork off this one's prefill


class Sequence:
    """One sample of one request on the engine: its tokens (prompt then output, in one
    preallocated int64 array) and status, and by concern its KV state, its place in the
    queues, its output state and its sample family."""

    __slots__ = (
        "request_id",
        "request",
        "status",
        "num_prompt",
        "num_tokens",
        "_tokens",
        "kv",
        "queue",
        "output",
        "family",
    )

    def __init__(
        self,
        request_id: str,
        request: GenerationRequest,
        prompt_ids: np.ndarray,
        detokenizer: IncrementalDetokenizer,
        arrival_time: float,
        family: SampleFamily | None = None,
    ) -> None:
        self.request_id = request_id
        self.request = request
        self.status = SeqStatus.WAITING
        self.num_prompt = len(prompt_ids)
        self._tokens = np.empty(self.num_prompt + request.stopping.max_new_tokens, dtype=np.int64)
        self._tokens[: self.num_prompt] = prompt_ids
        self.num_tokens = self.num_prompt
        self.kv = KVState()
        self.queue = QueueState(arrival_time, waiting_since=arrival_time)
        wants_logprobs = request.output.logprobs or request.output.top_logprobs
        self.output = OutputState(detokenizer, [] if wants_logprobs else None)
        self.family = family or SampleFamily(request_id)

    @property
    def tokens(self) -> np.ndarray:
        return self._tokens[: self.num_tokens]

    @property
    def prompt_ids(self) -> np.ndarray:
        return self._tokens[: self.num_prompt]

    @property
    def output_ids(self) -> np.ndarray:
        return self._tokens[self.num_prompt : self.num_tokens]

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.kv.num_computed

    def append(self, token_id: int) -> None:
        self._tokens[self.num_tokens] = token_id
        self.num_tokens += 1

    def set_token(self, index: int, token_id: int) -> None:
        """Fill in a token that was appended as a placeholder."""
        self._tokens[index] = token_id
