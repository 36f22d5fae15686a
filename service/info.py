"""tandem.v1.InfoService: the served model, the server's settings, and its load."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from engine import Engine
from tandem.v1 import info_pb2 as pb
from tandem.v1 import info_pb2_grpc as pb_grpc


def tandem_version() -> str:
    try:
        return version("tandem")
    except PackageNotFoundError:
        return "unknown"


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, engine: Engine, scheduler_options: dict[str, str], max_waiting: int) -> None:
        self.engine = engine
        self.scheduler_options = scheduler_options
        self.max_waiting = max_waiting

    async def GetModelInfo(self, request, context):
        m = self.engine.model
        return pb.GetModelInfoResponse(
            name=m.name,
            architecture=(m.config.architectures or [type(m.model).__name__])[0],
            context_length=m.max_model_len,
            vocab_size=m.vocab_size,
            eos_token_ids=list(m.eos_token_ids),
            dtype=str(m.dtype).removeprefix("torch."),
            device=str(m.device),
        )

    async def GetServerInfo(self, request, context):
        c = self.engine.config
        return pb.GetServerInfoResponse(
            version=tandem_version(),
            scheduler=self.engine.core.scheduler.name,
            scheduler_options=self.scheduler_options,
            max_batch_tokens=c.max_batch_tokens,
            max_num_seqs=c.max_num_seqs,
            max_waiting=self.max_waiting,
            block_size=c.block_size,
            kv_blocks=self.engine.core.blocks.num_blocks,
        )

    async def GetLoad(self, request, context):
        load = self.engine.load()
        return pb.GetLoadResponse(**vars(load))
