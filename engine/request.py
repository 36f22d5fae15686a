"""What a caller asks for (GenerationRequest) and what it gets back (RequestOutput, Completion)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np

from tandem.engine.errors import InvalidRequestError

DEFAULT_MAX_NEW_TOKENS = 128


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_TOKEN = "stop_token"
    STOP_STRING = "stop_string"
    ABORTED = "aborted"


@dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k 0, top_p 1 and min_p 0 switch those filters off.

    repetition_penalty is multiplicative over prompt and output tokens (as in transformers);
    presence_penalty and frequency_penalty are additive over output tokens (as in OpenAI's API).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class StoppingCriteria:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_string: bool = False  # keep the matched stop string at the end of the text


@dataclass
class OutputOptions:
    """logprobs: return the log-probability of each chosen token; top_logprobs: also the N most likely."""

    logprobs: bool = False
    top_logprobs: int = 0


class ConstraintKind(str, enum.Enum):
    JSON_SCHEMA = "json_schema"  # value: the schema, as JSON text
    JSON_OBJECT = "json_object"  # any JSON object; no value
    REGEX = "regex"  # the whole output matches it
    GRAMMAR = "grammar"  # a context-free grammar: llguidance's Lark, or GBNF (has `::=`)
    CHOICE = "choice"  # value: the strings, one of which is the whole output


@dataclass(frozen=True)
class Constraint:
    """Structured output: what the generated text must match, token by token."""

    kind: ConstraintKind
    value: str | tuple[str, ...] = ""

    @property
    def field(self) -> str:
        """Where a fault in it is reported."""
        return f"constraint.{self.kind.value}"


@dataclass
class GenerationRequest:
    prompt: str | list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    output: OutputOptions = field(default_factory=OutputOptions)
    request_id: str | None = None
    priority: int = 0
    constraint: Constraint | None = None
    n: int = 1  # samples of this prompt: prefilled once, sample i seeded with seed + i
    tenant: str = ""  # who sent it, for policies that share between tenants ("" if unknown)
    deadline: float | None = None  # time.monotonic() by which the first token is due (policies may use it)


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the loaded model and cache."""

    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int
    max_top_logprobs: int = 20
    requests: RequestLimits = field(default_factory=lambda: RequestLimits())


@dataclass(frozen=True)
class RequestLimits:
    """Operator-set bounds on one request (server flags), on top of what the model allows.
    Defaults are safe for a shared service: a request that needs more is refused, by field."""

    max_prompt_tokens: int | None = None  # None: up to the model's context
    max_new_tokens: int | None = None  # None: up to the model's context
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_logit_bias: int = 300
    max_constraint_chars: int = 65536  # a schema, regex or grammar; the choices together
    max_n: int = 16  # samples per request


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One step's news for one request: the new tokens and the new text delta."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    queue_seconds: float | None = None  # from receipt to first admission, once admitted
    stop: str | int | None = None  # on finish: the stop string or stop/EOS token id that ended it
    index: int = 0  # which of the request's n samples this is (`finished`: this sample finished)
    rejected: tuple[str, str, str] | None = None  # (policy, kind, reason) when a policy refused it


