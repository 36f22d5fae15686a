"""The consumer side of `Engine`'s sinks: merging a stream's undelivered outputs, and collecting a
request's outputs into a Completion."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from tandem.engine.request import Completion, RequestOutput


class Coalescer:
    """One request's undelivered outputs, merged per sample; lives on the consumer's event loop."""

    def __init__(self) -> None:
        self._out: dict[int, RequestOutput] = {}  # by sample index, in arrival order
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput | BaseException) -> None:
        if isinstance(out, BaseException):
            self._error = self._error or out
        elif (prev := self._out.get(out.index)) is None:
            self._out[out.index] = out
        else:
            prev.token_ids = prev.token_ids + out.token_ids
            prev.text += out.text
            if out.logprobs is not None:
                prev.logprobs = (prev.logprobs or []) + out.logprobs
            prev.finished, prev.finish_reason, prev.stop = out.finished, out.finish_reason, out.stop
        self._ready.set()

    async def take(self) -> list[RequestOutput | BaseException]:
        """What arrived since the last take: the samples' merged outputs, then an error if any."""
        await self._ready.wait()
        self._ready.clear()
        outs: list[RequestOutput | BaseException] = list(self._out.values())
        self._out = {}
        if self._error is not None:
            outs.append(self._error)
        assert outs, "the event is set only with an output waiting"
        return outs


class Collector:
    """Gathers one request's outputs into a Completion for `Engine.generate`."""

    def __init__(self, on_finish: Callable[[], None] | None = None) -> None:
        self._done = threading.Event()
        self._parts: list[RequestOutput] = []
        self._error: BaseException | None = None
        self._on_finish = on_finish

    def __call__(self, out: RequestOutput | BaseException) -> None:
        if isinstance(out, BaseException):
            self._error = out
            self._done.set()
            return
        self._parts.append(out)
        if out.finished:
            self._done.set()
            if self._on_finish is not None:
                self._on_finish()

    def result(self) -> Completion:
        self._done.wait()
        if self._error is not None:
            raise self._error
        last = self._parts[-1]
        assert last.finish_reason is not None, "the last output of a request is its finish"
        lps = [lp for p in self._parts for lp in (p.logprobs or [])] if last.logprobs is not None else None
        return Completion(
            request_id=last.request_id,
            text="".join(p.text for p in self._parts),
            token_ids=[t for p in self._parts for t in p.token_ids],
            finish_reason=last.finish_reason,
            num_prompt_tokens=last.num_prompt_tokens,
            num_cached_tokens=last.num_cached_tokens,
            logprobs=lps,
        )
