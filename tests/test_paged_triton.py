"""The Triton paged-attention kernel, run on the CPU by Triton's interpreter.

The kernel reads K/V in place through block tables; here it is checked against attention
computed on a gathered copy (float64), then through the whole engine against the gather path.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_greedy_matches, make_engine, ordinary_model, random_prompts, reference_model, small_core
from tandem.engine import GenerationRequest, SamplingParams, StoppingCriteria
from tandem.engine.model.presets import preset_path

if os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it before torch imports triton
    pytest.skip("the kernels run on the CPU only in Triton's interpreter", allow_module_level=True)
pytest.importorskip("triton")

from tandem.engine.device import batch as batch_module  # noqa: E402
from tandem.engine.device.graphs import graph_buckets  # noqa: E402
from tandem.engine.device.paged_triton import paged_attention  # noqa: E402


def reference(q, k_cache, v_cache, tables, table_of, lens, block_size, scale):
    """Each query over its first lens[i] positions, gathered out of the pool, in float64."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[1]
    for i in range(q.shape[0]):
        pos = torch.arange(int(lens[i]))
        slots = tables[table_of[i], pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        w = torch.softmax(torch.einsum("hd,lhd->hl", q[i].double(), k) * scale, dim=-1)
        out[i] = torch.einsum("hl,lhd->hd", w, v)
    return out


def pool(blocks: int, block_size: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (blocks * block_size, kv_heads, dim)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(4, 2, 64, 16), (8, 1, 32, 16), (4, 4, 80, 8), (6, 2, 128, 32)],
)
def test_decode_rows_read_their_own_blocks(heads: int, kv_heads: int, dim: int, block_size: int) -> None:
    k_cache, v_cache = pool(24, block_size, kv_heads, dim, torch.float32)
    lens = torch.tensor([1, 5, block_size, block_size + 1, 3 * block_size + 7])
    # scattered, shared and out-of-order blocks, and padding entries past each row's length
    tables = torch.tensor([[7, 0, 0, 0], [3, 0, 0, 0], [11, 0, 0, 0], [11, 2, 0, 0], [20, 1, 9, 4]])
    q = torch.randn(5, heads, dim)
    table_of = torch.arange(5)
    got = paged_attention(q, k_cache, v_cache, tables, table_of, lens, block_size, dim**-0.5)
    want = reference(q, k_cache, v_cache, tables, table_of, lens, block_size, dim**-0.5)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_a_chunk_over_a_cached_prefix_attends_causally() -> None:
    """Five new queries after 19 cached tokens: query j sees 20 + j keys, all through one table."""
    k_cache, v_cache = pool(8, 16, 2, 64, torch.float32, seed=1)
    tables = torch.tensor([[5, 2, 6]])
    lens = torch.arange(20, 25)
    q = torch.randn(5, 4, 64)
    table_of = torch.zeros(5, dtype=torch.int64)
    got = paged_attention(q, k_cache, v_cache, tables, table_of, lens, 16, 0.125)
    want = reference(q, k_cache, v_cache, tables, table_of, lens, 16, 0.125)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pools(dtype: torch.dtype) -> None:
    k_cache, v_cache = pool(8, 16, 2, 64, dtype, seed=2)
    tables = torch.tensor([[1, 4, 6], [0, 7, 3]])
    lens = torch.tensor([40, 9])
    q = torch.randn(2, 4, 64).to(dtype)
    got = paged_attention(q, k_cache, v_cache, tables, torch.arange(2), lens, 16, 0.125)
    want = reference(q, k_cache, v_cache, tables, torch.arange(2), lens, 16, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


def test_a_head_count_that_does_not_divide_is_refused() -> None:
    k_cache, v_cache = pool(2, 16, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="not a multiple"):
        paged_attention(
            torch.randn(1, 4, 16), k_cache, v_cache, torch.zeros(1, 1), torch.zeros(1), torch.ones(1), 16, 1.0
        )


TIE_TOLERANCE = 1e-4  # as tests/test_generate.py: where a greedy choice may flip with rounding


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ordinary_model(tmp_path_factory.mktemp("ordinary-init"))


@pytest.mark.parametrize("model", ["tiny-llama", "ordinary"])
@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_the_engine_on_the_kernel_is_the_models_greedy_choice(
    model: str, scheduler: str, ordinary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode rows, prefill chunks over a cached prefix (shared prompts, a small step budget)
    and fresh chunks, through the engine with attention="triton": transformers' greedy tokens,
    tie-aware on ordinarily initialised weights. On the ordinary model fresh chunks over 10
    tokens take SDPA beside the kernel, as fresh prompts over PAGED_PREFILL_MAX do."""
    path = str(ordinary) if model == "ordinary" else model
    if model == "ordinary":
        monkeypatch.setattr(batch_module, "PAGED_PREFILL_MAX", 10)
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 500, 37).tolist()
    prompts = [shared + p for p in random_prompts(rng, 4, 1, 20)] + random_prompts(rng, 2, 1, 30)
    config = dict(model=path, attention="triton", max_batch_tokens=32, max_num_seqs=4, block_size=8)
    misaligned: list[int] = []
    fresh_queries = 0  # queries at position 0: a fresh chunk's first token, through the kernel

    def kernel(q, k, v, tables, table_of, lens, *rest):
        nonlocal fresh_queries
        misaligned.extend(t.data_ptr() % 16 for t in (tables, table_of, lens) if t.data_ptr() % 16)
        fresh_queries += int((lens == 1).sum())
        return paged_attention(q, k, v, tables, table_of, lens, *rest)

    with make_engine(scheduler, **config) as eng:
        assert eng.core.executor.paged_kernel is paged_attention
        eng.core.executor.paged_kernel = kernel
        greedy, stop = SamplingParams(temperature=0), StoppingCriteria(max_new_tokens=6, ignore_eos=True)
        got = eng.generate(prompts, greedy, stop)
        assert eng.stats().prefix_cache_hit_rate > 0
    assert fresh_queries > 0
    # Triton specializes on pointer alignment: a misaligned view would compile another variant
    assert not misaligned
    ref = reference_model(preset_path(path) if model != "ordinary" else path)
    for p, c in zip(prompts, got):
        assert_greedy_matches(p, c.token_ids, ref, TIE_TOLERANCE)


def test_triton_attention_off_cuda_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from tandem.engine.device.executor import paged_kernel_for

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        paged_kernel_for("triton", torch.device("cpu"))
    assert paged_kernel_for("auto", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="attention must be one of"):
        paged_kernel_for("flash", torch.device("cpu"))


def test_graph_buckets() -> None:
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(1) == [1] and graph_buckets(0) == []


@pytest.mark.parametrize("scheduler", ["fcfs", "async-overlap"])
def test_decode_steps_through_the_graph_buffers_keep_the_greedy_choice(scheduler: str, ordinary: Path) -> None:
    """The CUDA-graph path without the capture: pure-decode steps copied into the static
    buffers of the smallest bucket that fits, padding rows writing only the scratch block.
    Rows finish at different lengths, so the batch shrinks and buckets change under reuse."""
    rng = np.random.default_rng(11)
    prompts = random_prompts(rng, 7, 1, 30)
    lengths = [3, 9, 5, 12, 7, 2, 10]
    config = dict(model=str(ordinary), attention="triton", max_num_seqs=7, block_size=8)
    with make_engine(scheduler, **config) as eng:
        eng.core.executor.use_graphs(7, 256, capture=False)
        greedy = SamplingParams(temperature=0)
        got = eng.generate(prompts, greedy, [StoppingCriteria(n, ignore_eos=True) for n in lengths])
        graphs = eng.core.executor.graphs
        assert graphs is not None and graphs.buckets == [1, 2, 4, 7] and graphs.replays > 10
    ref = reference_model(ordinary)
    for p, c, n in zip(prompts, got, lengths):
        assert len(c.token_ids) == n
        assert_greedy_matches(p, c.token_ids, ref, TIE_TOLERANCE)


def test_graphs_need_the_paged_kernel() -> None:
    with (
        make_engine("fcfs", model="tiny-llama", attention="gather") as eng,
        pytest.raises(ValueError, match="paged attention kernel"),
    ):
        eng.core.executor.use_graphs(4, 128, capture=False)


def test_a_step_whose_row_samples_twice_through_the_graph_buffers() -> None:
    """n = 2 with the prompt's last chunk one token at a block boundary: a pure one-token step
    (no block copy) whose one row samples twice; the graph path must hand back one logits row
    per sample, as the eager forward does."""
    outs = []
    for graphs in (False, True):
        core = small_core(64, block_size=4, attention="triton", max_batch_tokens=7)
        if graphs:
            core.executor.use_graphs(4, 256, capture=False)
        stop = StoppingCriteria(5, ignore_eos=True)
        core.add(core.make_sequence(GenerationRequest(list(range(5, 13)), SamplingParams(temperature=0), stop, n=2)))
        got: dict[int, list[int]] = {}
        while core.has_work():
            for out in core.step():
                got.setdefault(out.index, []).extend(out.token_ids)
        assert not graphs or (core.executor.graphs is not None and core.executor.graphs.replays > 0)
        core.close()
        outs.append(got)
    assert outs[0] == outs[1] and sorted(outs[0]) == [0, 1] and all(len(t) == 5 for t in outs[0].values())


def test_short_fresh_prompts_go_to_the_kernel_and_long_ones_to_sdpa() -> None:
    """With the paged kernel, a fresh prompt up to PAGED_PREFILL_MAX tokens is served by the
    kernel (one launch per layer for all of them) and a longer one by SDPA; without it, every
    prompt by SDPA."""
    from tandem.engine.device.batch import PAGED_PREFILL_MAX, StepBatch, StepRow, build_host_batch

    def row(length: int, start: int = 0) -> StepRow:
        return StepRow(np.arange(length, dtype=np.int64) + 3, start, list(range(-(-(start + length) // 16))))

    long = PAGED_PREFILL_MAX + 1
    rows = [row(1, 40), row(7), row(long), row(5, 20)]  # decode, short fresh, long fresh, chunk over a prefix
    paged = build_host_batch(StepBatch(rows), 16, paged=True)
    assert [(q0, q1, first) for q0, q1, first, _ in paged.prefills] == [(8, 8 + long, 0)]
    offset, length = paged.sections.paged_queries
    queries = paged.flat[offset : offset + length]
    assert queries.tolist() == [*range(8), *range(8 + long, 8 + long + 5)]
    assert paged.max_context == long
    gathered = build_host_batch(StepBatch(rows), 16)
    assert [p[:3] for p in gathered.prefills] == [(1, 8, 0), (8, 8 + long, 0), (8 + long, 13 + long, 20)]
