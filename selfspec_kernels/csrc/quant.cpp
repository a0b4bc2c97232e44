#include <immintrin.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <utility>
#include <vector>

#include "simd.h"

namespace quant {

// The GGUF block formats, by their ggml type ids (gguf.GGMLQuantizationType), which
// selfspec_kernels/cpu_quant.py passes with each matrix: the row length can't tell them
// apart (a Q4_K block is 256 weights in 144 bytes, as eight Q4_0 blocks are).
enum Format : int {
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14
};
constexpr int64_t QK = 32;  // weights per sub-block: what `dequant` yields at a time

// Each format's bytes per block and its sub-blocks of QK weights (the K formats'
// super-blocks hold 8): the one list of the formats, which `run_format` dispatches over.
struct FormatInfo {
  int format;
  int64_t bytes, subs;
};
constexpr FormatInfo FORMATS[] = {{Q4_0, 18, 1}, {Q4_1, 20, 1},  {Q5_0, 22, 1},  {Q5_1, 24, 1},
                                  {Q8_0, 34, 1}, {Q4_K, 144, 8}, {Q5_K, 176, 8}, {Q6_K, 210, 8}};

// Format f's entry; an unknown f gets 0 bytes (what `linear_q_epi` checks) and 1 sub-block.
constexpr FormatInfo info(int64_t f) {
  for (const FormatInfo& i : FORMATS)
    if (i.format == f) return i;
  return {0, 0, 1};
}
constexpr int64_t block_bytes(int64_t f) { return info(f).bytes; }
constexpr int64_t subs(int64_t f) { return info(f).subs; }

struct Args {
  const float* x;  // [m, K], row stride xs
  int64_t xs;
  const uint8_t* w;    // [rows, nb * bytes]: each row's blocks as the GGUF stores them
  const float* bias;   // [n] or null
  const float* other;  // [m, n] contiguous residual, or null
  float* y;            // [m, n] contiguous
  int64_t m, n, nb;    // nb: sub-blocks of QK weights a row
  int epi;
};

// The two float16 at p as float32, [p[0], p[1], 0, 0]: one 4-byte load and one
// conversion, for a block's d and m alike (a block is 18 bytes or more).
static inline __m128 halves_at(const uint8_t* p) {
  int32_t h;
  std::memcpy(&h, p, 4);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(h));
}

static inline __m256i bytes8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// The 32 4-bit values of a block's 16 bytes, 8 to a vector in weight order: byte j
// holds weight j in its low nibble and weight j + 16 in its high one.
static inline void nibbles(const uint8_t* qs, __m256i (&q)[4]) {
  const __m256i a = bytes8(qs), b = bytes8(qs + 8), low = _mm256_set1_epi32(0xF);
  q[0] = _mm256_and_si256(a, low);
  q[1] = _mm256_and_si256(b, low);
  q[2] = _mm256_srli_epi32(a, 4);
  q[3] = _mm256_srli_epi32(b, 4);
}

// Adds the fifth bits, bit j of the little-endian `qh` for weight j, as 16s.
static inline void fifth_bits(const uint8_t* qh_bytes, __m256i (&q)[4]) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  const __m256i bits = _mm256_set1_epi32(static_cast<int>(qh)), sixteen = _mm256_set1_epi32(16);
  for (int j = 0; j < 4; ++j) {
    const __m256i at = _mm256_setr_epi32(8 * j, 8 * j + 1, 8 * j + 2, 8 * j + 3, 8 * j + 4,
                                         8 * j + 5, 8 * j + 6, 8 * j + 7);
    const __m256i bit = _mm256_slli_epi32(_mm256_srlv_epi32(bits, at), 4);
    q[j] = _mm256_or_si256(q[j], _mm256_and_si256(bit, sixteen));
  }
}

// d * q + m, in one FMA (Fused) or rounded twice as gguf's dequantize does.
template <bool Fused>
static inline __m256 scaled(__m256 d, __m256 q, __m256 m) {
  return Fused ? _mm256_fmadd_ps(d, q, m) : _mm256_add_ps(_mm256_mul_ps(d, q), m);
}

