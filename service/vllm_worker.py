"""The vLLM worker protocol (`vllm.grpc.engine.VllmEngine`, from the pinned `smg-grpc-proto`)
on tandem's engine, so that SGLang Model Gateway (`smg`) can route OpenAI traffic to tandem.

The router tokenizes, applies the chat template and detokenizes; the worker gets token ids,
matches stop strings itself and reports which one stopped a request. This is an adapter over
the same engine requests as `tandem.v1`: one engine path, two wire protocols.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as pb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as pb_grpc

import tandem
from tandem.engine import (
    Constraint,
    ConstraintKind,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    OutputOptions,
    RequestOutput,
    SamplingParams,
    StoppingCriteria,
)
from tandem.engine.host.kv_events import BlockRemoved, BlockStored
from tandem.engine.request import DEFAULT_MAX_NEW_TOKENS, ModelLimits, TokenLogprob
from tandem.service.errors import invalid_argument
from tandem.service.lifecycle import VLLM_GENERATE, Lifecycle, bad_request_id

SERVICE = pb.DESCRIPTOR.services_by_name["VllmEngine"].full_name
TOKENIZER_CHUNK_BYTES = 512 * 1024
KV_EVENT_POLL_S = 0.05
KV_EVENTS_PER_BATCH = 2000  # ~90 bytes each: far below a 4 MiB message
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
FINISH = {
    FinishReason.EOS: "stop",
    FinishReason.STOP_TOKEN: "stop",
    FinishReason.STOP_STRING: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORTED: "abort",
}
# Engine field paths at this protocol's names, for error messages.
FIELDS = {
    "prompt": "tokenized.input_ids",
    "prompt.token_ids": "tokenized.input_ids",
    "stopping.max_new_tokens": "sampling_params.max_tokens",
    "stopping.min_new_tokens": "sampling_params.min_tokens",
    "stopping.stop_strings": "sampling_params.stop",
    "output.top_logprobs": "sampling_params.logprobs",
}
# Set, these ask for what tandem does not do yet: refused by name, never ignored.
UNSUPPORTED_REQUEST = {
    "mm_inputs": "multimodal input is not supported",
    "media_refs": "multimodal input is not supported",
    "kv_transfer_params": "prefill/decode disaggregation is not supported",
    "kv_transfer_params_json": "prefill/decode disaggregation is not supported",
}


def protocol_field(engine_field: str, request: GenerationRequest) -> str:
    if engine_field.startswith("prompt") and isinstance(request.prompt, str):
        return "text"
    if engine_field in FIELDS:
        return FIELDS[engine_field]
    return "sampling_params." + engine_field.partition(".")[2] if "." in engine_field else engine_field


def _check_supported(msg: pb.GenerateRequest) -> None:
    for name, why in UNSUPPORTED_REQUEST.items():
        if msg.HasField(name):
            raise InvalidRequestError(name, why)
    if msg.extra_mm_inputs:
        raise InvalidRequestError("extra_mm_inputs", "multimodal input is not supported")
    if msg.HasField("data_parallel_rank") and msg.data_parallel_rank != 0:
        raise InvalidRequestError("data_parallel_rank", "this worker has one rank, 0")
    s = msg.sampling_params
    if s.WhichOneof("constraint") == "structural_tag":
        raise InvalidRequestError("sampling_params.structural_tag", "structural tags are not supported")
    if s.HasField("prompt_logprobs"):
        raise InvalidRequestError("sampling_params.prompt_logprobs", "prompt logprobs are not supported")
    if s.HasField("logprobs") and s.logprobs < 0:
        raise InvalidRequestError("sampling_params.logprobs", "logprobs of the whole vocabulary (-1) are not supported")


def _prompt(msg: pb.GenerateRequest, max_model_len: int) -> str | list[int]:
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidRequestError("input", "set either tokenized or text")
    s = msg.sampling_params
    if kind == "text":
        if s.HasField("truncate_prompt_tokens"):
            raise InvalidRequestError("sampling_params.truncate_prompt_tokens", "needs tokenized input")
        return msg.text
    ids = list(msg.tokenized.input_ids)
    if s.HasField("truncate_prompt_tokens"):
        keep = max_model_len if s.truncate_prompt_tokens == -1 else s.truncate_prompt_tokens
        if keep < 1:
            raise InvalidRequestError("sampling_params.truncate_prompt_tokens", f"must be -1 or >= 1, got {keep}")
        ids = ids[-keep:]
    return ids


def default_max_tokens(prompt: str | list[int], limits: ModelLimits) -> int:
    """vLLM's default: up to the context, here also within the KV cache and the operator's cap."""
    if not isinstance(prompt, list):  # a text prompt's length is known only once tokenized
        return DEFAULT_MAX_NEW_TOKENS
    room = min(limits.max_model_len, limits.kv_capacity_tokens) - len(prompt)
    if room < 1:
        raise InvalidRequestError(
            "tokenized.input_ids", f"{len(prompt)} tokens leave no room to generate (context {limits.max_model_len})"
        )
    return min(room, limits.requests.max_new_tokens or room)


def to_request(msg: pb.GenerateRequest, limits: ModelLimits) -> GenerationRequest:
    """A vLLM GenerateRequest as an engine request (validated by the engine on submit).
    Unset fields take vLLM's defaults: temperature 1, no max_tokens meaning up to the context."""
    _check_supported(msg)
    prompt = _prompt(msg, limits.max_model_len)
    s = msg.sampling_params
    sampling = SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p or 1.0,  # proto3 zero: unset
        top_k=max(s.top_k, 0),
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty or 1.0,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        logit_bias={int(k): float(v) for k, v in s.logit_bias.items()},
        seed=s.seed if s.HasField("seed") else None,
    )
    max_new = s.max_tokens if s.HasField("max_tokens") else default_max_tokens(prompt, limits)
    stopping = StoppingCriteria(
        max_new_tokens=max_new,
        min_new_tokens=s.min_tokens,
        stop_token_ids=list(s.stop_token_ids),
        stop_strings=list(s.stop),
        ignore_eos=s.ignore_eos,
        include_stop_string=s.include_stop_str_in_output,
    )
    wants_logprobs = s.HasField("logprobs")
    output = OutputOptions(logprobs=wants_logprobs, top_logprobs=s.logprobs if wants_logprobs else 0)
    n = s.n or 1  # proto3 zero: unset
    return GenerationRequest(prompt, sampling, stopping, output, msg.request_id or None, constraint=_constraint(s), n=n)


