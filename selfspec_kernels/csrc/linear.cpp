#include <immintrin.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace linear {

// The packed layout, [groups, ks, ROWS / 2, STEP, 2]: a group is ROWS weight rows (two
// pairs, each pair interleaved so that one 32-bit lane holds both rows' bfloat16) and a
// k-step is STEP columns (one 8-lane vector). The loops below are written for these
// values; Python packs by them (exported as GROUP_ROWS and STEP_COLUMNS, bindings.cpp).
constexpr int64_t ROWS = 4;
constexpr int64_t STEP = 8;

struct Args {
  const float* x;  // [m, ks * 8], row stride xs, zero past K
  int64_t xs;
  const uint16_t* w;   // packed bfloat16 bits [groups, ks, 2, 8, 2]
  const float* bias;   // [n] or null
  const float* other;  // [m, n] contiguous residual, or null
  float* y;            // [m, n] contiguous
  int64_t m, n, ks, groups;
  int epi;
};

// Software prefetch distance along a group's stream, in bytes: with it a thread reads
// about a tenth faster than with the hardware prefetchers alone.
constexpr int64_t PREFETCH = 1024;

// The epilogue for row `row` of group g, from its 4 outputs' 8-lane accumulators.
static inline void finish(const Args& a, int64_t row, int64_t g, const __m256* acc) {
  float v[4];
  for (int j = 0; j < 4; ++j) v[j] = hsum8(acc[j]);
  if (a.epi == EPI_SWIGLU) {  // the group is gate rows 2g, 2g+1 then up rows 2g, 2g+1
    for (int j = 0; j < 2; ++j)
      if (2 * g + j < a.n) a.y[row * a.n + 2 * g + j] = silu(v[j]) * v[2 + j];
    return;
  }
  for (int j = 0; j < 4; ++j) {
    const int64_t col = 4 * g + j;
    if (col >= a.n) break;
    float s = a.bias ? v[j] + a.bias[col] : v[j];
    if (a.epi == EPI_ADD) s += a.other[row * a.n + col];
    a.y[row * a.n + col] = s;
  }
}

// Steps s0..s1 of rows r0..r0+R against group g's packed stream `wg`, into `acc`. One
// k-step of a group is one 64-byte line: two 32-byte loads, each holding two rows'
// bfloat16 interleaved, so the low halves widen to float32 by a shift and the high
// halves by a mask. With `Keep`, the widened lines are also kept in `wide` (4 x 8 floats
// a step) for the other rows.
template <int R, bool Keep>
static inline void stream_steps(const Args& a, int64_t r0, const uint16_t* wg, int64_t s0,
                                int64_t s1, float* wide, __m256 (&acc)[R][4]) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t s = s0; s < s1; ++s) {
    const uint16_t* ws = wg + s * 32;
    _mm_prefetch(reinterpret_cast<const char*>(ws) + PREFETCH, _MM_HINT_NTA);
    const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws));
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + 16));
    const __m256 w[4] = {_mm256_castsi256_ps(_mm256_slli_epi32(p, 16)),
                         _mm256_castsi256_ps(_mm256_and_si256(p, high)),
                         _mm256_castsi256_ps(_mm256_slli_epi32(q, 16)),
                         _mm256_castsi256_ps(_mm256_and_si256(q, high))};
    if (Keep)
      for (int j = 0; j < 4; ++j) _mm256_store_ps(wide + (s - s0) * 32 + j * 8, w[j]);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(a.x + (r0 + r) * a.xs + s * 8);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
    }
  }
}

// One or two rows: the whole group from the stream, accumulators in registers.
template <int R>
static inline void few_rows(const Args& a, int64_t g, const uint16_t* wg) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  stream_steps<R, false>(a, 0, wg, 0, a.ks, nullptr, acc);
  for (int r = 0; r < R; ++r) finish(a, r, g, acc[r]);
}

constexpr int64_t CHUNK = 32;  // k-steps of a group widened and used at a time