// A 32-weight block's weights as float32, 8 to a vector: ggml's values (d * q + m, see
// `scaled`).
template <int F, bool Fused>
static inline void dequant_block(const uint8_t* b, __m256 (&w)[4]) {
  const __m128 dm = halves_at(b);  // d, and for the _1 formats m
  const __m256 d = _mm256_broadcastss_ps(dm);
  if constexpr (F == Q8_0) {
    for (int j = 0; j < 4; ++j) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * j));
      w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
    return;
  }
  __m256i q[4];
  constexpr bool has_min = F == Q4_1 || F == Q5_1, five = F == Q5_0 || F == Q5_1;
  constexpr int qs = 2 + (has_min ? 2 : 0) + (five ? 4 : 0);  // where the nibbles start
  nibbles(b + qs, q);
  if constexpr (five) fifth_bits(b + qs - 4, q);
  if constexpr (has_min) {
    const __m256 m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
    for (int j = 0; j < 4; ++j) w[j] = scaled<Fused>(d, _mm256_cvtepi32_ps(q[j]), m);
  } else {
    const __m256i zero = _mm256_set1_epi32(five ? 16 : 8);  // the stored value of weight 0
    for (int j = 0; j < 4; ++j)
      w[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(q[j], zero)));
  }
}

// A K block's factors, decoded once for its 8 sub-blocks: d * sc (Q6_K: one per 16
// weights) and dmin * mn, float32 products as ggml rounds them. 32-weight blocks carry
// their own, and leave these unset.
struct Factors {
  alignas(32) float d[16], m[8];
};

// The byte values of `lanes` (8 bytes) as float32.
static inline __m256 floats8(uint64_t lanes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(lanes))));
}

// Q4_K's and Q5_K's 6-bit sc and mn, packed in 12 bytes as ggml's get_scale_min_k4
// unpacks them: bytes 0-3 hold sc 0-3 (and the top bits of sc 4-7), bytes 4-7 mn 0-3 (and
// the top bits of mn 4-7), bytes 8-11 the low 4 bits of sc 4-7 and mn 4-7.
static inline void factors_q45_k(const uint8_t* b, Factors& f) {
  uint32_t u[3];
  std::memcpy(u, b + 4, 12);
  const uint32_t six = 0x3F3F3F3F, four = 0x0F0F0F0F, top = 0x30303030;
  const uint64_t sc = (u[0] & six) | uint64_t((u[2] & four) | (u[0] >> 2 & top)) << 32;
  const uint64_t mn = (u[1] & six) | uint64_t((u[2] >> 4 & four) | (u[1] >> 2 & top)) << 32;
  const __m128 dm = halves_at(b);  // d, dmin
  _mm256_store_ps(f.d, _mm256_mul_ps(_mm256_broadcastss_ps(dm), floats8(sc)));
  _mm256_store_ps(f.m, _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dm)), floats8(mn)));
}

// Q6_K's 16 int8 sc at byte 192, and d at byte 208, the block's last.
static inline void factors_q6_k(const uint8_t* b, Factors& f) {
  uint16_t h;
  std::memcpy(&h, b + 208, 2);  // a 4-byte load would read past the matrix
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
  for (int i = 0; i < 2; ++i) {
    const __m256i sc =
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 192 + 8 * i)));
    _mm256_store_ps(f.d + 8 * i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)));
  }
}

template <int F>
static inline void factors(const uint8_t* b, Factors& f) {
  if constexpr (F == Q6_K)
    factors_q6_k(b, f);
  else if constexpr (subs(F) > 1)
    factors_q45_k(b, f);
}

// Where a sub-block's values come from one source of packed bits (Q4_K's nibbles), each
// 8 bytes are widened as they are loaded, one shuffle each; where they come from two
// (Q5_K, Q6_K), the two are combined 32 bytes at a time first, which saves more operations
// than the widening in a register (7 shuffles for 4) costs. Measured, on Zen 3.

// Bits From.. of each of the 8 bytes at p moved to bits To.., under `mask`, one byte to
// an int32 lane.
template <int From, int To>
static inline __m256i moved8(const uint8_t* p, int mask) {
  __m256i v = bytes8(p);
  if constexpr (From > To) v = _mm256_srli_epi32(v, From - To);
  if constexpr (From < To) v = _mm256_slli_epi32(v, To - From);
  return _mm256_and_si256(v, _mm256_set1_epi32(mask));
}

