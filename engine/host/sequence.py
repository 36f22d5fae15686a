"""Engine-side state of one request."""

from __future__ import annotations

import enum
from typing import Any

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


class Sequence:
    """Tokens live in one preallocated int64 array (prompt then output); KV state is the
    block table plus how many leading tokens have their K/V in the cache."""

    def __init__(
        self,
        request_id: str,
        request: GenerationRequest,
        prompt_ids: np.ndarray,
        arrival: int,
        detokenizer: IncrementalDetokenizer,
        arrival_time: float = 0.0,
    ) -> None:
        self.request_id = request_id
        self.request = request
        self.arrival = arrival  # admission order key; preempted sequences keep theirs
        self.arrival_time = arrival_time
        self.num_prompt = len(prompt_ids)
        self._tokens = np.empty(self.num_prompt + request.stopping.max_new_tokens, dtype=np.int64)
        self._tokens[: self.num_prompt] = prompt_ids
        self.num_tokens = self.num_prompt
        self.num_computed = 0
        self.block_table: list[int] = []
        self.chain_hashes: list[int] = []  # prefix-cache hashes of the leading full blocks
        self.num_registered = 0  # leading blocks of block_table findable in the prefix cache
        self.view: Any = None  # its RequestView (engine.host.scheduling), made once per request
        self.num_cached_tokens: int | None = None  # prefix-cache hit at first admission
        self.queue_seconds: float | None = None  # receipt to first admission
        self.status = SeqStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.detokenizer = detokenizer
        self.logprobs: list[TokenLogprob] | None = (
            [] if request.output.logprobs or request.output.top_logprobs else None
        )
        self.num_preemptions = 0
        self.waiting_since = arrival_time  # arrival, or its latest preemption
        self.last_token_time: float | None = None
        self.grammar: GrammarState | None = None  # structured output: consumed every output token so far
        # n samples of one prompt: `request_id` is unique per sample (sample_key), outputs go
        # out under the caller's id with the sample's index.
        self.parent_id = request_id
        self.index = 0
        self.followers: list[Sequence] = []  # the other samples, until they fork off this one's prefill

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
        return self.num_tokens - self.num_computed

    def append(self, token_id: int) -> None:
        self._tokens[self.num_tokens] = token_id
        self.num_tokens += 1

    def set_token(self, index: int, token_id: int) -> None:
        """Fill in a token that was appended as a placeholder."""
        self._tokens[index] = token_id