def _constraint(s: pb.SamplingParams) -> Constraint | None:
    kind = s.WhichOneof("constraint")
    if kind is None:
        return None
    if kind == "choice":
        return Constraint(ConstraintKind.CHOICE, tuple(s.choice.choices))
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT) if s.json_object else None
    return Constraint(ConstraintKind(kind), getattr(s, kind))


def output_logprobs(items: list[TokenLogprob] | None, top: bool) -> pb.OutputLogProbs | None:
    if not items:
        return None
    return pb.OutputLogProbs(
        token_logprobs=[lp.logprob for lp in items],
        token_ids=[lp.token_id for lp in items],
        top_logprobs=[pb.TopLogProbs(values=[v for _, v in lp.top], token_ids=[t for t, _ in lp.top]) for lp in items]
        if top
        else [],
    )


def complete(out: RequestOutput, tokens: list[int], lps: list[TokenLogprob] | None, top: bool) -> pb.GenerateResponse:
    assert out.finish_reason is not None, "the last output of a request is its finish"
    msg = pb.GenerateComplete(
        output_ids=tokens,
        finish_reason=FINISH[out.finish_reason],
        prompt_tokens=out.num_prompt_tokens,
        completion_tokens=len(tokens),
        cached_tokens=out.num_cached_tokens,
        output_logprobs=output_logprobs(lps, top),
        index=out.index,
    )
    # As vLLM reports it: a stop string or a stop token, not the model's own EOS.
    if out.finish_reason is FinishReason.STOP_STRING and isinstance(out.stop, str):
        msg.matched_stop_str = out.stop
    elif out.finish_reason is FinishReason.STOP_TOKEN and isinstance(out.stop, int):
        msg.matched_token_id = out.stop
    return pb.GenerateResponse(complete=msg)