// The same for the 32 bytes at p, in place (16-bit shifts: what crosses into a
// neighbouring byte is masked off).
template <int From, int To>
static inline __m256i moved32(const uint8_t* p, int mask) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (From > To) v = _mm256_srli_epi16(v, From - To);
  if constexpr (From < To) v = _mm256_slli_epi16(v, To - From);
  return _mm256_and_si256(v, _mm256_set1_epi8(static_cast<char>(mask)));
}

// 32 byte values, unsigned or int8, as int32 in order, 8 to a vector.
template <bool Signed>
static inline void widen(__m256i v, __m256i (&q)[4]) {
  const __m128i half[2] = {_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)};
  for (int j = 0; j < 4; ++j) {
    const __m128i b = j % 2 ? _mm_srli_si128(half[j / 2], 8) : half[j / 2];
    q[j] = Signed ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
  }
}

// Sub-block S of a Q4_K or Q5_K block: d * sc * q - dmin * mn (see `scaled`). Sub-blocks
// 2i and 2i + 1 share 32 bytes of q, the low nibbles and the high ones; Q5_K's fifth bits
// are bit S of its 32 bytes qh.
template <int F, int S, bool Fused>
static inline void dequant_k(const uint8_t* b, const Factors& f, __m256 (&w)[4]) {
  const uint8_t* qs = b + (F == Q5_K ? 48 : 16) + 32 * (S / 2);
  __m256i q[4];
  if constexpr (F == Q5_K)
    widen<false>(_mm256_or_si256(moved32<4 * (S & 1), 0>(qs, 0xF), moved32<S, 4>(b + 16, 0x10)), q);
  else
    for (int j = 0; j < 4; ++j) q[j] = moved8<4 * (S & 1), 0>(qs + 8 * j, 0xF);
  const __m256 d = _mm256_broadcast_ss(f.d + S), m = _mm256_broadcast_ss(f.m + S);
  // -m by its sign bit: x - m is x + (-m) exactly, zeros' signs too.
  const __m256 minus_m = _mm256_xor_ps(m, _mm256_set1_ps(-0.0f));
  for (int j = 0; j < 4; ++j) w[j] = scaled<Fused>(d, _mm256_cvtepi32_ps(q[j]), minus_m);
}

// Sub-block S of a Q6_K block: d * sc * (q - 32), sc one per 16 weights. The block is two
// halves of 128 weights, each 64 bytes of ql (weights 0-63 in the low nibbles, 64-127 in
// the high ones) and 32 of qh (2 bits a weight, quarter T's at bits 2T).
template <int S>
static inline void dequant_q6_k(const uint8_t* b, const Factors& f, __m256 (&w)[4]) {
  constexpr int half = S / 4, T = S % 4;
  const __m256i low = moved32<4 * (T >> 1), 0>(b + 64 * half + 32 * (T & 1), 0xF);
  const __m256i high = moved32<2 * T, 4>(b + 128 + 32 * half, 0x30);
  __m256i q[4];
  widen<true>(_mm256_sub_epi8(_mm256_or_si256(low, high), _mm256_set1_epi8(32)), q);
  for (int j = 0; j < 4; ++j) {
    const __m256 sc = _mm256_broadcast_ss(f.d + 2 * S + j / 2);
    w[j] = _mm256_mul_ps(sc, _mm256_cvtepi32_ps(q[j]));
  }
}

// Sub-block S of the block at b, as float32 in weight order, 8 to a vector: as the
// products take it (Fused), or as gguf's dequantize gives it (Q6_K's is both).
template <int F, int S, bool Fused = true>
static inline void dequant(const uint8_t* b, const Factors& f, __m256 (&w)[4]) {
  if constexpr (F == Q6_K)
    dequant_q6_k<S>(b, f, w);
  else if constexpr (subs(F) > 1)
    dequant_k<F, S, Fused>(b, f, w);
  else
    dequant_block<F, Fused>(b, w);
}

// fn(std::integral_constant<int, S>) for S = 0..N-1, unrolled: each sub-block of a block
// gets its own code, its offsets and shifts constants.
template <typename Fn, int... S>
static inline void each(Fn&& fn, std::integer_sequence<int, S...>) {
  (fn(std::integral_constant<int, S>{}), ...);
}

