"""The engine a server serves, once it is loaded. The port opens before the model loads (so
probes see NOT_SERVING, not connection refused); an RPC that arrives meanwhile is UNAVAILABLE."""

from __future__ import annotations

import grpc

from tandem.engine import Engine

LOADING = "the model is still loading; health reports SERVING once it is ready"


class EngineSlot:
    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine

    async def get(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, LOADING)
        assert self.engine is not None  # abort raised
        return self.engine