def _chunk(out: RequestOutput, top: bool) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        chunk=pb.GenerateStreamChunk(
            token_ids=out.token_ids,
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=len(out.token_ids),
            cached_tokens=out.num_cached_tokens,
            output_logprobs=output_logprobs(out.logprobs, top),
            index=out.index,
        )
    )


def tokenizer_bundle(model_dir: Path) -> tuple[bytes, str]:
    """The tokenizer's files as a zip, and its SHA-256 (what GetTokenizer streams)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                zf.write(model_dir / name, name)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def stored(b: BlockStored) -> common_pb2.KvCacheEvent:
    block = common_pb2.KvBlock(block_hash=b.block_hash, token_ids=b.token_ids, block_size=len(b.token_ids))
    return common_pb2.KvCacheEvent(stored=common_pb2.KvBlocksStored(blocks=[block], parent_block_hash=b.parent_hash))


def removed(b: BlockRemoved) -> common_pb2.KvCacheEvent:
    return common_pb2.KvCacheEvent(removed=common_pb2.KvBlocksRemoved(block_hashes=[b.block_hash]))


@dataclass
class KvBatcher:
    """Numbers a stream's batches consecutively from where the subscriber asked, and its events."""

    sequence: int
    event_id: int = 0

    def batches(self, events: list[common_pb2.KvCacheEvent]) -> list[common_pb2.KvEventBatch]:
        """At most KV_EVENTS_PER_BATCH events a batch: a snapshot of a large cache would
        otherwise outgrow the router's message limit."""
        out = []
        for start in range(0, len(events), KV_EVENTS_PER_BATCH):
            chunk = events[start : start + KV_EVENTS_PER_BATCH]
            for e in chunk:
                self.event_id += 1
                e.event_id = self.event_id
            out.append(common_pb2.KvEventBatch(sequence_number=self.sequence, timestamp=time.time(), events=chunk))
            self.sequence += 1
        return out


def snapshot_events(blocks: list[BlockStored]) -> list[common_pb2.KvCacheEvent]:
    return [common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())] + [stored(b) for b in blocks]