// Sub-blocks b0..b1 of the weight row at `wr` against rows r0..r0+R of x, into `acc`:
// four 8-lane accumulators per row, one per eighth of a sub-block, so that four FMA chains
// run at once. With `Keep`, the dequantized sub-blocks are also kept in `wide` (32 floats
// each) for the other rows. b0 and b1 are on block boundaries.
template <int F, int R, bool Keep>
static inline void stream_blocks(const Args& a, int64_t r0, const uint8_t* wr, int64_t b0,
                                 int64_t b1, float* wide, __m256 (&sums)[R][4]) {
  // Local copies: the __m256 stores (which may alias anything) would otherwise keep the
  // accumulators in memory and reload x's address, where this is not inlined.
  const float* x = a.x + r0 * a.xs;
  const int64_t xs = a.xs;
  __m256 acc[R][4];
  std::memcpy(acc, sums, sizeof(acc));
  constexpr int S = static_cast<int>(subs(F));
  for (int64_t b = b0; b < b1; b += S) {
    const uint8_t* block = wr + b / S * block_bytes(F);
    Factors f;
    factors<F>(block, f);
    each(
        [&](auto s) {
          __m256 w[4];
          dequant<F, decltype(s)::value>(block, f, w);
          const int64_t g = b + s;
          if (Keep)
            for (int j = 0; j < 4; ++j) _mm256_store_ps(wide + (g - b0) * QK + 8 * j, w[j]);
          for (int r = 0; r < R; ++r)
            for (int j = 0; j < 4; ++j) {
              const __m256 xv = _mm256_loadu_ps(x + r * xs + g * QK + 8 * j);
              acc[r][j] = _mm256_fmadd_ps(xv, w[j], acc[r][j]);
            }
        },
        std::make_integer_sequence<int, S>{});
  }
  std::memcpy(sums, acc, sizeof(acc));
}

// One output's four accumulators summed in one fixed order.
static inline float total(const __m256* acc) {
  return hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

// A thread's working memory: the kept chunk, 4 accumulators a row of x, and one or two
// weight rows' dot products with each row of x.
struct Scratch {
  std::vector<__m256> wide, accs;
  std::vector<float> dots, up;
};

constexpr int64_t CHUNK = 32;  // sub-blocks of a weight row dequantized and kept at a time
static_assert(CHUNK % 8 == 0, "chunks of whole K blocks");

// One or two rows of x against the weight row at `wr`: accumulators in registers.
template <int F, int R>
static inline void few_rows(const Args& a, const uint8_t* wr, float* out) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
  stream_blocks<F, R, false>(a, 0, wr, 0, a.nb, nullptr, acc);
  for (int r = 0; r < R; ++r) out[r] = total(acc[r]);
}

// Three rows or more: the weight row goes CHUNK blocks at a time, rows 0-1 dequantizing
// them and keeping them in L1, the other rows taking them from there, so each block is
// dequantized once.
template <int F>
static void many_rows(const Args& a, const uint8_t* wr, Scratch& s, float* out) {
  float* wide = reinterpret_cast<float*>(s.wide.data());
  __m256* accs = s.accs.data();
  for (int64_t i = 0; i < a.m * 4; ++i) accs[i] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < a.nb; b0 += CHUNK) {
    const int64_t b1 = std::min(a.nb, b0 + CHUNK);
    __m256 acc[2][4];
    for (int j = 0; j < 8; ++j) acc[j / 4][j % 4] = accs[j];
    stream_blocks<F, 2, true>(a, 0, wr, b0, b1, wide, acc);
    for (int j = 0; j < 8; ++j) accs[j] = acc[j / 4][j % 4];
    // The other rows: a sub-block's 4 vectors are eighths of one output's 32 weights.
    wide_rows<QK, 8>(a.x, a.xs, 2, a.m, b0, b1, wide, accs);
  }
  for (int64_t r = 0; r < a.m; ++r) out[r] = total(accs + r * 4);
}

// The dot products of the weight row at `wr` with every row of x, into `out`. Every
// output's accumulators take the same products in the same order whichever path computes
// it: that is the row invariance.
template <int F>
static void dots(const Args& a, const uint8_t* wr, Scratch& s, float* out) {
  if (a.m == 1)
    few_rows<F, 1>(a, wr, out);
  else if (a.m == 2)
    few_rows<F, 2>(a, wr, out);
  else
    many_rows<F>(a, wr, s, out);
}

