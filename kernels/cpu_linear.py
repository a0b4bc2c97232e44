"""A bfloat16-weight linear layer for small batches on x86 CPUs with AVX2 and FMA.

`y = x @ w.T` with `w` bfloat16 `[N, K]`, `x` float32 `[m, K]`, `y` float32 `[m, N]`.
Decoding a few tokens at a time is bound by reading the weights, so the kernel reads
each weight row from memory once for all `m` rows of `x`, widens bfloat16 to float32
in registers (a bfloat16 is the top half of a float32) and accumulates in float32
with FMA. PyTorch's own paths read twice the bytes (float32 weights) or redo the
emulated bfloat16 product once per row.

Row invariance: row `r` of the result depends only on `x[r]` and `w`, bit for bit,
whatever `m` is, whatever the other rows hold and however the work is split among
threads. Each output `(r, n)` has its own 8-lane accumulator that takes the products
of `k = 0, 8, 16, ...` in order, is summed across lanes in a fixed tree, then takes the
`K % 8` leftover products one by one with scalar FMA; tiling only chooses which
outputs are computed side by side. Run to run the result is deterministic.

Work: the weight rows are split among `torch.get_num_threads()` OpenMP threads in
blocks of 24; within a block, tiles of 4 rows of `x` by 3 weight rows keep 12
accumulators in registers, and each weight row is prefetched 8 KiB ahead. `m` may be
anything; the kernel is meant for m <= 16 or so, where it beats PyTorch's paths.

The C++ source is compiled on first use with `torch.utils.cpp_extension.load_inline`
(cached in torch's extension directory; needs a C++ compiler and `ninja`) and
registered as `torch.ops.selfspec_cpu_linear.linear_bf16_epi`.
`available()` says whether it could be built here; it never raises.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading

import torch

__all__ = [
    "available",
    "unavailable_reason",
    "linear_bf16",
    "linear_bf16_add",
    "linear_bf16_silu",
    "linear_bf16_mul",
    "linear_bf16_reference",
]

# Epilogues, applied per output after the bias: keep in step with `enum Epi` below.
EPI_NONE, EPI_ADD, EPI_SILU, EPI_MUL = 0, 1, 2, 3

_SOURCE = r"""
// Only the headers needed (not <torch/extension.h>): the first build takes a quarter
// of the time. The op is registered with the dispatcher: torch.ops.selfspec_cpu_linear.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

enum Epi : int { EPI_NONE = 0, EPI_ADD = 1, EPI_SILU = 2, EPI_MUL = 3 };

struct Args {
  const float* x;         // [m, K], row stride xs
  int64_t xs;
  const uint16_t* w;      // [N, K] bfloat16 bits, contiguous
  const float* bias;      // [N] or null
  const float* other;     // [m, N] contiguous (residual or multiplier) or null
  float* y;               // [m, N] contiguous
  int64_t m, N, K;
  int epi;
};

// Widen 8 bfloat16 to 8 float32: zero-extend to 32 bits, shift into the top half.
static inline __m256 load_bf16x8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Lane sum in one fixed tree: (l0+l4, l1+l5, l2+l6, l3+l7) -> (a0+a2, a1+a3) -> b0+b1.
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}

static inline float finish(const Args& a, float s, int64_t r, int64_t n) {
  if (a.bias) s += a.bias[n];
  switch (a.epi) {
    case EPI_ADD: return s + a.other[r * a.N + n];
    case EPI_SILU: return s / (1.0f + std::exp(-s));
    case EPI_MUL: return s * a.other[r * a.N + n];
    default: return s;
  }
}

// Software prefetch distance along a weight row, in elements (8 KiB): the hardware
// prefetchers alone leave a single core at about half the bandwidth of a plain sum.
// Prefetches never fault, so running past the end of the matrix is harmless.
constexpr int64_t PREFETCH = 4096;

