// AVX2 helpers shared by the CPU kernels.
#pragma once

#include <immintrin.h>

#include <cmath>

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