// Output o for every row of x: its weight row's dot products (with SwiGLU, gate row o's
// and up row n + o's), then the epilogue.
template <int F>
static void output(const Args& a, int64_t o, Scratch& s) {
  const int64_t row_bytes = a.nb / subs(F) * block_bytes(F);
  dots<F>(a, a.w + o * row_bytes, s, s.dots.data());
  if (a.epi == EPI_SWIGLU) {
    dots<F>(a, a.w + (a.n + o) * row_bytes, s, s.up.data());
    for (int64_t r = 0; r < a.m; ++r) a.y[r * a.n + o] = silu(s.dots[r]) * s.up[r];
    return;
  }
  for (int64_t r = 0; r < a.m; ++r) {
    float v = a.bias ? s.dots[r] + a.bias[o] : s.dots[r];
    if (a.epi == EPI_ADD) v += a.other[r * a.n + o];
    a.y[r * a.n + o] = v;
  }
}

constexpr int64_t BLOCK = 16;  // outputs per unit of work

// The outputs split among torch's threads in blocks, handed out in guided chunks as in
// linear.cpp: which thread computes an output does not change its value.
template <int F>
static void run(const Args& a) {
  const int64_t nblocks = (a.n + BLOCK - 1) / BLOCK;
  int64_t nt = std::min(std::max<int64_t>(1, at::get_num_threads()), nblocks);
  if (a.n * a.nb * a.m < (int64_t(1) << 8)) nt = 1;  // too small to be worth a wake-up
#pragma omp parallel num_threads(static_cast<int>(nt)) if (nt > 1)
  {
    Scratch s{std::vector<__m256>(a.m > 2 ? CHUNK * 4 : 0), std::vector<__m256>(a.m * 4),
              std::vector<float>(a.m), std::vector<float>(a.m)};
#pragma omp for schedule(guided)
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t o = b * BLOCK; o < std::min(a.n, (b + 1) * BLOCK); ++o) output<F>(a, o, s);
  }
}

// fn(std::integral_constant<int, F>) for the F in FORMATS that is `format`: each format
// its own instantiation.
template <typename Fn, size_t... I>
static void with_format(int64_t format, Fn&& fn, std::index_sequence<I...>) {
  (void)((format == FORMATS[I].format &&
          (fn(std::integral_constant<int, FORMATS[I].format>{}), true)) ||
         ...);
}

template <typename Fn>
static void with_format(int64_t format, Fn&& fn) {
  with_format(format, fn, std::make_index_sequence<std::size(FORMATS)>{});
}

static void run_format(const Args& a, int64_t format) {
  with_format(format, [&](auto f) { run<decltype(f)::value>(a); });
}

// Weight rows r0..r1 of `w` (nb sub-blocks each) as float32 into `out`, gguf's values.
template <int F>
static void unpack_rows(const uint8_t* w, int64_t nb, int64_t r0, int64_t r1, float* out) {
  constexpr int S = static_cast<int>(subs(F));
  const int64_t row_bytes = nb / S * block_bytes(F);
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; b += S) {
      const uint8_t* block = w + r * row_bytes + b / S * block_bytes(F);
      float* o = out + (r * nb + b) * QK;
      Factors f;
      factors<F>(block, f);
      each(
          [&](auto s) {
            __m256 v[4];
            dequant<F, decltype(s)::value, false>(block, f, v);
            for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + s * QK + 8 * j, v[j]);
          },
          std::make_integer_sequence<int, S>{});
    }
}

// The matrix as float32 [rows, K], the values of gguf's dequantize: what prefill's GEMM
// multiplies by, made in C++ because widening a model's weights in PyTorch took a tenth
// of an end-to-end request on the default model.
at::Tensor unpack_q(const at::Tensor& w, int64_t format, int64_t k) {
  const int64_t bytes = block_bytes(format), block = QK * subs(format);
  TORCH_CHECK(bytes > 0, "cpu_quant: no kernel for ggml type ", format);
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.scalar_type() == at::kByte &&
                  w.is_contiguous() && k > 0 && k % block == 0 && w.size(1) == k / block * bytes,
              "cpu_quant: w must be a contiguous uint8 [rows, ", k / block * bytes,
              "] tensor of GGUF blocks of ggml type ", format, ", got ", w.sizes());
  const int64_t rows = w.size(0), nb = k / QK;
  at::Tensor out = at::empty({rows, k}, w.options().dtype(at::kFloat));
  const uint8_t* data = w.data_ptr<uint8_t>();
  float* y = out.data_ptr<float>();
  with_format(format, [&](auto f) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      unpack_rows<decltype(f)::value>(data, nb, r0, r1, y);
    });
  });
  return out;
}

