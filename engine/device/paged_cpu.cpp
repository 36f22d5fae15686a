// Fused paged decode attention for the CPU; built and loaded by paged_cpu.py (see its docstring).
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

constexpr int64_t C = 16;        // keys scored together: one max and one rescale per chunk
constexpr int64_t AHEAD = 4;     // slots prefetched ahead: the cache is read in a data-dependent order
constexpr int64_t MAX_GD = 4096; // query heads per KV head x head dim, the value accumulator's size

template <typename KT>
static inline void prefetch(const KT* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < n * int64_t(sizeof(KT)); o += 64) __builtin_prefetch(b + o);  // one 64-byte line
}

// K/V elements to float: float32 pools as they are, bfloat16 pools (raw bits) widened: the
// top 16 bits of a float32. Half the bytes to read, and decode attention is bound by reading.
static inline float to_f(float x) { return x; }
static inline float to_f(uint16_t x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Scratch {
  std::vector<float> s, acc, m, l, corr;
  Scratch(int64_t H, int64_t D) : s(H * C), acc(H * D), m(H), l(H), corr(H) {}
};

// One decode row: q [H, D] attends over the cache slots row[0..n) -> out [H, D].
// DT, GT > 0 fix the head dim and group size at compile time (the value accumulator then lives
// in registers); 0 reads them from D, G.
template <typename KT, int64_t DT, int64_t GT>
static void attend_row(const float* q, const KT* kp, const KT* vp, const int64_t* row, int64_t n,
                       int64_t KVH, int64_t Drt, int64_t Grt, float sc, float* out, Scratch& w) {
  const int64_t D = DT ? DT : Drt, G = GT ? GT : Grt, H = KVH * G, W = KVH * D;
  float *s = w.s.data(), *acc = w.acc.data(), *m = w.m.data(), *l = w.l.data(), *corr = w.corr.data();
  std::fill(acc, acc + H * D, 0.f);
  std::fill(l, l + H, 0.f);
  for (int64_t j = 0; j < std::min(AHEAD, n); ++j) {
    prefetch(kp + row[j] * W, W);
    prefetch(vp + row[j] * W, W);
  }
  for (int64_t t0 = 0; t0 < n; t0 += C) {
    const int64_t c = std::min(C, n - t0);
    for (int64_t j = 0; j < c; ++j) {  // scores: every head against key j
      if (t0 + j + AHEAD < n) {
        prefetch(kp + row[t0 + j + AHEAD] * W, W);
        prefetch(vp + row[t0 + j + AHEAD] * W, W);  // read after this chunk's scores
      }
      const KT* ks = kp + row[t0 + j] * W;
      for (int64_t h = 0; h < H; ++h) {
        const float* qr = q + h * D;
        const KT* kr = ks + (h / G) * D;
        float dot = 0.f;
        #pragma omp simd reduction(+:dot)
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * to_f(kr[d]);
        s[h * C + j] = dot * sc;
      }
    }
    for (int64_t h = 0; h < H; ++h) {  // online softmax: the first chunk sets the running max
      float* sh = s + h * C;
      float mx = t0 == 0 ? sh[0] : m[h];
      for (int64_t j = 0; j < c; ++j) mx = std::max(mx, sh[j]);
      corr[h] = t0 == 0 ? 0.f : std::exp(m[h] - mx);
      float sum = 0.f;
      #pragma omp simd reduction(+:sum)
      for (int64_t j = 0; j < c; ++j) { sh[j] = std::exp(sh[j] - mx); sum += sh[j]; }
      l[h] = l[h] * corr[h] + sum;
      m[h] = mx;
    }
    for (int64_t kh = 0; kh < KVH; ++kh) {  // values: each KV head's G query heads at once
      alignas(64) float a[DT && GT ? GT * DT : MAX_GD];
      for (int64_t g = 0; g < G; ++g) {
        const float cr = corr[kh * G + g];
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[g * D + d] = acc[(kh * G + g) * D + d] * cr;
      }
      for (int64_t j = 0; j < c; ++j) {
        const KT* vr = vp + row[t0 + j] * W + kh * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[(kh * G + g) * C + j];
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[g * D + d] += p * to_f(vr[d]);
        }
      }
      std::copy(a, a + G * D, acc + kh * G * D);
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // a row with no context yields zeros
    #pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = acc[h * D + d] * inv;
  }
}

template <typename KT>
using RowFn = decltype(&attend_row<KT, 0, 0>);

template <typename KT>
static RowFn<KT> pick(int64_t D, int64_t G) {
#define TANDEM_SHAPE(d, g) if (D == d && G == g) return &attend_row<KT, d, g>;
  TANDEM_SHAPE(64, 1) TANDEM_SHAPE(64, 2) TANDEM_SHAPE(64, 4) TANDEM_SHAPE(64, 8)
  TANDEM_SHAPE(128, 1) TANDEM_SHAPE(128, 2) TANDEM_SHAPE(128, 4) TANDEM_SHAPE(128, 8)
#undef TANDEM_SHAPE
  return &attend_row<KT, 0, 0>;
}

template <typename KT>
static void decode_rows(const float* qp, const KT* kp, const KT* vp, const int64_t* sp, const int64_t* lp,
                        int64_t B, int64_t H, int64_t D, int64_t KVH, int64_t L, float scale, float* op) {
  const int64_t G = H / KVH;
  const RowFn<KT> fn = pick<KT>(D, G);
  // Longest rows first: with one task per row, a long row taken last would leave a thread idle.
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return lp[a] > lp[b]; });
  #pragma omp parallel
  {
    Scratch w(H, D);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < B; ++i) {
      const int64_t b = order[i];
      fn(qp + b * H * D, kp, vp, sp + b * L, std::min(lp[b], L), KVH, D, G, scale, op + b * H * D, w);
    }
  }
}

// q [B, H, D] float32; k, v [S, KVH, D] float32 or bfloat16; slots [B, L] (row b reads
// slots[b, :lens[b]]); out [B, H, D] float32. Scores and sums in float32 either way.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor slots,
                           torch::Tensor lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && slots.is_contiguous() && lens.is_contiguous());
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k.scalar_type() == v.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), L = slots.size(1);
  TORCH_CHECK(H % KVH == 0 && H / KVH * D <= MAX_GD, "unsupported head layout");
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const int64_t *sp = slots.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  if (k.scalar_type() == torch::kFloat) {
    decode_rows<float>(qp, k.data_ptr<float>(), v.data_ptr<float>(), sp, lp, B, H, D, KVH, L, sc, op);
  } else {
    TORCH_CHECK(k.scalar_type() == torch::kBFloat16, "K/V pools must be float32 or bfloat16");
    const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
    const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
    decode_rows<uint16_t>(qp, kp, vp, sp, lp, B, H, D, KVH, L, sc, op);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention over cache slots");
}