// Three rows or more: the group goes CHUNK steps at a time. Rows 0-1 read a chunk from
// the stream and keep it widened in `wide`; the other rows take it from there three at a
// time. So the widening is done once, and the stream is read at a steady pace while the
// arithmetic runs. `accs` holds 4 accumulators per row of x.
static void many_rows(const Args& a, int64_t g, const uint16_t* wg, float* wide, __m256* accs) {
  for (int64_t i = 0; i < a.m * 4; ++i) accs[i] = _mm256_setzero_ps();
  for (int64_t s0 = 0; s0 < a.ks; s0 += CHUNK) {
    const int64_t s1 = std::min(a.ks, s0 + CHUNK);
    __m256 acc[2][4];
    for (int j = 0; j < 8; ++j) acc[j / 4][j % 4] = accs[j];
    stream_steps<2, true>(a, 0, wg, s0, s1, wide, acc);
    for (int j = 0; j < 8; ++j) accs[j] = acc[j / 4][j % 4];
    // The other rows: every output column's 8 lanes of a step take the same 8 of x.
    wide_rows<STEP, 0>(a.x, a.xs, 2, a.m, s0, s1, wide, accs);
  }
  for (int64_t r = 0; r < a.m; ++r) finish(a, r, g, accs + r * 4);
}

// All rows of x against groups g0..g1. Every output's accumulator takes the same
// products in the same order whichever tile computes it: that is the row invariance.
static void groups(const Args& a, int64_t g0, int64_t g1, float* wide, __m256* accs) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* wg = a.w + g * a.ks * 32;
    if (a.m == 1)
      few_rows<1>(a, g, wg);
    else if (a.m == 2)
      few_rows<2>(a, g, wg);
    else
      many_rows(a, g, wg, wide, accs);
  }
}

constexpr int64_t BLOCK = 6;  // groups (24 weight rows) per unit of work

// The groups split among threads in blocks, handed out as threads come for them, in
// chunks that shrink as the work runs out (`guided`): a thread slowed by the machine's
// other load takes fewer, where a static split would have the pass wait for it. Which
// thread computes an output does not change its value.
static void run(const Args& a) {
  const int64_t nblocks = (a.groups + BLOCK - 1) / BLOCK;
  int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  nt = std::min(nt, nblocks);
  if (a.groups * a.ks * a.m < (int64_t(1) << 10)) nt = 1;  // too small to be worth a wake-up
#pragma omp parallel num_threads(static_cast<int>(nt)) if (nt > 1)
  {
    // Each thread's widened chunk (32 floats a k-step) and accumulators, 32-byte aligned.
    std::vector<__m256> wide(a.m > 2 ? CHUNK * 4 : 0), accs(a.m > 2 ? a.m * 4 : 0);
#pragma omp for schedule(guided)
    for (int64_t b = 0; b < nblocks; ++b)
      groups(a, b * BLOCK, std::min<int64_t>(a.groups, (b + 1) * BLOCK),
             reinterpret_cast<float*>(wide.data()), accs.data());
  }
}

// x copied to [m, ks * 8], zero past K, each row scaled by 1 / sqrt(n_eps + sum x^2)
// and by the gain when `norm`: an RMSNorm whose sum has one fixed order per row.
static std::vector<float> prepare(const at::Tensor& x, int64_t ks, bool norm, const float* gain,
                                  double n_eps) {
  const int64_t m = x.size(0), K = x.size(1), K8 = K & ~int64_t(7), xs = x.stride(0);
  const float* src = x.data_ptr<float>();
  std::vector<float> out(m * ks * 8, 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = src + r * xs;
    float scale = 1.0f;
    if (norm) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t k = 0; k < K8; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum8(acc);
      for (int64_t k = K8; k < K; ++k) ss = std::fma(xr[k], xr[k], ss);
      scale = 1.0f / std::sqrt(static_cast<float>(n_eps) + ss);
    }
    float* o = out.data() + r * ks * 8;
    for (int64_t k = 0; k < K; ++k) o[k] = gain ? xr[k] * scale * gain[k] : xr[k] * scale;
  }
  return out;
}

