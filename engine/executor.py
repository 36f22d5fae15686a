"""The paged-KV executor: one per process, owns the model, the KV pools and the device.

Its interface is split in two so a scheduler can overlap host work with device work later:
`launch(batch)` prepares the step's tensors and enqueues the forward pass and sampling, and
returns a handle; `collect(handle)` waits for the sampled tokens and reads them back. This
implementation is synchronous on the CPU and naturally asynchronous on CUDA up to `collect`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention import STEP_KWARG, PrefillSpan, StepAttention
from engine.kv_cache import KVCache
from engine.sampling import SampleOutput, SampleSpec, build_sampling, sample


@dataclass
class StepRow:
    """One sequence's share of a step: a prefill chunk or a single decode token."""

    token_ids: np.ndarray  # int64, the tokens whose K/V this step computes
    start: int  # position of token_ids[0]; tokens before it are already in the cache
    block_table: list[int]  # covers positions [0, start + len(token_ids))
    sample: SampleSpec | None = None  # None for a prefill chunk that does not reach the end


@dataclass
class StepBatch:
    rows: list[StepRow]


@dataclass
class TokenChoice:
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepResult:
    """Sampled tokens, one per row that asked to sample, in row order."""

    choices: list[TokenChoice]


@dataclass
class StepHandle:
    output: SampleOutput | None
    num_sampled: int
    started: float
    prepared: float


@dataclass
class ExecutorStats:
    """Where step time goes: host preparation vs. the forward pass and sampling."""

    steps: int = 0
    tokens: int = 0
    prepare_seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def prepare_fraction(self) -> float:
        total = self.prepare_seconds + self.compute_seconds
        return self.prepare_seconds / total if total else 0.0


@dataclass
class PreparedStep:
    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    attention: StepAttention
    sample_rows: torch.Tensor  # flattened index of the last token of each sampling row


class Executor:
    def __init__(self, model: torch.nn.Module, kv: KVCache, device: torch.device, seed: int = 0) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.layout.block_size
        self.rng = np.random.default_rng(seed)
        self.stats = ExecutorStats()

    # -- the launch / collect interface ----------------------------------------------------
    def launch(self, batch: StepBatch) -> StepHandle:
        started = time.perf_counter()
        prepared = self.prepare(batch)
        specs = [row.sample for row in batch.rows if row.sample is not None]
        sampling = build_sampling(specs, self.device, self.rng) if specs else None
        prepared_at = time.perf_counter()
        output = None
        with torch.inference_mode():
            logits = self.forward(prepared, prepared.sample_rows)
            if sampling is not None:
                output = sample(logits, sampling)
        self.stats.tokens += int(prepared.input_ids.shape[1])
        return StepHandle(output, len(specs), started, prepared_at)

    def collect(self, handle: StepHandle) -> StepResult:
        choices: list[TokenChoice] = []
        out = handle.output
        if out is not None:
            tokens = out.tokens.tolist()  # waits for the device
            lps = out.logprobs.tolist() if out.logprobs is not None else None
            top_ids = out.top_ids.tolist() if out.top_ids is not None else None
            top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
            for i, token in enumerate(tokens):
                top = list(zip(top_ids[i], top_lps[i])) if top_ids is not None else []
                choices.append(TokenChoice(token, lps[i] if lps is not None else None, top))
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        done = time.perf_counter()
        self.stats.steps += 1
        self.stats.prepare_seconds += handle.prepared - handle.started
        self.stats.compute_seconds += done - handle.prepared
        return StepResult(choices)

    def step(self, batch: StepBatch) -> StepResult:
        return self.collect(self.launch(batch))

    # -- pieces ----------------------------------------------------------------------------
    def forward(self, prepared: PreparedStep, logits_rows: torch.Tensor) -> torch.Tensor:
        """Run the model over the flattened step; logits of the tokens at `logits_rows`."""
        out = self.model(
            input_ids=prepared.input_ids,
            position_ids=prepared.positions,
            use_cache=False,
            logits_to_keep=logits_rows,
            **{STEP_KWARG: prepared.attention},
        )
        return out.logits[0]

    def prepare(self, batch: StepBatch) -> PreparedStep:
        """Flatten the ragged batch into tensors, vectorized over tokens."""
        rows = batch.rows
        bs = self.block_size
        q_lens = np.fromiter((len(r.token_ids) for r in rows), dtype=np.int64, count=len(rows))
        starts = np.fromiter((r.start for r in rows), dtype=np.int64, count=len(rows))
        ends = starts + q_lens
        cu = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        total = int(cu[-1])
        owner = np.repeat(np.arange(len(rows)), q_lens)
        positions = starts[owner] + np.arange(total) - cu[owner]

        width = max(len(r.block_table) for r in rows)
        tables = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            tables[i, : len(r.block_table)] = r.block_table
        slot_mapping = tables[owner, positions // bs] * bs + positions % bs

        decode = np.nonzero(q_lens == 1)[0]
        ctx = np.arange(int(ends[decode].max()) if decode.size else 0)
        decode_slots = tables[decode][:, ctx // bs] * bs + ctx % bs
        decode_mask = ctx[None, :] < ends[decode][:, None]

        dev = self.device
        prefills = []
        for i in np.nonzero(q_lens > 1)[0]:
            pos = np.arange(ends[i])
            slots = torch.from_numpy(tables[i, pos // bs] * bs + pos % bs).to(dev)
            mask = None
            if starts[i] > 0:
                q_pos = np.arange(starts[i], ends[i])
                mask = torch.from_numpy(pos[None, :] <= q_pos[:, None]).to(dev)[None, None]
            prefills.append(PrefillSpan(int(cu[i]), int(cu[i + 1]), slots, mask))

        sample_rows = np.array([cu[i + 1] - 1 for i, r in enumerate(rows) if r.sample is not None], dtype=np.int64)
        ids = np.concatenate([r.token_ids for r in rows]).astype(np.int64)
        attention = StepAttention(
            kv=self.kv,
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            decode_rows=torch.from_numpy(cu[decode]).to(dev),
            decode_slots=torch.from_numpy(decode_slots).to(dev),
            decode_mask=torch.from_numpy(decode_mask).to(dev)[:, None, None, :],
            prefills=prefills,
            max_context=int(ends.max()),
        )
        return PreparedStep(
            input_ids=torch.from_numpy(ids).to(dev)[None],
            positions=torch.from_numpy(positions).to(dev)[None],
            attention=attention,
            sample_rows=torch.from_numpy(sample_rows).to(dev),
        )
