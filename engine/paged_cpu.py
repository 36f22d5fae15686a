"""A fused paged decode-attention kernel for the CPU, compiled on first use.

Decode attention on the CPU is bound by KV memory traffic: gathering each row's blocks into a
contiguous copy and then running SDPA over it moves the K/V three times. This kernel walks
each row's slots in place (OpenMP over rows, online softmax over chunks of 32 keys, one pass
over K and V)
and reads every byte once. Built with torch's C++ extension loader (g++ and ninja), cached
under torch's extensions directory; where it cannot be built, or TANDEM_CPU_KERNEL=0, the
gather + SDPA path is used instead.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable

import structlog

log = structlog.get_logger("tandem.engine")

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>

// q [B, H, D]; k, v [S, KVH, D]; slots [B, L] (row b reads slots[b, :lens[b]]); out [B, H, D]
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                           torch::Tensor lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && slots.is_contiguous() && lens.is_contiguous());
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == torch::kFloat && v.scalar_type() == torch::kFloat);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), L = slots.size(1);
  const int64_t G = H / KVH;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  constexpr int64_t C = 32;  // keys scored together: one max and one rescale per chunk
  // One task per row, all heads: a chunk's slots (every KV head) are read once, in order.
  #pragma omp parallel for schedule(dynamic)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<float> acc(H * D, 0.f), m(H, -INFINITY), l(H, 0.f), sc_buf(H * C);
    const int64_t n = std::min(lp[b], L);
    const int64_t* row = sp + b * L;
    for (int64_t t0 = 0; t0 < n; t0 += C) {
      const int64_t c = std::min(C, n - t0);
      for (int64_t j = 0; j < c; ++j) {
        const float* ks = kp + row[t0 + j] * KVH * D;
        for (int64_t h = 0; h < H; ++h) {
          const float* qr = qp + (b * H + h) * D;
          const float* kr = ks + (h / G) * D;
          float dot = 0.f;
          #pragma omp simd reduction(+:dot)
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kr[d];
          sc_buf[h * C + j] = dot * sc;
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* sh = sc_buf.data() + h * C;
        float mx = m[h];
        for (int64_t j = 0; j < c; ++j) mx = std::max(mx, sh[j]);
        const float corr = std::exp(m[h] - mx);
        float sum = 0.f;
        for (int64_t j = 0; j < c; ++j) { sh[j] = std::exp(sh[j] - mx); sum += sh[j]; }
        l[h] = l[h] * corr + sum;
        m[h] = mx;
        float* a = acc.data() + h * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= corr;
      }
      for (int64_t j = 0; j < c; ++j) {
        const float* vs = vp + row[t0 + j] * KVH * D;
        for (int64_t h = 0; h < H; ++h) {
          const float p = sc_buf[h * C + j];
          const float* vr = vs + (h / G) * D;
          float* a = acc.data() + h * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * vr[d];
        }
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      float* o = op + (b * H + h) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[h * D + d] / l[h];
    }
  }
  return out;
}
"""


@functools.cache
def decode_kernel() -> Callable | None:
    """The compiled kernel, or None (disabled, or it cannot be built here)."""
    if os.environ.get("TANDEM_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline("tandem_paged_cpu_v3", cpp_sources=_SOURCE, functions=["paged_decode"],
                             extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja...: the portable path serves
        log.warning("cpu_kernel_unavailable", error=repr(exc)[:300])
        return None
    return module.paged_decode
