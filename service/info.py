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
        info = (await self.slot.get(context)).info
        return pb.GetModelInfoResponse(
            name=info.model_name,
            architecture=info.architecture,
            context_length=info.max_model_len,
            vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            dtype=info.dtype,
            device=info.device,
            attention=info.attention,
            cuda_graph_buckets=list(info.graph_buckets),
            tensor_parallel=info.tensor_parallel,
            kv_bytes_per_rank=list(info.kv_bytes_per_rank),
        )

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        info = (await self.slot.get(context)).info
        return pb.GetServerInfoResponse(
            version=tandem.__version__,
            scheduler=info.scheduler,
            scheduler_options=dict(info.scheduler_options),
            max_batch_tokens=info.max_batch_tokens,
            max_num_seqs=info.max_num_seqs,
            max_waiting=self.max_waiting,
            block_size=info.block_size,
            kv_blocks=info.kv_blocks,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        return pb.GetLoadResponse(**asdict((await self.slot.get(context)).load()))