class VllmWorkerServicer(pb_grpc.VllmEngineServicer):
    def __init__(self, lifecycle: Lifecycle, serving: Callable[[], bool]) -> None:
        self.lifecycle = lifecycle  # its engine slot, admission bound, abort scope, metrics and logs
        self.slot = lifecycle.slot
        self.serving = serving  # tandem's health: false while loading, draining or failed
        self.started = time.time()

    async def Generate(self, msg: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator:
        engine = await self.slot.get(context)
        try:
            request = to_request(msg, engine.info.limits)
        except InvalidRequestError as exc:
            await context.abort_with_status(invalid_argument(exc.field, exc.message))
        if not request.request_id:
            request.request_id = f"vllm-{time.monotonic_ns()}"
        if problem := bad_request_id(request.request_id):
            await context.abort_with_status(invalid_argument("request_id", problem))
        self.lifecycle.identify(request, context)
        run = self.lifecycle.run(VLLM_GENERATE)
        top = request.output.logprobs and request.output.top_logprobs > 0
        tokens: dict[int, list[int]] = {}  # by sample index
        lps: dict[int, list[TokenLogprob]] = {}
        async with aclosing(run.outputs(request, context, lambda f: protocol_field(f, request))) as outputs:
            async for out in outputs:
                tokens.setdefault(out.index, []).extend(out.token_ids)
                lps.setdefault(out.index, []).extend(out.logprobs or [])
                if msg.stream:
                    yield _chunk(out, top)
                if out.finished:
                    # Streaming, the router accumulates the chunks: the completion repeats only the last delta.
                    last = (out.token_ids, out.logprobs) if msg.stream else (tokens[out.index], lps[out.index])
                    yield complete(out, *last, top)

    async def Embed(self, msg: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "tandem serves generation models; Embed is not supported")
        raise AssertionError("unreachable")

    async def HealthCheck(
        self, msg: pb.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthCheckResponse:
        engine = self.slot.engine
        if engine is not None and engine.dead is not None:
            return pb.HealthCheckResponse(healthy=False, message=f"the engine has failed: {engine.dead}")
        if not self.serving():
            return pb.HealthCheckResponse(healthy=False, message="loading or draining")
        return pb.HealthCheckResponse(healthy=True, message="serving")

    async def Abort(self, msg: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self.lifecycle.abort(msg.request_ids, context)  # scoped like tandem.v1's
        return pb.AbortResponse()

    async def GetModelInfo(
        self, msg: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        engine = await self.slot.get(context)
        info, tok = engine.info, engine.tokenizer
        return pb.GetModelInfoResponse(
            model_path=str(info.model_path),
            is_generation=True,
            max_context_length=info.max_model_len,
            vocab_size=info.vocab_size,
            served_model_name=info.model_name,
            tokenizer_path=str(info.model_path),
            model_type=info.model_type,
            architectures=list(info.architectures),
            eos_token_ids=list(info.eos_token_ids),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
            bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 0,
            max_req_input_len=info.max_model_len,
        )

    async def GetServerInfo(
        self, msg: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        engine = await self.slot.get(context)
        load = engine.load()
        return pb.GetServerInfoResponse(
            active_requests=load.running + load.waiting,
            is_paused=not self.serving(),
            uptime_seconds=time.time() - self.started,
            server_type="vllm-grpc",  # the protocol it speaks; the engine is tandem
            data_parallel_size=1,
            block_size=engine.info.block_size,
            model_dtype=f"torch.{engine.info.dtype}",
            max_num_seqs=engine.info.max_num_seqs,
        )

    async def GetLoads(self, msg: pb.GetLoadsRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        engine = await self.slot.get(context)
        load = engine.load()
        block = engine.info.block_size
        used, total = load.kv_blocks_used * block, load.kv_blocks_total * block
        return pb.GetLoadsResponse(
            timestamp=datetime.now(timezone.utc).isoformat(),
            version=f"tandem {tandem.__version__}",
            dp_rank_count=1,
            loads=[
                pb.SchedulerLoad(
                    dp_rank=0,
                    num_running_reqs=load.running,
                    num_waiting_reqs=load.waiting,
                    num_total_reqs=load.running + load.waiting,
                    num_used_tokens=used,
                    max_total_num_tokens=total,
                    token_usage=used / total if total else 0.0,
                    gen_throughput=load.output_tokens_per_second,
                    max_running_requests=engine.info.max_num_seqs,
                )
            ],
        )

    async def GetTokenizer(
        self, msg: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        info = (await self.slot.get(context)).info
        data, digest = await asyncio.to_thread(tokenizer_bundle, Path(info.model_path))  # file I/O off the loop
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            end = min(start + TOKENIZER_CHUNK_BYTES, len(data))
            yield common_pb2.GetTokenizerChunk(data=data[start:end], sha256=digest if end == len(data) else "")

    async def SubscribeKvEvents(
        self, msg: common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.KvEventBatch]:
        """First what the cache holds now (after a `cleared`), then each change, polled."""
        engine = await self.slot.get(context)
        log = engine.kv_events
        if log is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "prefix caching is off (--no-prefix-caching)")
        assert log is not None
        batcher = KvBatcher(msg.start_sequence_number or 1)
        next_id, blocks = log.snapshot()
        events = snapshot_events(blocks)
        # Ends when the server drains, so that a subscribed router does not hold the drain to --grace.
        while True:
            for batch in batcher.batches(events):
                yield batch
            await asyncio.sleep(KV_EVENT_POLL_S)
            if context.cancelled() or not self.serving():
                return
            got = log.since(next_id)
            if got is None:  # this reader fell behind the log: start over from a snapshot
                next_id, blocks = log.snapshot()
                events = snapshot_events(blocks)
            else:
                next_id, changes = got
                events = [stored(e) if isinstance(e, BlockStored) else removed(e) for e in changes]
