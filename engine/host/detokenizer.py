"""Incremental detokenization with stop strings.

Text is decoded over a sliding window of token ids (the prefix/read offsets used by TGI and
vLLM), so each step costs a few tokens of decoding, not the whole output. A window whose text
ends in U+FFFD is an incomplete UTF-8 sequence: it is held back until more tokens complete it
or the request finishes. Stop strings are searched in the decoded text, across token
boundaries; the last len(longest stop) - 1 characters are held back from streaming so a stop
string is never partly emitted before it is recognised.

The window stays a few tokens long whatever a client forces: special tokens (decoded with
skip_special_tokens, they add no text) never enter it, and bytes that never form a character
are settled once more than `MAX_PENDING` tokens wait, so no token re-decodes a long window.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

MAX_PENDING = 8  # tokens without a complete character before the window is settled


class Tokenizer(Protocol):
    """What the engine uses of a transformers tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, token_ids: Any, skip_special_tokens: bool = ...) -> str: ...

    def get_vocab(self) -> dict[str, int]: ...

    def __hash__(self) -> int: ...  # one cache entry per tokenizer (skipped_ids)


def decoder_of(tokenizer: Tokenizer) -> Callable[..., str]:
    """`tokenizer.decode`, or, for a fast tokenizer that would return the backend's text as is
    (transformers' own decode, not a model's override, and no clean-up of tokenization
    spaces), the backend's decode: the same text without transformers' wrapper, 0.9 instead
    of 3.0 us a call, and each token of each row calls it twice."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    kind = type(tokenizer)
    plain = (
        isinstance(tokenizer, TokenizersBackend)
        and kind.decode is PreTrainedTokenizerBase.decode
        and kind._decode is TokenizersBackend._decode
    )
    if not plain or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.decode
    return tokenizer._tokenizer.decode  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=8)  # one per served tokenizer; a request's detokenizer reads it
def skipped_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Special ids that decode to nothing (skip_special_tokens): they can stay out of a window."""
    decode = decoder_of(tokenizer)
    special = getattr(tokenizer, "all_special_ids", ())
    return frozenset(i for i in special if decode([i], skip_special_tokens=True) == "")


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop_strings: list[str] | None = None, include_stop: bool = False) -> None:
        self.include_stop = include_stop  # keep the matched stop string at the end of the text
        self._decode = decoder_of(tokenizer)
        self.stop_strings = list(stop_strings or [])
        self._holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self._special = skipped_ids(tokenizer)
        self.ids: list[int] = []  # the window's ids: every token but the special ones
        self._prefix = 0  # the window starts here: context for the tokens after _read
        self._read = 0  # text is taken up to here
        self.text = ""  # decoded so far (complete characters only)
        self.emitted = 0  # characters of `text` already streamed
        self._stop_floor = 0  # a stop string must end after this many characters
        self.stopped_by: str | None = None

    def _window(self, end: int | None = None) -> str:
        return self._decode(self.ids[self._prefix : end], skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        """Add one token and extend `text` with whatever it completes."""
        if token_id in self._special:
            return
        self.ids.append(token_id)
        prefix_text = self._window(self._read)
        new_text = self._window()
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._take(new_text[len(prefix_text) :], len(self.ids))
        elif len(self.ids) - self._read > MAX_PENDING:
            self._settle(prefix_text, new_text)

    def _take(self, text: str, read: int) -> None:
        self.text += text
        self._prefix, self._read = self._read, read
        del self.ids[: self._prefix]  # the window's ids only: bounded memory too
        self._prefix, self._read = 0, self._read - self._prefix

    def _settle(self, prefix_text: str, new_text: str) -> None:
        """Many tokens and still no complete character: bytes that will never form one. Take
        the text up to the latest token boundary whose text later tokens cannot change: an
        incomplete character at the end has at most 3 bytes, so it starts within the last 3
        tokens, and the text up to the cut must be what the whole window shows there (a
        character split across the cut spans at most 4 tokens: 4 cuts are tried, no more)."""
        for cut in range(len(self.ids) - 3, max(self._read, len(self.ids) - 7), -1):
            part = self._window(cut)
            if len(part) > len(prefix_text) and new_text.startswith(part):
                self._take(part[len(prefix_text) :], cut)
                return

    def flush(self) -> None:
        """At the end: take held-back bytes too, as the full decode would show them."""
        prefix_text = self._window(self._read)
        new_text = self._window()
        self.text += new_text[len(prefix_text) :]
        self.ids.clear()
        self._prefix = self._read = 0

    def ignore_stops_so_far(self) -> None:
        """Stop strings ending in the text so far do not count (min_new_tokens not reached)."""
        self._stop_floor = len(self.text)

    def find_stop(self) -> bool:
        """Look for a stop string in the not-yet-streamed text; on a hit, cut the text there."""
        if not self.stop_strings or self.stopped_by is not None:
            return False
        best = None
        for stop in self.stop_strings:
            begin = max(0, self.emitted - self._holdback, self._stop_floor - len(stop) + 1)
            at = self.text.find(stop, begin)
            if at != -1 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return False
        self.text = self.text[: best[0] + (len(best[1]) if self.include_stop else 0)]
        self.stopped_by = best[1]
        return True

    def delta(self, final: bool) -> str:
        """Text to stream now; all of the rest when `final`."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self._holdback)
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
