"""Batched sampling on the device.

Each row draws with one uniform number u through the inverse CDF of its (filtered)
distribution. For a seeded request u is a hash of (seed, index of the token in its output):
the draw itself depends on nothing else, not the batch, the scheduler or preemptions. The
logits it is applied to can still move by float rounding with the batch's shape (about 1e-6
of their scale), so a token whose u falls within that of a CDF boundary can differ; on real
models, near-ties make that rare but possible.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.engine.device.placeholders import resolve_placeholders
from tandem.engine.request import SamplingParams

_U64 = np.uint64


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def seeded_uniforms(seeds: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Uniforms in [0, 1), a pure function of (seed, counter)."""
    bits = _splitmix64(seeds.astype(np.uint64) ^ _splitmix64(counters.astype(np.uint64)))
    return (bits >> _U64(11)).astype(np.float64) * 2.0**-53


@dataclass
class SampleSpec:
    """One row to sample: its parameters plus the per-row facts they need."""

    params: SamplingParams
    num_generated: int  # seeds the row's draw; stable across batches and preemption
    suppressed: tuple[int, ...] = ()  # EOS / stop tokens masked until min_new_tokens
    prompt_ids: np.ndarray | None = None  # only when a penalty needs them
    output_ids: np.ndarray | None = None
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class GrammarMasks:
    """Allowed-token bitmasks of a step's constrained rows (structured output), in host memory.

    The host fills `bits` and calls `done()` once every constrained row's tokens are known:
    before the launch, or under overlap after the previous step's tokens arrive, while this
    step's forward pass runs. Sampling waits for it; nothing else does."""

    rows: list[int]  # indices among the step's sampled rows
    bits: torch.Tensor  # [len(rows), ceil(vocab / 32)] int32; bit j of word w allows token 32w + j
    ready: threading.Event = field(default_factory=threading.Event)

    def done(self) -> None:
        self.ready.set()


# What a refused token's logit gets added. NOTE: finite, not -inf: the bias is added (one
# vectorized pass; masked_fill over a bool mask is ~10x slower on the CPU), and 0 * inf would be
# NaN. Softmax still gives such tokens exactly zero probability.
REFUSED = -3e38


