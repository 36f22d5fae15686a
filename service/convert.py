"""Between tandem.v1 messages and the engine's request and output types."""
from __future__ import annotations

from engine import FinishReason, GenerationRequest, OutputOptions, RequestOutput, SamplingParams, StoppingCriteria
from engine.errors import InvalidRequestError
from engine.request import DEFAULT_MAX_NEW_TOKENS, TokenLogprob
from tandem.v1 import generation_pb2 as pb

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}


def _opt(msg, name: str, default):
    return getattr(msg, name) if msg.HasField(name) else default


def to_request(msg) -> GenerationRequest:
    """A GenerateRequest or GenerateStreamRequest as an engine request (not yet validated)."""
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequestError("prompt", "set either text or token_ids")
    prompt = msg.text if kind == "text" else list(msg.token_ids.ids)
    d, s = SamplingParams(), msg.sampling
    sampling = SamplingParams(
        temperature=_opt(s, "temperature", d.temperature),
        top_k=_opt(s, "top_k", d.top_k),
        top_p=_opt(s, "top_p", d.top_p),
        min_p=_opt(s, "min_p", d.min_p),
        repetition_penalty=_opt(s, "repetition_penalty", d.repetition_penalty),
        presence_penalty=_opt(s, "presence_penalty", d.presence_penalty),
        frequency_penalty=_opt(s, "frequency_penalty", d.frequency_penalty),
        logit_bias=dict(s.logit_bias),
        seed=_opt(s, "seed", None),
    )
    t = msg.stopping
    stopping = StoppingCriteria(
        max_new_tokens=_opt(t, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        min_new_tokens=_opt(t, "min_new_tokens", 0),
        stop_token_ids=list(t.stop_token_ids),
        stop_strings=list(t.stop_strings),
        ignore_eos=_opt(t, "ignore_eos", False),
    )
    output = OutputOptions(logprobs=msg.output.logprobs, top_logprobs=msg.output.top_logprobs)
    return GenerationRequest(prompt, sampling, stopping, output, msg.request_id or None, msg.priority)


def api_field(engine_field: str, request: GenerationRequest) -> str:
    """The engine's field path at the API's names (the prompt is a oneof there)."""
    if engine_field == "prompt":
        return "text" if isinstance(request.prompt, str) else "token_ids"
    if engine_field == "prompt.token_ids":
        return "token_ids.ids"
    return engine_field


def logprobs(items: list[TokenLogprob] | None) -> list:
    return [
        pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob or 0.0,
                        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        for lp in items or []
    ]


def stream_response(out: RequestOutput, first: bool) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text,
                                    logprobs=logprobs(out.logprobs))
    if first:
        msg.prompt_tokens = out.num_prompt_tokens
        msg.cached_prompt_tokens = out.num_cached_tokens
    if out.finished:
        msg.finish_reason = FINISH_REASONS[out.finish_reason]
    return msg
