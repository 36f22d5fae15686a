"""Bearer-token authentication, checked by a server interceptor before any handler runs."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import grpc
import structlog

log = structlog.get_logger("tandem.auth")

# Probes must reach health without a credential.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)


def load_named_tokens(path: str | Path) -> list[tuple[str, bytes]]:
    """One token per line, optionally after a name (`NAME TOKEN`: the tenant its requests
    count for); blank lines and #-comments are skipped. Refuses an empty file."""
    named = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2:
            raise ValueError(f"--auth-token-file {path}: expected TOKEN or NAME TOKEN per line")
        named.append(("" if len(fields) == 1 else fields[0], fields[-1].encode()))
    if not named:
        raise ValueError(f"--auth-token-file {path}: no tokens in the file")
    return named


def load_tokens(path: str | Path) -> list[bytes]:
    return [token for _, token in load_named_tokens(path)]


def token_name(metadata: object, named: list[tuple[str, bytes]]) -> str:
    """The name of the presented token ("" if unnamed or unknown); compared in constant time
    against every token, as the interceptor does."""
    presented, found = presented_token(metadata), ""
    for name, token in named:
        if hmac.compare_digest(presented, token) and presented:
            found = name
    return found


def presented_token(metadata: object) -> bytes:
    """The bearer token in `authorization` metadata, or b"" when there is none."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == "authorization":
            raw = value.encode() if isinstance(value, str) else value
            if raw[:7].lower() == b"bearer ":
                return bytes(raw[7:].strip())
    return b""


def credential_id(metadata: object) -> str:
    """Who sent a call, as far as bearer auth knows: a digest of its token (never the token)."""
    return hashlib.sha256(presented_token(metadata)).hexdigest()[:16]


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def deny(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` must match one of the tokens. Compared in constant
    time against every token (no early exit that would time which one is near); the token
    is never logged."""

    def __init__(self, tokens: list[bytes]) -> None:
        self._tokens = tokens

    def _authorized(self, metadata: object) -> bool:
        presented = presented_token(metadata)
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(presented, token)
        return ok and bool(presented)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_PREFIXES):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        log.warning("unauthenticated", method=details.method)
        return _denied(handler, "missing or invalid bearer token (metadata 'authorization: Bearer <token>')")