// Outputs (r0..r0+R) x (n0..n0+NB): each weight vector is loaded and widened once
// for the R rows of x; R * NB accumulators stay in registers.
template <int R, int NB>
static inline void tile(const Args& a, int64_t r0, int64_t n0) {
  const int64_t K = a.K, K8 = K & ~int64_t(7);
  const uint16_t* wb = a.w + n0 * K;
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = a.x + (r0 + r) * a.xs;
  __m256 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    if ((k & 31) == 0)  // one cache line of each weight row per 4 steps
      for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(
                         reinterpret_cast<uintptr_t>(wb + j * K + k) + 2 * PREFETCH),
                     _MM_HINT_T0);
    __m256 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load_bf16x8(wb + j * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(xr[r] + k);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NB; ++j) {
      float s = hsum8(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) s = std::fma(xr[r][k], bf16_to_f32(wb[j * K + k]), s);
      a.y[(r0 + r) * a.N + n0 + j] = finish(a, s, r0 + r, n0 + j);
    }
  }
}

// Rows r0..r0+rows of x, rows < R: those left over after the full tiles.
template <int R, int NB>
static inline void tail_rows(const Args& a, int64_t rows, int64_t r0, int64_t n) {
  if constexpr (R > 1) {
    if (rows == R - 1) return tile<R - 1, NB>(a, r0, n);
    return tail_rows<R - 1, NB>(a, rows, r0, n);
  }
}

// All rows of x against weight rows n0..n0+nb, in tiles of R rows x NB weight rows.
// The block's weights are read from memory by the first tile, from cache after.
template <int R, int NB>
static void rows_block(const Args& a, int64_t n0, int64_t nb) {
  int64_t n = n0;
  for (; n + NB <= n0 + nb; n += NB) {
    int64_t r = 0;
    for (; r + R <= a.m; r += R) tile<R, NB>(a, r, n);
    if (r < a.m) tail_rows<R, NB>(a, a.m - r, r, n);
  }
  for (; n < n0 + nb; ++n) {
    int64_t r = 0;
    for (; r + R <= a.m; r += R) tile<R, 1>(a, r, n);
    if (r < a.m) tail_rows<R, 1>(a, a.m - r, r, n);
  }
}

constexpr int BLOCK = 24;  // weight rows per unit of work

// The weight rows split among threads in blocks of BLOCK, statically: which thread
// computes an output does not change its value.
template <int R, int NB>
static void run_tiles(const Args& a) {
  const int64_t nblocks = (a.N + BLOCK - 1) / BLOCK;
  int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  nt = std::min(nt, nblocks);
  if (a.N * a.K * a.m < (int64_t(1) << 15)) nt = 1;  // too small to be worth a wake-up
#pragma omp parallel for num_threads(static_cast<int>(nt)) schedule(static) if (nt > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t n0 = b * BLOCK;
    rows_block<R, NB>(a, n0, std::min<int64_t>(BLOCK, a.N - n0));
  }
}

// One tile shape for every m, the fastest measured on Zen 3 for m = 1..16 (with m = 1
// and 2 as fast as 1x8 or 2x4 tiles). Any shape gives the same bits (see the module
// docstring); only the speed differs.
static void run(const Args& a) {
  run_tiles<4, 3>(a);  // 12 accumulators + 3 weight vectors + x: the 16 ymm registers
}

}  // namespace

at::Tensor linear_bf16_epi(const at::Tensor& x, const at::Tensor& w,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& other, int64_t epi) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "cpu_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "cpu_linear: x must be a 2-D float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1, "cpu_linear: x rows must be contiguous");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "cpu_linear: w must be a contiguous 2-D bfloat16 tensor, got ", w.sizes(), " ",
              w.scalar_type());
  const int64_t m = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "cpu_linear: x is [", m, ", ", K, "] but w is ", w.sizes());
  TORCH_CHECK(epi >= EPI_NONE && epi <= EPI_MUL, "cpu_linear: unknown epilogue ", epi);
  Args a{};
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                    bias->is_contiguous() && bias->numel() == N,
                "cpu_linear: bias must be a contiguous float32 [", N, "] tensor");
    a.bias = bias->data_ptr<float>();
  }
  if (epi == EPI_ADD || epi == EPI_MUL) {
    TORCH_CHECK(other.has_value() && other->defined(), "cpu_linear: epilogue needs a tensor");
    TORCH_CHECK(other->device().is_cpu() && other->scalar_type() == at::kFloat &&
                    other->is_contiguous() && other->dim() == 2 && other->size(0) == m &&
                    other->size(1) == N,
                "cpu_linear: epilogue tensor must be contiguous float32 [", m, ", ", N, "], got ",
                other->sizes(), " ", other->scalar_type());
    a.other = other->data_ptr<float>();
  }
  at::Tensor y = at::empty({m, N}, x.options());
  if (m == 0 || N == 0) return y;
  a.x = x.data_ptr<float>();
  a.xs = x.stride(0);
  a.w = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  a.y = y.data_ptr<float>();
  a.m = m;
  a.N = N;
  a.K = K;
  a.epi = static_cast<int>(epi);
  run(a);
  return y;
}