def grammar_bias(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bitmasks as [rows, vocab_size] float32: 0 allowed, REFUSED not."""
    if bits.device.type == "cpu":  # numpy's unpackbits: one pass in C
        allowed = torch.from_numpy(np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little"))
    else:
        shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(bits.shape[0], -1)
    return allowed[:, :vocab_size].float().sub_(1).mul_(-REFUSED)


@dataclass
class SamplingTensors:
    greedy: torch.Tensor  # [B] bool
    all_greedy: bool
    temperature: torch.Tensor  # [B]
    uniforms: torch.Tensor  # [B] float64
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, ids, values
    suppress: tuple[torch.Tensor, torch.Tensor] | None  # rows, ids
    repetition: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # per-row penalty, rows, ids
    presence_frequency: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    want_logprobs: bool
    num_top: int
    has_placeholders: bool = False  # penalty histories hold tokens of the previous step
    grammar: GrammarMasks | None = None
    grammar_rows: torch.Tensor | None = None  # GrammarMasks.rows on the device

    def tensors(self) -> list[torch.Tensor]:
        out = [self.greedy, self.temperature, self.uniforms]
        for value in (
            self.grammar_rows,
            self.top_k,
            self.top_p,
            self.min_p,
            self.bias,
            self.suppress,
            self.repetition,
            self.presence_frequency,
        ):
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif isinstance(value, tuple):
                out.extend(value)
        return out

    def resolve(self, prev_tokens: torch.Tensor) -> None:
        """Replace placeholder ids in penalty histories by the previous step's tokens."""
        if self.repetition is not None:
            penalty, rows, ids = self.repetition
            self.repetition = (penalty, rows, resolve_placeholders(ids, prev_tokens))
        if self.presence_frequency is not None:
            pres, freq, rows, ids = self.presence_frequency
            self.presence_frequency = (pres, freq, rows, resolve_placeholders(ids, prev_tokens))


def _sparse(rows: list[np.ndarray], cols: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.from_numpy(np.concatenate(rows).astype(np.int64)).to(device)
    c = torch.from_numpy(np.concatenate(cols).astype(np.int64)).to(device)
    return r, c


def build_sampling(
    specs: list[SampleSpec], device: torch.device, rng: np.random.Generator, grammar: GrammarMasks | None = None
) -> SamplingTensors:
    params = [s.params for s in specs]
    n = len(specs)
    temps = np.array([p.temperature for p in params], dtype=np.float32)
    greedy = temps == 0
    seeds = np.array([p.seed if p.seed is not None else 0 for p in params], dtype=np.uint64)
    seeded = np.array([p.seed is not None for p in params])
    uniforms = rng.random(n)
    if seeded.any():
        counters = np.array([s.num_generated for s in specs], dtype=np.uint64)
        uniforms = np.where(seeded, seeded_uniforms(seeds, counters), uniforms)

    def column(values, dtype, active):
        return torch.tensor(values, dtype=dtype, device=device) if active else None

    sampled = ~greedy
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    any_top_k = any(k > 0 for k, s in zip(top_k, sampled) if s)
    any_top_p = any(p < 1 for p, s in zip(top_p, sampled) if s)
    any_min_p = any(p > 0 for p, s in zip(min_p, sampled) if s)

    bias = None
    if any(p.logit_bias for p in params):
        entries = [(i, token, value) for i, p in enumerate(params) for token, value in p.logit_bias.items()]
        bias = (
            torch.tensor([e[0] for e in entries], device=device),
            torch.tensor([e[1] for e in entries], device=device),
            torch.tensor([e[2] for e in entries], dtype=torch.float32, device=device),
        )
    suppress = None
    if any(s.suppressed for s in specs):
        suppress_rows = [np.full(len(s.suppressed), i) for i, s in enumerate(specs)]
        suppress = _sparse(suppress_rows, [np.asarray(s.suppressed, dtype=np.int64) for s in specs], device)

    repetition = None
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = {
            i: np.concatenate([s.prompt_ids, s.output_ids])
            for i, s in enumerate(specs)
            if s.params.repetition_penalty != 1.0 and s.prompt_ids is not None and s.output_ids is not None
        }
        r, c = _sparse([np.full(len(ids), i) for i, ids in seen.items()], list(seen.values()), device)
        penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=device)
        repetition = (penalty, r, c)
    presence_frequency = None
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        outputs = {i: s.output_ids for i, s in enumerate(specs) if s.output_ids is not None}
        r, c = _sparse(
            [np.full(len(ids), i) for i, ids in outputs.items()] or [np.zeros(0)],
            list(outputs.values()) or [np.zeros(0)],
            device,
        )
        pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device)
        freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device)
        presence_frequency = (pres, freq, r, c)

    return SamplingTensors(
        greedy=torch.from_numpy(greedy).to(device),
        all_greedy=bool(greedy.all()),
        temperature=torch.from_numpy(np.where(greedy, 1.0, temps).astype(np.float32)).to(device),
        uniforms=torch.from_numpy(uniforms).to(device),
        top_k=column(top_k, torch.int64, any_top_k),
        top_p=column(top_p, torch.float32, any_top_p),
        min_p=column(min_p, torch.float32, any_min_p),
        bias=bias,
        suppress=suppress,
        repetition=repetition,
        presence_frequency=presence_frequency,
        want_logprobs=any(s.logprobs or s.top_logprobs for s in specs),
        num_top=max((s.top_logprobs for s in specs), default=0),
        has_placeholders=any(s.output_ids is not None and (s.output_ids < 0).any() for s in specs),
        grammar=grammar,
        grammar_rows=torch.tensor(grammar.rows, device=device) if grammar is not None else None,
    )


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] log-probability of the chosen token
    top_ids: torch.Tensor | None  # [B, N]
    top_logprobs: torch.Tensor | None