static const float* float_vector(const std::optional<at::Tensor>& t, int64_t size,
                                 const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->numel() == size,
              "cpu_quant: ", what, " must be a contiguous float32 [", size, "] tensor");
  return t->data_ptr<float>();
}

at::Tensor linear_q_epi(const at::Tensor& x, const at::Tensor& w, int64_t format, int64_t n,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& other, bool norm,
                        const std::optional<at::Tensor>& gain, double n_eps, int64_t epi) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "cpu_quant: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "cpu_quant: x must be a 2-D float32 tensor with contiguous rows, got ", x.sizes(),
              " ", x.scalar_type());
  const int64_t bytes = block_bytes(format), block = QK * subs(format);
  TORCH_CHECK(bytes > 0, "cpu_quant: no kernel for ggml type ", format);
  const int64_t m = x.size(0), K = x.size(1), nb = K / QK;
  TORCH_CHECK(K % block == 0 && K > 0, "cpu_quant: K must be a positive multiple of ", block,
              ", got ", K);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "cpu_quant: w must be a contiguous uint8 [rows, bytes] tensor of GGUF blocks, got ",
              w.sizes(), " ", w.scalar_type());
  const int64_t rows = epi == EPI_SWIGLU ? 2 * n : n;
  TORCH_CHECK(n > 0 && w.size(0) == rows, "cpu_quant: ", n, " outputs need ", rows,
              " weight rows, got ", w.size(0));
  TORCH_CHECK(w.size(1) == K / block * bytes, "cpu_quant: a row of ", K, " weights of ggml type ",
              format, " is ", K / block * bytes, " bytes, got ", w.size(1));
  Args a{};
  TORCH_CHECK(epi != EPI_SWIGLU || !bias.has_value() || !bias->defined(),
              "cpu_quant: the SwiGLU epilogue takes no bias");
  a.bias = float_vector(bias, n, "bias");
  if (epi == EPI_ADD) {
    TORCH_CHECK(other.has_value() && other->defined() && other->device().is_cpu() &&
                    other->scalar_type() == at::kFloat && other->is_contiguous() &&
                    other->dim() == 2 && other->size(0) == m && other->size(1) == n,
                "cpu_quant: residual must be contiguous float32 [", m, ", ", n, "]");
    a.other = other->data_ptr<float>();
  }
  const float* g = float_vector(gain, K, "gain");
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  std::vector<float> prepared;
  if (norm || g) {
    // linear.cpp's, in the same translation unit (cpu_build.py): the same normed rows.
    prepared = linear::prepare(x, K / 8, norm, g, n_eps);
    a.x = prepared.data();
    a.xs = K;
  } else {
    a.x = x.data_ptr<float>();
    a.xs = x.stride(0);
  }
  a.w = w.data_ptr<uint8_t>();
  a.y = y.data_ptr<float>();
  a.m = m;
  a.n = n;
  a.nb = nb;
  a.epi = static_cast<int>(epi);
  run_format(a, format);
  return y;
}

// One entry point per epilogue, with linear_bf16's arguments (linear.cpp) and the format.
at::Tensor linear_q(const at::Tensor& x, const at::Tensor& w, int64_t format, int64_t n,
                    const std::optional<at::Tensor>& bias, bool norm,
                    const std::optional<at::Tensor>& gain, double n_eps) {
  return linear_q_epi(x, w, format, n, bias, std::nullopt, norm, gain, n_eps, EPI_NONE);
}

at::Tensor linear_q_add(const at::Tensor& x, const at::Tensor& w, int64_t format, int64_t n,
                        const std::optional<at::Tensor>& bias, const at::Tensor& residual) {
  return linear_q_epi(x, w, format, n, bias, residual, false, std::nullopt, 0.0, EPI_ADD);
}

at::Tensor linear_q_swiglu(const at::Tensor& x, const at::Tensor& w, int64_t format, int64_t n,
                           bool norm, const std::optional<at::Tensor>& gain, double n_eps) {
  return linear_q_epi(x, w, format, n, std::nullopt, std::nullopt, norm, gain, n_eps, EPI_SWIGLU);
}

}  // namespace quant
