// AVX2 helpers shared by the CPU kernels.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

// Lane sum in one fixed tree: (l0+l4, l1+l5, l2+l6, l3+l7) -> (a0+a2, a1+a3) -> b0+b1.
// Fixed, so that a sum never depends on which kernel or thread computed it.
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

// SwiGLU's activation, one definition for the kernels that fuse it.
static inline float silu(float s) { return s / (1.0f + std::exp(-s)); }

// What a linear kernel does with its outputs: store them (plus bias), add a residual, or
// combine gate and up rows by SwiGLU. One numbering for the bfloat16 and quantized kernels.
enum Epi : int { EPI_NONE = 0, EPI_ADD = 1, EPI_SWIGLU = 2 };

// R rows of x from `x` (row stride xs) against weights that an earlier pass widened into
// `wide` (in L1), 32 floats a step for steps s0..s1: the 8-lane group j of step s is
// multiplied by x at s * XStep + j * XJ, into accumulator j of its row. No widening and
// no packed stream here, so 3 rows (12 accumulators) fit the 16 registers. The
// accumulators live in `accs` (4 a row) between calls, and each takes its products with s
// ascending, as in the widening pass: the same sums, rounded alike, for every row.
template <int R, int64_t XStep, int64_t XJ>
static inline void wide_products(const float* x, int64_t xs, int64_t s0, int64_t s1,
                                 const float* wide, __m256* accs) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = accs[r * 4 + j];
  for (int64_t s = s0; s < s1; ++s)
    for (int j = 0; j < 4; ++j) {
      const __m256 w = _mm256_load_ps(wide + (s - s0) * 32 + j * 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * xs + s * XStep + j * XJ);
        acc[r][j] = _mm256_fmadd_ps(xv, w, acc[r][j]);
      }
    }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) accs[r * 4 + j] = acc[r][j];
}

// `wide_products` for rows r0..m-1, three at a time while they last, then 2 or 1.
template <int64_t XStep, int64_t XJ>
static inline void wide_rows(const float* x, int64_t xs, int64_t r0, int64_t m, int64_t s0,
                             int64_t s1, const float* wide, __m256* accs) {
  int64_t r = r0;
  for (; r + 3 <= m; r += 3)
    wide_products<3, XStep, XJ>(x + r * xs, xs, s0, s1, wide, accs + r * 4);
  if (r + 2 <= m) wide_products<2, XStep, XJ>(x + r * xs, xs, s0, s1, wide, accs + r * 4), r += 2;
  if (r < m) wide_products<1, XStep, XJ>(x + r * xs, xs, s0, s1, wide, accs + r * 4);
}
