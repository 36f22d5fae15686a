"""Between tandem.v1 messages and the engine's request and output types."""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message

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
from tandem.engine.request import DEFAULT_MAX_NEW_TOKENS, TokenLogprob
from tandem.v1 import generation_pb2 as pb

T = TypeVar("T")

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.STOP_STRING: pb.FINISH_REASON_STOP_STRING,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
}


GenerateMessage = pb.GenerateRequest | pb.GenerateStreamRequest  # the same fields, one converter


def _opt(msg: Message, name: str, default: T) -> T:
    return getattr(msg, name) if msg.HasField(name) else default


def chat_messages(msg: GenerateMessage) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in msg.messages.messages]


def to_request(msg: GenerateMessage, rendered: list[int] | None = None) -> GenerationRequest:
    """A GenerateRequest or GenerateStreamRequest as an engine request (not yet validated).
    A `messages` prompt must come `rendered` (the engine's chat template, as token ids)."""
    kind = msg.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequestError("prompt", "set text, token_ids or messages")
    if kind == "messages":
        if rendered is None:
            raise InvalidRequestError("messages", "not rendered with the chat template")
        prompt: str | list[int] = rendered
    else:
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
        include_stop_string=t.include_stop_string,
    )
    output = OutputOptions(logprobs=msg.output.logprobs, top_logprobs=msg.output.top_logprobs)
    constraint = to_constraint(msg.constraint) if msg.HasField("constraint") else None
    n = msg.n if msg.n else 1  # proto3 zero: unset
    return GenerationRequest(prompt, sampling, stopping, output, msg.request_id or None, msg.priority, constraint, n)


def to_constraint(c: pb.Constraint) -> Constraint:
    kind = c.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError("constraint", "set json_schema, json_object, regex, grammar or choice")
    if kind == "json_object" and not c.json_object:
        raise InvalidRequestError("constraint.json_object", "must be true when set")
    if kind == "choice":
        return Constraint(ConstraintKind.CHOICE, tuple(c.choice.choices))
    return Constraint(ConstraintKind(kind), "" if kind == "json_object" else getattr(c, kind))


def from_constraint(c: Constraint) -> pb.Constraint:
    if c.kind is ConstraintKind.CHOICE:
        return pb.Constraint(choice=pb.Choices(choices=list(c.value)))
    if c.kind is ConstraintKind.JSON_OBJECT:
        return pb.Constraint(json_object=True)
    assert isinstance(c.value, str)
    if c.kind is ConstraintKind.JSON_SCHEMA:
        return pb.Constraint(json_schema=c.value)
    return pb.Constraint(regex=c.value) if c.kind is ConstraintKind.REGEX else pb.Constraint(grammar=c.value)


def to_message(request: GenerationRequest) -> pb.GenerateStreamRequest:
    """The engine request as a tandem.v1 message (what `tandem generate --target` sends)."""
    s, t, o = request.sampling, request.stopping, request.output
    msg = pb.GenerateStreamRequest(
        request_id=request.request_id or "",
        sampling=pb.SamplingParams(
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logit_bias=s.logit_bias,
            seed=s.seed,
        ),
        stopping=pb.StoppingCriteria(
            max_new_tokens=t.max_new_tokens,
            min_new_tokens=t.min_new_tokens,
            stop_token_ids=t.stop_token_ids,
            stop_strings=t.stop_strings,
            ignore_eos=t.ignore_eos,
            include_stop_string=t.include_stop_string,
        ),
        output=pb.OutputOptions(logprobs=o.logprobs, top_logprobs=o.top_logprobs),
        priority=request.priority,
        constraint=from_constraint(request.constraint) if request.constraint is not None else None,
        n=request.n,
    )
    if isinstance(request.prompt, str):
        msg.text = request.prompt
    else:
        msg.token_ids.ids.extend(request.prompt)
    return msg


def usage(out: RequestOutput, completion_tokens: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=out.num_prompt_tokens,
        cached_prompt_tokens=out.num_cached_tokens,
        completion_tokens=completion_tokens,
    )


def finish_reason(out: RequestOutput) -> pb.FinishReason:
    if out.finish_reason is None:
        raise ValueError(f"request {out.request_id} has not finished")
    return FINISH_REASONS[out.finish_reason]


def api_field(engine_field: str, kind: str | None) -> str:
    """The engine's field path at the API's names (the prompt is a oneof there: `kind`)."""
    if engine_field.startswith("prompt") and kind == "messages":
        return "messages"
    if engine_field == "prompt":
        return kind or "prompt"
    if engine_field == "prompt.token_ids":
        return "token_ids.ids"
    return engine_field


def logprobs(items: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob or 0.0,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in items or []
    ]


def stream_response(out: RequestOutput, first: bool) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(
        request_id=out.request_id,
        token_ids=out.token_ids,
        text=out.text,
        logprobs=logprobs(out.logprobs),
        index=out.index,
    )
    if first:
        msg.prompt_tokens = out.num_prompt_tokens
        msg.cached_prompt_tokens = out.num_cached_tokens
    if out.finished:
        msg.finish_reason = finish_reason(out)
        set_matched_stop(msg, out)
    return msg


def set_matched_stop(msg: pb.GenerateStreamResponse | pb.GenerateResponse | pb.Sample, out: RequestOutput) -> None:
    """Which stop string, stop token or EOS token ended the request (none for length or abort)."""
    if isinstance(out.stop, str):
        msg.matched_stop_string = out.stop
    elif isinstance(out.stop, int):
        msg.matched_token_id = out.stop