TORCH_LIBRARY(selfspec_cpu_linear, m) {
  m.def("linear_bf16_epi(Tensor x, Tensor w, Tensor? bias, Tensor? other, int epi) -> Tensor");
}

TORCH_LIBRARY_IMPL(selfspec_cpu_linear, CPU, m) { m.impl("linear_bf16_epi", &linear_bf16_epi); }
"""

_lock = threading.Lock()
_ext = None
_error: str | None = None


def _cpu_supported() -> str | None:
    """None when this CPU has AVX2 and FMA, else why not."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    missing = {"avx2", "fma"} - flags
                    return f"CPU lacks {', '.join(sorted(missing))}" if missing else None
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX2", "AVX512"):
        return None  # every x86 CPU with AVX2 that PyTorch dispatches to also has FMA
    return f"CPU capability is {cap}, not AVX2"


def _find_ninja() -> str | None:
    """None when ninja can be run, else why not. torch runs `ninja` from PATH: add the
    venv's bin folder (where the `ninja` PyPI package puts it) when PATH lacks it."""
    if shutil.which("ninja"):
        return None
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore[import-not-found]

        dirs.append(getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    for d in dirs:
        if d and shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return None
    return "ninja not found (pip install ninja)"


def _load():
    """The compiled extension, built on first call; raises RuntimeError when it can't be."""
    global _ext, _error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            reason = None
            if os.environ.get("SELFSPEC_NO_CPU_KERNEL"):
                reason = "disabled by SELFSPEC_NO_CPU_KERNEL"
            reason = reason or _cpu_supported() or _find_ninja()
            if reason is None:
                try:
                    from torch.utils.cpp_extension import load_inline

                    load_inline(
                        name="selfspec_cpu_linear",
                        cpp_sources=[_SOURCE],
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                        extra_ldflags=["-fopenmp"],
                        is_python_module=False,  # loaded into torch.ops instead
                        no_implicit_headers=True,
                        verbose=False,
                    )
                    _ext = torch.ops.selfspec_cpu_linear
                except Exception as e:  # any build failure means "unavailable"
                    reason = f"build failed: {type(e).__name__}: {str(e)[-2000:]}"
            _error = reason
    if _ext is None:
        raise RuntimeError(f"cpu_linear unavailable: {_error}")
    return _ext


def available() -> bool:
    """True when the kernel runs here: AVX2 and FMA, and the extension builds. Never raises."""
    try:
        _load()
        return True
    except Exception:
        return False


def unavailable_reason() -> str | None:
    """Why `available()` is False (after calling it), or None."""
    return None if available() else _error


def _run(x, w, bias, other, epi: int) -> torch.Tensor:
    return _load().linear_bf16_epi(x, w, bias, other, epi)


def linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """`x @ w.float().T (+ bias)`: x float32 [m, K], w bfloat16 [N, K], bias float32 [N]."""
    return _run(x, w, bias, None, EPI_NONE)


def linear_bf16_add(
    x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None = None
):
    """`linear_bf16(x, w, bias) + residual`, residual float32 [m, N], in one pass."""
    return _run(x, w, bias, residual, EPI_ADD)


def linear_bf16_silu(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """`silu(linear_bf16(x, w, bias))` in one pass."""
    return _run(x, w, bias, None, EPI_SILU)


def linear_bf16_mul(
    x: torch.Tensor, w: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None = None
):
    """`linear_bf16(x, w, bias) * other`, other float32 [m, N], in one pass."""
    return _run(x, w, bias, other, EPI_MUL)


def linear_bf16_reference(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain PyTorch definition the kernel is tested against."""
    y = x @ w.float().T
    return y if bias is None else y + bias