@dataclass
class Completion:
    """A whole finished request, as `Engine.generate` returns it."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprob] | None = None


def _finite(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequestError(name, f"must be a finite number, got {value!r}")


def _int(value: int, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidRequestError(name, f"must be >= {minimum}, got {value}")


def _token_id(value: int, name: str, vocab_size: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise InvalidRequestError(name, f"token id {value!r} is outside the vocabulary [0, {vocab_size})")


def validate_sampling(s: SamplingParams, limits: ModelLimits) -> None:
    _finite(s.temperature, "sampling.temperature")
    if s.temperature < 0:
        raise InvalidRequestError("sampling.temperature", f"must be >= 0, got {s.temperature}")
    _int(s.top_k, "sampling.top_k", 0)
    _finite(s.top_p, "sampling.top_p")
    if not 0 < s.top_p <= 1:
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    _finite(s.min_p, "sampling.min_p")
    if not 0 <= s.min_p <= 1:
        raise InvalidRequestError("sampling.min_p", f"must be in [0, 1], got {s.min_p}")
    _finite(s.repetition_penalty, "sampling.repetition_penalty")
    if s.repetition_penalty <= 0:
        raise InvalidRequestError("sampling.repetition_penalty", f"must be > 0, got {s.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        _finite(value, f"sampling.{name}")
        if not -2 <= value <= 2:
            raise InvalidRequestError(f"sampling.{name}", f"must be in [-2, 2], got {value}")
    if len(s.logit_bias) > limits.requests.max_logit_bias:
        raise InvalidRequestError(
            "sampling.logit_bias", f"{len(s.logit_bias)} entries, over the limit of {limits.requests.max_logit_bias}"
        )
    for token, bias in s.logit_bias.items():
        _token_id(token, "sampling.logit_bias", limits.vocab_size)
        _finite(bias, f"sampling.logit_bias[{token}]")
        if not -100 <= bias <= 100:
            raise InvalidRequestError(f"sampling.logit_bias[{token}]", f"must be in [-100, 100], got {bias}")
    if s.seed is not None:
        _int(s.seed, "sampling.seed", 0)
        if s.seed >= 2**64:
            raise InvalidRequestError("sampling.seed", "must be < 2**64")


def validate_stopping(s: StoppingCriteria, limits: ModelLimits, prompt_len: int) -> None:
    _int(s.max_new_tokens, "stopping.max_new_tokens", 1)
    _int(s.min_new_tokens, "stopping.min_new_tokens", 0)
    if s.min_new_tokens > s.max_new_tokens:
        raise InvalidRequestError(
            "stopping.min_new_tokens", f"{s.min_new_tokens} exceeds max_new_tokens {s.max_new_tokens}"
        )
    req = limits.requests
    if req.max_new_tokens is not None and s.max_new_tokens > req.max_new_tokens:
        raise InvalidRequestError(
            "stopping.max_new_tokens", f"{s.max_new_tokens} is over this server's limit of {req.max_new_tokens}"
        )
    if len(s.stop_token_ids) > req.max_stop_token_ids:
        raise InvalidRequestError(
            "stopping.stop_token_ids", f"{len(s.stop_token_ids)} entries, over the limit of {req.max_stop_token_ids}"
        )
    for token in s.stop_token_ids:
        _token_id(token, "stopping.stop_token_ids", limits.vocab_size)
    if len(s.stop_strings) > req.max_stop_strings:
        raise InvalidRequestError(
            "stopping.stop_strings", f"{len(s.stop_strings)} entries, over the limit of {req.max_stop_strings}"
        )
    for text in s.stop_strings:
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("stopping.stop_strings", f"stop strings must be non-empty text, got {text!r}")
        if len(text) > req.max_stop_string_chars:
            raise InvalidRequestError(
                "stopping.stop_strings",
                f"a stop string of {len(text)} characters, over the limit of {req.max_stop_string_chars}",
            )
    total = prompt_len + s.max_new_tokens
    if total > limits.max_model_len:
        raise InvalidRequestError(
            "stopping.max_new_tokens",
            f"prompt ({prompt_len} tokens) plus max_new_tokens ({s.max_new_tokens}) is {total}, "
            f"over the model's context length {limits.max_model_len}",
        )
    if total > limits.kv_capacity_tokens:
        raise InvalidRequestError(
            "stopping.max_new_tokens",
            f"prompt ({prompt_len} tokens) plus max_new_tokens ({s.max_new_tokens}) is {total}, "
            f"over the KV cache capacity of {limits.kv_capacity_tokens} tokens",
        )


def validate_prompt_ids(ids: list[int], limits: ModelLimits) -> None:
    if len(ids) == 0:
        raise InvalidRequestError("prompt", "must not be empty")
    cap = limits.requests.max_prompt_tokens
    if cap is not None and len(ids) > cap:
        raise InvalidRequestError("prompt", f"{len(ids)} tokens, over this server's limit of {cap}")
    try:
        arr = np.asarray(ids)
        out_of_range = arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() >= limits.vocab_size
    except (OverflowError, TypeError, ValueError):
        out_of_range = True
    if out_of_range:
        bad = next((t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < limits.vocab_size), ids[0])
        raise InvalidRequestError(
            "prompt.token_ids", f"token id {bad!r} is outside the vocabulary [0, {limits.vocab_size})"
        )
    if len(ids) >= limits.max_model_len:
        raise InvalidRequestError(
            "prompt", f"{len(ids)} tokens leave no room to generate within the context length {limits.max_model_len}"
        )
    if len(ids) >= limits.kv_capacity_tokens:
        raise InvalidRequestError(
            "prompt", f"{len(ids)} tokens do not fit the KV cache capacity of {limits.kv_capacity_tokens} tokens"
        )


# A normalizer may fold a few characters into one (combining marks): slack on the lower bound.
TEXT_BOUND_SLACK = 4


def max_prompt_tokens(limits: ModelLimits) -> int:
    """The longest prompt the server takes, in tokens (one position is left to generate)."""
    cap = min(limits.max_model_len, limits.kv_capacity_tokens) - 1
    return min(cap, limits.requests.max_prompt_tokens or cap)


def validate_prompt_text(text: str, limits: ModelLimits, max_token_chars: int) -> None:
    """Refuse, before tokenizing, a text that cannot fit: no token spells more than
    `max_token_chars` characters, so a text has at least len(text) / max_token_chars tokens.
    Tokenizing megabytes costs seconds; this costs nothing."""
    if not text:
        raise InvalidRequestError("prompt", "must not be empty")
    tokens = max_prompt_tokens(limits)
    bound = tokens * max_token_chars * TEXT_BOUND_SLACK
    if len(text) > bound:
        raise InvalidRequestError(
            "prompt",
            f"{len(text)} characters cannot fit the {tokens}-token prompt limit "
            f"(at most {bound} characters are read: {max_token_chars} per token, {TEXT_BOUND_SLACK}x slack)",
        )


def validate_output(o: OutputOptions, limits: ModelLimits) -> None:
    _int(o.top_logprobs, "output.top_logprobs", 0)
    if o.top_logprobs > limits.max_top_logprobs:
        raise InvalidRequestError("output.top_logprobs", f"must be <= {limits.max_top_logprobs}, got {o.top_logprobs}")


def validate_constraint(c: Constraint | None, limits: ModelLimits) -> None:
    """The shape of a constraint; whether it compiles is the grammar engine's to say."""
    if c is None:
        return
    if not isinstance(c.kind, ConstraintKind):
        raise InvalidRequestError("constraint", f"unknown kind {c.kind!r}")
    if c.kind is ConstraintKind.CHOICE:
        if not isinstance(c.value, tuple) or not c.value or not all(isinstance(v, str) and v for v in c.value):
            raise InvalidRequestError(c.field, "give at least one choice, each a non-empty string")
        size = sum(len(v) for v in c.value)
    elif c.kind is ConstraintKind.JSON_OBJECT:
        size = 0
    else:
        if not isinstance(c.value, str) or not c.value.strip():
            raise InvalidRequestError(c.field, "must not be empty")
        size = len(c.value)
    if size > limits.requests.max_constraint_chars:
        raise InvalidRequestError(
            c.field, f"{size} characters, over this server's limit of {limits.requests.max_constraint_chars}"
        )


def validate_n(request: GenerationRequest, limits: ModelLimits) -> None:
    _int(request.n, "n", 1)
    if request.n > limits.requests.max_n:
        raise InvalidRequestError("n", f"{request.n} samples, over this server's limit of {limits.requests.max_n}")
    seed = request.sampling.seed
    if seed is not None and seed + request.n - 1 >= 2**64:
        raise InvalidRequestError(
            "sampling.seed", f"sample i is seeded with seed + i: must be < 2**64 - {request.n - 1}"
        )