def apply_processors(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Penalties, bias and suppression. Bias and suppression write in place: pass a copy when either is set."""
    if st.repetition is not None:
        penalty, rows, ids = st.repetition
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[rows, ids] = True
        p = penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if st.presence_frequency is not None:
        pres, freq, rows, ids = st.presence_frequency
        counts = torch.zeros_like(logits)
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=logits.dtype), accumulate=True)
        logits = logits - freq[:, None] * counts - pres[:, None] * (counts > 0)
    if st.bias is not None:
        rows, ids, values = st.bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if st.suppress is not None:
        rows, ids = st.suppress
        logits[rows, ids] = float("-inf")
    return logits


def _draw(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Inverse-CDF draw for every row from temperature-scaled, filtered logits."""
    logits = logits / st.temperature[:, None]
    u = st.uniforms
    if st.top_k is None and st.top_p is None and st.min_p is None:
        probs = torch.softmax(logits, dim=-1)
        cdf = probs.double().cumsum(dim=-1)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        vocab = torch.arange(probs.shape[-1], device=probs.device)
        last = torch.where(probs > 0, vocab, -1).amax(dim=-1).clamp(min=0)
        return _or_argmax(torch.minimum(pos, last), cdf, logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    if st.top_k is not None:
        k = torch.where(st.top_k > 0, st.top_k, probs.shape[-1])
        keep &= rank[None, :] < k[:, None]
    if st.top_p is not None:  # on the top-k distribution, renormalized (as transformers and vLLM)
        kept = probs * keep
        kept = kept / kept.sum(dim=-1, keepdim=True)
        keep &= (kept.cumsum(dim=-1) - kept) < st.top_p[:, None]
    if st.min_p is not None:
        keep &= probs >= st.min_p[:, None] * probs[:, :1]
    keep[:, 0] = True
    probs = probs * keep
    cdf = probs.double().cumsum(dim=-1)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    pos = torch.minimum(pos, keep.sum(dim=-1) - 1)
    return _or_argmax(order.gather(1, pos[:, None]).squeeze(1), cdf, logits)


def _or_argmax(tokens: torch.Tensor, cdf: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Rows whose distribution is degenerate (NaN, or all -inf) fall back to argmax, so a
    token id is always a valid index, never -1."""
    total = cdf[:, -1]
    return torch.where(torch.isfinite(total) & (total > 0), tokens, greedy(logits))


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first maximal token of each row. NOTE: `max(dim).indices`, not `argmax`: the same ids,
    but argmax runs 2.5x slower on the CPU (1.3 vs 0.5 ms at 64 x 32000), 3% of a decode step."""
    return logits.max(dim=-1).indices


def apply_grammar(logits: torch.Tensor, st: SamplingTensors, in_place: bool) -> torch.Tensor:
    """Tokens a row's grammar refuses get -inf: it can only emit what the grammar allows."""
    assert st.grammar is not None and st.grammar_rows is not None
    st.grammar.ready.wait()
    # On CUDA the bits are pinned: the copy queues behind the forward pass, the host goes on.
    bias = grammar_bias(st.grammar.bits.to(logits.device, non_blocking=True), logits.shape[-1])
    if not in_place:
        logits = logits.clone()
    return logits.index_add_(0, st.grammar_rows, bias)


def sample(raw_logits: torch.Tensor, st: SamplingTensors) -> SampleOutput:
    raw = raw_logits.float()
    in_place = st.bias is not None or st.suppress is not None  # the other processors make new tensors
    logits = apply_processors(raw.clone() if in_place else raw, st)
    if st.grammar is not None:  # raw's own storage only while logprobs need raw intact
        logits = apply_grammar(logits, st, in_place=logits is not raw or not st.want_logprobs)
    tokens = greedy(logits)
    if not st.all_greedy:
        tokens = torch.where(st.greedy, tokens, _draw(logits, st))
    logprobs = top_ids = top_lps = None
    if st.want_logprobs:
        # Logprobs are of the model's raw distribution, before penalties, bias and temperature.
        all_lps = torch.log_softmax(raw, dim=-1)
        logprobs = all_lps.gather(1, tokens[:, None]).squeeze(1)
        if st.num_top:
            top_lps, top_ids = all_lps.topk(st.num_top, dim=-1)
    return SampleOutput(tokens, logprobs, top_ids, top_lps)
