"""tandem.v1.InfoService: the served model, the server's settings, and its load."""

from __future__ import annotations

from dataclasses import asdict

import grpc

import tandem
from tandem.service.engine_slot import EngineSlot
from tandem.v1 import info_pb2 as pb
from tandem.v1 import info_pb2_grpc as pb_grpc


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, slot: EngineSlot, max_waiting: int) -> None:
        self.slot = slot
        self.max_waiting = max_waiting

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        engine = await self.slot.get(context)
        m = engine.model
        return pb.GetModelInfoResponse(
            name=m.name,
            architecture=(m.config.architectures or [type(m.model).__name__])[0],
            context_length=m.max_model_len,
            vocab_size=m.vocab_size,
            eos_token_ids=list(m.eos_token_ids),
            dtype=str(m.dtype).removeprefix("torch."),
            device=str(m.device),
            attention=engine.attention,
            cuda_graph_buckets=engine.graph_buckets,
            tensor_parallel=engine.config.tensor_parallel,
            kv_bytes_per_rank=engine.kv_bytes_per_rank,
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        engine = await self.slot.get(context)
        c = engine.config
        return pb.GetServerInfoResponse(
            version=tandem.__version__,
            scheduler=engine.scheduler_name,
            scheduler_options=engine.scheduler_options,
            max_batch_tokens=c.max_batch_tokens,
            max_num_seqs=c.max_num_seqs,
            max_waiting=self.max_waiting,
            block_size=c.block_size,
            kv_blocks=engine.stats().kv_blocks_total,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        return pb.GetLoadResponse(**asdict((await self.slot.get(context)).load()))
