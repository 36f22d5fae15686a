"""Structured output: constraints compiled by llguidance, one matcher per constrained request.

llguidance was chosen over xgrammar by measurement on this project's CPU machine
(scripts/grammar_choice.py, figures in BENCHMARKS.md): a realistic JSON schema compiles in
~1.5 ms against ~0.4 s (32k vocabulary) and ~2.4 s (150k), and its mask costs ~5x less per
token. Compiling happens where requests are validated (a tokenizer thread for async callers),
never on the engine thread; the engine thread only advances matchers and fills masks.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from llguidance.gbnf_to_lark import gbnf_to_lark

from tandem.engine.errors import InvalidRequestError
from tandem.engine.request import Constraint, ConstraintKind

# JSON with no free whitespace: a model (random weights above all) cannot pad it forever.
_JSON_DEFAULTS: Any = {"whitespace_flexible": False}  # llguidance's JsonCompileOptions
_EXECUTOR = llguidance.LLExecutor()


def grammar_text(c: Constraint) -> str:
    """The constraint as an llguidance grammar; raises InvalidRequestError naming its field."""
    try:
        if c.kind is ConstraintKind.JSON_SCHEMA:
            assert isinstance(c.value, str)
            schema = json.loads(c.value)
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError(c.field, "a JSON schema is an object or a boolean")
            # A boolean schema goes as its JSON text (the binding's types take str or dict).
            spec: str | dict[str, Any] = schema if isinstance(schema, dict) else json.dumps(schema)
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_JSON_DEFAULTS)
        if c.kind is ConstraintKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_DEFAULTS)
        if c.kind is ConstraintKind.REGEX:
            assert isinstance(c.value, str)
            return llguidance.LLMatcher.grammar_from_regex(c.value)
        if c.kind is ConstraintKind.GRAMMAR:
            assert isinstance(c.value, str)
            lark = gbnf_to_lark(c.value) if "::=" in c.value else c.value
            return llguidance.LLMatcher.grammar_from_lark(lark)
        # A choice: a Lark alternation of string literals (JSON escapes are Lark's too).
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(v) for v in c.value))
    except InvalidRequestError:
        raise
    except Exception as exc:  # noqa: BLE001 - a parse error in the user's text (JSON, GBNF, ...)
        raise InvalidRequestError(c.field, f"{type(exc).__name__}: {exc}") from None


class GrammarState:
    """One request's matcher: it has consumed the request's output tokens so far."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher  # an llguidance.LLMatcher

    def consume(self, token: int) -> bool:
        """Advance by one sampled token; False if the grammar refuses it."""
        return bool(self.matcher.consume_token(token))

    @property
    def ended(self) -> bool:
        """The grammar is complete and admits nothing more (its mask is EOS only)."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str:
        return self.matcher.get_error() or "the grammar refused the token"


class Grammars:
    """Compiles constraints against the model's tokenizer, with a bounded LRU cache of
    compiled matchers (a new request gets a copy: microseconds, against ~1 ms to compile).
    Thread-safe: requests are validated on several threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...], cache_size: int = 256) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[Constraint, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: Any = None  # built on first use: ~0.3 s at 32k tokens, ~2 s at 150k
        self.compiled = 0  # cache misses that compiled (tests and stats read it)

    def _lltokenizer(self, field: str) -> Any:
        with self._lock:
            if self._tokenizer is None:
                try:
                    self._tokenizer = llguidance.hf.from_tokenizer(
                        self._hf, n_vocab=self.vocab_size, eos_token=self._eos
                    )
                except Exception as exc:  # noqa: BLE001 - e.g. a slow (Python) tokenizer
                    raise InvalidRequestError(field, f"this model's tokenizer cannot be constrained: {exc}") from None
            return self._tokenizer

    def state(self, c: Constraint) -> GrammarState:
        """A fresh matcher for `c`; raises InvalidRequestError naming the field and llguidance's message."""
        with self._lock:
            template = self._cache.get(c)
            if template is not None:
                self._cache.move_to_end(c)
                return GrammarState(template.deep_copy())
        template = self._compile(c)
        with self._lock:
            self._cache[c] = template
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return GrammarState(template.deep_copy())

    def _compile(self, c: Constraint) -> Any:
        text = grammar_text(c)
        tokenizer = self._lltokenizer(c.field)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if failed:
            raise InvalidRequestError(c.field, "; ".join(messages).strip() or "invalid")
        matcher = llguidance.LLMatcher(tokenizer, text)
        if matcher.is_error():
            raise InvalidRequestError(c.field, matcher.get_error())
        self.compiled += 1
        return matcher


def allocate_masks(rows: int, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """Bitmasks for `rows` rows: int32 words, bit j of word w allows token 32 * w + j.
    `pin` (CUDA): page-locked, so the copy to the device does not block the host."""
    return torch.zeros((rows, (vocab_size + 31) // 32), dtype=torch.int32, pin_memory=pin)


def fill_masks(states: list[GrammarState], masks: torch.Tensor) -> None:
    """Each state's allowed next tokens into its row of `masks` (rows in parallel, in Rust)."""
    llguidance.torch.fill_next_token_bitmask_par(_EXECUTOR, [(s.matcher, i) for i, s in enumerate(states)], masks)
