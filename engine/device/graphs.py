"""CUDA graphs for decode steps: one captured forward per batch-size bucket, replayed.

A decode step of a small model launches hundreds of small kernels from Python; on a GPU the
host, not the device, then sets the pace. A graph replays them all with one launch. Each
bucket (1, 2, 4, 8, then every 16 up to the largest) is captured once at start over static
input buffers shared by all buckets; a pure-decode step of b rows runs the smallest bucket of
at least b rows: its inputs are copied into the buffers' first b rows, the rest are padding
rows that read and write only a scratch block no sequence owns. Mixed steps, steps with
block copies, and wider batches run eagerly. Needs the paged kernel (block tables have a
static shape; slot lists do not).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.engine.device.attention import PagedReads, StepAttention
from tandem.engine.device.batch import HostBatch, PreparedStep
from tandem.engine.device.kv_cache import KVCache


def graph_buckets(max_rows: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then multiples of 16, the last covering max_rows."""
    if max_rows < 1:
        return []
    return [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16)) + [max_rows]


@dataclass
class StaticInputs:
    """The buffers every bucket's graph reads: rows beyond a step's own are padding."""

    input_ids: torch.Tensor  # [1, R]
    positions: torch.Tensor  # [1, R]
    slot_mapping: torch.Tensor  # [R]
    lens: torch.Tensor  # [R]
    tables: torch.Tensor  # [R, W]
    rows: torch.Tensor  # [R] arange: queries, table rows and logits rows alike

    @classmethod
    def allocate(cls, rows: int, width: int, device: torch.device) -> StaticInputs:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        return cls(z(1, rows), z(1, rows), z(rows), z(rows), z(rows, width), torch.arange(rows, device=device))

    def fill(self, step: PreparedStep, paged: PagedReads, scratch_block: int, block_size: int) -> int:
        """Copy a pure-decode step's inputs into the first rows, pad the rest; its row count."""
        b, w = paged.tables.shape
        self.input_ids[:, :b].copy_(step.input_ids)
        self.positions[:, :b].copy_(step.positions)
        self.slot_mapping[:b].copy_(step.attention.slot_mapping)
        self.lens[:b].copy_(paged.lens)
        self.tables[:b, :w].copy_(paged.tables)
        # NOTE: padding rows are reset every step, not once: a larger earlier step left its
        # rows' slots there, and a padding row writing into them would corrupt a live sequence.
        self.input_ids[:, b:] = 0
        self.positions[:, b:] = 0
        self.slot_mapping[b:] = scratch_block * block_size
        self.lens[b:] = 1
        self.tables[b:, 0] = scratch_block
        return b

    def attention(self, rows: int, kv: KVCache, kernel: Callable, max_context: int) -> StepAttention:
        """The metadata of a `rows`-row bucket: views of the buffers."""
        r = self.rows[:rows]
        paged = PagedReads(r, r, self.lens[:rows], self.tables[:rows], kv.layout.block_size, kernel)
        return StepAttention(kv, self.slot_mapping[:rows], [], [], max_context=max_context, paged=paged)


class DecodeGraphs:
    """Captured decode forwards by bucket. `capture=False` runs the same static-buffer path
    eagerly (the CPU tests of the bookkeeping: padding, buckets, buffer reuse)."""

    def __init__(
        self,
        forward: Callable[[PreparedStep, torch.Tensor], torch.Tensor],  # Executor.forward
        kv: KVCache,
        kernel: Callable,
        max_rows: int,
        max_context: int,
        capture: bool = True,
    ) -> None:
        self.forward = forward
        self.kv = kv
        self.kernel = kernel
        self.buckets = graph_buckets(max_rows)
        self.max_context = max_context
        self.width = -(-max_context // kv.layout.block_size)
        self.inputs = StaticInputs.allocate(max_rows, self.width, kv.k.device)
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None  # [max_rows, vocab]: every bucket's graph writes here
        self.replays = 0  # steps served by a bucket (graph or, without capture, the static path)
        if capture:
            self._capture_all()

    def fits(self, host: HostBatch) -> bool:
        """A pure-decode step (every row one token), no block copies, within the buckets."""
        rows = host.sections.decode_rows[1]
        return (
            0 < rows == host.num_tokens
            and host.sections.copy_src[1] == 0
            and host.table_width <= self.width
            and rows <= self.buckets[-1]
        )

    def run(self, step: PreparedStep) -> torch.Tensor:
        """Logits of the step's sampled rows, as the eager forward gives them: one per sample
        (a row with forks repeats; a prompt's last token that does not sample has none)."""
        paged = step.attention.paged
        assert paged is not None, "decode graphs need the paged kernel's metadata"
        b = self.inputs.fill(step, paged, self.kv.scratch_block, self.kv.layout.block_size)
        bucket = self.buckets[bisect.bisect_left(self.buckets, b)]
        self.replays += 1
        if not self.capture:
            return self._forward(bucket).index_select(0, step.sample_rows)
        self.graphs[bucket].replay()
        assert self.logits is not None
        # NOTE: index_select copies: the next replay overwrites the buffer, and under overlap a
        # step's sampling may wait (grammar masks) until the next step has been launched.
        return self.logits.index_select(0, step.sample_rows)

    def _forward(self, rows: int) -> torch.Tensor:
        inputs = self.inputs
        step = PreparedStep(
            inputs.input_ids[:, :rows],
            inputs.positions[:, :rows],
            inputs.attention(rows, self.kv, self.kernel, self.max_context),
            inputs.rows[:rows],
            inputs.rows[:0],
            inputs.rows[:0],
        )
        return self.forward(step, inputs.rows[:rows])

    def _capture_all(self) -> None:
        """Largest first, one memory pool: smaller graphs reuse the largest one's memory, and
        each copies its logits into one shared buffer (its own output is then pool scratch)."""
        pool = None
        self.inputs.lens.fill_(1)
        self.inputs.tables.fill_(self.kv.scratch_block)
        self.inputs.slot_mapping.fill_(self.kv.scratch_block * self.kv.layout.block_size)
        side = torch.cuda.Stream(self.kv.k.device)  # warm-ups off the capturing stream, as torch advises
        for rows in reversed(self.buckets):
            with torch.inference_mode():
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # lazy initialisation and kernel compiles stay out of the graph
                        warm = self._forward(rows)
                torch.cuda.current_stream().wait_stream(side)
                if self.logits is None:
                    self.logits = torch.empty((rows, warm.shape[-1]), dtype=warm.dtype, device=warm.device)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[:rows].copy_(self._forward(rows))
            pool = graph.pool()
            self.graphs[rows] = graph