at::Tensor linear_bf16_epi(const at::Tensor& x, const at::Tensor& w, int64_t n,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& other, bool norm,
                           const std::optional<at::Tensor>& gain, double n_eps, int64_t epi) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "cpu_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "cpu_linear: x must be a 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1, "cpu_linear: x rows must be contiguous");
  TORCH_CHECK(epi >= EPI_NONE && epi <= EPI_SWIGLU, "cpu_linear: unknown epilogue ", epi);
  TORCH_CHECK(w.dim() == 5 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                  w.size(2) == ROWS / 2 && w.size(3) == STEP && w.size(4) == 2,
              "cpu_linear: w must be packed by cpu_linear.pack, got ", w.sizes(), " ",
              w.scalar_type());
  const int64_t m = x.size(0), K = x.size(1), groups = w.size(0), ks = w.size(1);
  const int64_t per_group = epi == EPI_SWIGLU ? ROWS / 2 : ROWS;  // outputs per group
  TORCH_CHECK(n > 0 && (n + per_group - 1) / per_group == groups, "cpu_linear: ", n,
              " outputs do not fit a packed weight of ", groups, " groups");
  TORCH_CHECK(K > (ks - 1) * 8 && K <= ks * 8, "cpu_linear: x is [", m, ", ", K,
              "] but the packed weight takes ", ks * 8 - 7, "..", ks * 8, " columns");
  Args a{};
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(epi != EPI_SWIGLU, "cpu_linear: the SwiGLU epilogue takes no bias");
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->numel() == n,
                "cpu_linear: bias must be a contiguous float32 [", n, "] tensor");
    a.bias = bias->data_ptr<float>();
  }
  if (epi == EPI_ADD) {
    TORCH_CHECK(other.has_value() && other->defined(), "cpu_linear: epilogue needs a tensor");
    TORCH_CHECK(other->device().is_cpu() && other->scalar_type() == at::kFloat &&
                    other->is_contiguous() && other->dim() == 2 && other->size(0) == m &&
                    other->size(1) == n,
                "cpu_linear: residual must be contiguous float32 [", m, ", ", n, "], got ",
                other->sizes(), " ", other->scalar_type());
    a.other = other->data_ptr<float>();
  }
  const float* g = nullptr;
  if (gain.has_value() && gain->defined()) {
    TORCH_CHECK(gain->device().is_cpu() && gain->scalar_type() == at::kFloat &&
                    gain->is_contiguous() && gain->numel() == K,
                "cpu_linear: gain must be a contiguous float32 [", K, "] tensor");
    g = gain->data_ptr<float>();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  std::vector<float> padded;
  if (norm || g || K != ks * 8) {
    padded = prepare(x, ks, norm, g, n_eps);
    a.x = padded.data();
    a.xs = ks * 8;
  } else {
    a.x = x.data_ptr<float>();
    a.xs = x.stride(0);
  }
  a.w = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  a.y = y.data_ptr<float>();
  a.m = m;
  a.n = n;
  a.ks = ks;
  a.groups = groups;
  a.epi = static_cast<int>(epi);
  run(a);
  return y;
}

// One entry point per epilogue: Python names the epilogue by the function it calls, and
// the numbers of `Epi` (simd.h) stay in C++.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w, int64_t n,
                       const std::optional<at::Tensor>& bias, bool norm,
                       const std::optional<at::Tensor>& gain, double n_eps) {
  return linear_bf16_epi(x, w, n, bias, std::nullopt, norm, gain, n_eps, EPI_NONE);
}

at::Tensor linear_bf16_add(const at::Tensor& x, const at::Tensor& w, int64_t n,
                           const std::optional<at::Tensor>& bias, const at::Tensor& residual) {
  return linear_bf16_epi(x, w, n, bias, residual, false, std::nullopt, 0.0, EPI_ADD);
}

at::Tensor linear_bf16_swiglu(const at::Tensor& x, const at::Tensor& w, int64_t n, bool norm,
                              const std::optional<at::Tensor>& gain, double n_eps) {
  return linear_bf16_epi(x, w, n, std::nullopt, std::nullopt, norm, gain, n_eps, EPI_SWIGLU);
}

}  // namespace linear
