#include <immintrin.h>
#include <omp.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace attention {

// exp(x) for x <= 0 (Cephes' expf polynomial), 0 below -87: padding at -inf adds nothing.
static inline __m256 exp_neg(__m256 x) {
  const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// The 8 lane sums of 8 vectors, lane i of the result from v[i], each in one fixed tree:
// ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)).
static inline __m256 sum8x8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Pool elements: float32, or bfloat16 kept as its bits (the top half of a float32).
static inline float get(const float* p) { return *p; }
static inline float get(const uint16_t* p) {
  uint32_t bits = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline void put(float* p, float v) { *p = v; }
static inline void put(uint16_t* p, float v) {  // round to nearest even, as PyTorch does
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  *p = std::isnan(v) ? uint16_t(0x7FC0) : uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

// Columns of a pool row come in blocks of BLOCK<E>. A float32 block is one vector, in
// column order. A bfloat16 block is 16 columns from one load: the even ones widen by a
// shift and the odd ones by a mask (no shuffle, which would cap the rate here), so it
// comes as two vectors, the 8 even columns then the 8 odd ones. Queries and weighted
// sums are kept in that order (`to_block_order`, `from_block_order`).
template <typename E>
constexpr int64_t BLOCK = 8 * int64_t(sizeof(float) / sizeof(E));

static inline void load_block(const float* p, __m256* v) { v[0] = _mm256_loadu_ps(p); }
static inline void load_block(const uint16_t* p, __m256* v) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  v[1] = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
}

// The first n columns of x (a multiple of the block) into block order in y.
template <typename E>
static inline void to_block_order(const float* x, float* y, int64_t n) {
  if constexpr (BLOCK<E> == 8) {
    std::copy(x, x + n, y);
  } else {
    for (int64_t b = 0; b < n; b += 16)
      for (int i = 0; i < 8; ++i) y[b + i] = x[b + 2 * i], y[b + 8 + i] = x[b + 2 * i + 1];
  }
}

template <typename E>
static inline void from_block_order(float* x, int64_t n) {
  if constexpr (BLOCK<E> == 16) {
    float t[16];
    for (int64_t b = 0; b < n; b += 16) {
      std::copy(x + b, x + b + 16, t);
      for (int i = 0; i < 8; ++i) x[b + 2 * i] = t[i], x[b + 2 * i + 1] = t[8 + i];
    }
  }
}

template <typename E>
struct Args {
  const float* q;  // [T, H * D], row stride qs
  int64_t qs;
  const E* kv;            // [slots, 2 * KV * D]
  const int32_t* tables;  // [B, nb]
  int64_t nb, block_size, H, KV, D, window;
  float scale;
};

constexpr int64_t CHUNK = 64;   // keys whose values stay in L1 while every head uses them
constexpr int64_t AHEAD = 16;   // keys ahead to prefetch
constexpr int64_t SPLIT = 256;  // key positions per unit of work (exported: bindings.cpp)

// Line `l` of the 8 pool rows at `rows` (each `row_lines` lines) into L1.
template <typename E>
static inline void prefetch_line(const E* const* rows, int64_t row_lines, int64_t l) {
  const char* row = reinterpret_cast<const char*>(rows[l / row_lines]);
  _mm_prefetch(row + (l % row_lines) * 64, _MM_HINT_T0);
}

template <typename E>
struct Scratch {
  std::vector<const E*> keys;  // pool row of each key, padded to a multiple of 8
  std::vector<float> q;        // per head: the query in block order
  std::vector<float> p;        // per head: scores, then softmax numerators
};

// Where a unit leaves its softmax over its keys, per head: the top score, the sum of
// exp(score - top) and the values weighted by them.
struct Partial {
  float* top;  // [H]
  float* sum;  // [H]
  float* acc;  // [H, D]
};

// The queries of one row for every head, over keys lo..hi (positions); `table`: its
// sequence's blocks. Each pass reads the pool rows in order for all KV heads, so the
// reads from memory spread over all the unit's arithmetic. Each head's arithmetic runs
// in key order whatever the others do.
template <typename E>
static void attend(const Args<E>& a, int64_t row, const int32_t* table, int64_t lo, int64_t hi,
                   Scratch<E>& sc, const Partial& out) {
  constexpr int64_t B = BLOCK<E>, NV = B / 8;  // columns and vectors per block
  const int64_t D = a.D, DB = D - D % B, H = a.H, G = a.H / a.KV;
  const int64_t rs = 2 * a.KV * D, bs = a.block_size, voff = a.KV * D;
  const int64_t n = hi - lo + 1, n8 = (n + 7) & ~int64_t(7);
  const float ninf = -std::numeric_limits<float>::infinity();
  sc.keys.resize(n8);
  for (int64_t pos = lo; pos <= hi;) {  // one table lookup per block
    const int64_t block = pos / bs, end = std::min(hi + 1, (block + 1) * bs);
    const E* base = a.kv + int64_t(table[block]) * bs * rs;
    for (; pos < end; ++pos) sc.keys[pos - lo] = base + (pos - block * bs) * rs;
  }
  std::fill(sc.keys.begin() + n, sc.keys.end(), sc.keys[0]);  // read, then masked
  sc.q.resize(H * D);
  for (int64_t h = 0; h < H; ++h) {
    const float* qv = a.q + row * a.qs + h * D;
    to_block_order<E>(qv, sc.q.data() + h * D, DB);
    std::copy(qv + DB, qv + D, sc.q.data() + h * D + DB);
  }
  sc.p.resize(H * n8);
  // Scores 8 keys at a time: 8 independent accumulators, each summed in the fixed tree.
  // The 8 rows AHEAD keys on are prefetched whole (the values are read from cache in the
  // next pass), a share of their lines with each head. Prefetched in one burst (about
  // 100 lines, likely more than the core's miss buffers hold), the attention over 300 to
  // 1000 cold keys ran 10-30% slower.
  const int64_t row_lines = (rs * int64_t(sizeof(E)) + 63) / 64, lines = 8 * row_lines;
  for (int64_t j0 = 0; j0 < n8; j0 += 8) {
    for (int64_t h = 0; h < H; ++h) {
      if (j0 + AHEAD < n8)
        for (int64_t l = h * lines / H; l < (h + 1) * lines / H; ++l)
          prefetch_line(sc.keys.data() + j0 + AHEAD, row_lines, l);
      const int64_t koff = (h / G) * D;
      const float* qv = sc.q.data() + h * D;
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < DB; d += B) {
        __m256 x[NV];
        for (int v = 0; v < NV; ++v) x[v] = _mm256_loadu_ps(qv + d + 8 * v);
        for (int i = 0; i < 8; ++i) {
          __m256 k[NV];
          load_block(sc.keys[j0 + i] + koff + d, k);
          for (int v = 0; v < NV; ++v) acc[i] = _mm256_fmadd_ps(x[v], k[v], acc[i]);
        }
      }
      float* p = sc.p.data() + h * n8 + j0;
      if (DB == D && j0 + 8 <= n) {  // the common case, 8 at once
        _mm256_storeu_ps(p, _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(a.scale)));
        continue;
      }
      alignas(32) float s[8];
      _mm256_store_ps(s, sum8x8(acc));
      for (int i = 0; i < 8; ++i) {
        for (int64_t d = DB; d < D; ++d)
          s[i] = std::fma(qv[d], get(sc.keys[j0 + i] + koff + d), s[i]);
        p[i] = j0 + i < n ? s[i] * a.scale : ninf;
      }
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float* p = sc.p.data() + h * n8;
    const float top = *std::max_element(p, p + n8);  // a max is exact in any order
    const __m256 vtop = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
      const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(p + j), vtop));
      _mm256_storeu_ps(p + j, e);
      total = _mm256_add_ps(total, e);
    }
    out.top[h] = top;
    out.sum[h] = hsum8(total);
  }
  // Weighted sums of values, keys in order, one chunk of keys at a time.
  std::fill(out.acc, out.acc + H * D, 0.0f);
  for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
    const int64_t c1 = std::min(n, c0 + CHUNK);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = voff + (h / G) * D;
      const float* p = sc.p.data() + h * n8;
      float* o = out.acc + h * D;
      int64_t d0 = 0;
      for (; d0 + 64 <= DB; d0 += 64) {  // 8 vectors in registers
        __m256 acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
        for (int64_t j = c0; j < c1; ++j) {
          const E* v = sc.keys[j] + off + d0;
          const __m256 w = _mm256_set1_ps(p[j]);
          for (int b = 0; b < 64 / B; ++b) {
            __m256 x[NV];
            load_block(v + b * B, x);
            for (int i = 0; i < NV; ++i)
              acc[b * NV + i] = _mm256_fmadd_ps(w, x[i], acc[b * NV + i]);
          }
        }
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
      }
      for (; d0 < DB; d0 += B) {  // what is left, a block at a time
        __m256 acc[NV];
        for (int i = 0; i < NV; ++i) acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
        for (int64_t j = c0; j < c1; ++j) {
          __m256 x[NV];
          load_block(sc.keys[j] + off + d0, x);
          for (int i = 0; i < NV; ++i) acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), x[i], acc[i]);
        }
        for (int i = 0; i < NV; ++i) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
      }
      for (int64_t d = DB; d < D; ++d)
        for (int64_t j = c0; j < c1; ++j) o[d] = std::fma(p[j], get(sc.keys[j] + off + d), o[d]);
    }
  }
  for (int64_t h = 0; h < H; ++h) from_block_order<E>(out.acc + h * D, DB);
}

// RoPE on adjacent pairs: x0 + i x1 times cos + i sin.
template <typename E>
static inline void rotate(const float* x, const float* cos_sin, E* y, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1], cos = cos_sin[2 * i], sin = cos_sin[2 * i + 1];
    put(y + 2 * i, x0 * cos - x1 * sin);
    put(y + 2 * i + 1, x0 * sin + x1 * cos);
  }
}

// Rotates q and k of each new token, writes k and v to the token's pool slot, and
// returns the rotated queries [T, H * D].
template <typename E>
static at::Tensor rope_and_write(const at::Tensor& qkv, E* pool, int64_t slots_in_pool,
                                 const at::Tensor& rope, const at::Tensor& slots, int64_t H,
                                 int64_t KV, int64_t D) {
  const int64_t T = qkv.size(0), half = D / 2, rs = 2 * KV * D;
  TORCH_CHECK(qkv.size(1) == (H + 2 * KV) * D, "cpu_attention: qkv has ", qkv.size(1),
              " columns, expected (heads + 2 kv_heads) x head_dim = ", (H + 2 * KV) * D);
  TORCH_CHECK(D % 2 == 0 && rope.scalar_type() == at::kFloat && rope.is_contiguous() &&
                  rope.numel() == T * D,
              "cpu_attention: rope must be contiguous float32 [T, head_dim / 2, 2]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == T,
              "cpu_attention: slots must be int64, one per token");
  at::Tensor q = at::empty({T, H * D}, qkv.options());
  const float* cs = rope.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots_in_pool, "cpu_attention: slot outside the pool");
    const float* x = qkv.data_ptr<float>() + t * qkv.stride(0);
    const float* c = cs + t * D;
    float* qt = q.data_ptr<float>() + t * H * D;
    E* kt = pool + slot[t] * rs;
    for (int64_t h = 0; h < H; ++h) rotate(x + h * D, c, qt + h * D, half);
    for (int64_t h = 0; h < KV; ++h) rotate(x + (H + h) * D, c, kt + h * D, half);
    for (int64_t i = 0; i < KV * D; ++i) put(kt + KV * D + i, x[(H + KV) * D + i]);
  }
  return q;
}

template <typename E>
static at::Tensor attend_pool(E* pool, const at::Tensor& q_in, const at::Tensor& kv,
                              const std::optional<at::Tensor>& rope,
                              const std::optional<at::Tensor>& slots, const at::Tensor& tables,
                              const at::Tensor& starts, const at::Tensor& q_lens,
                              const at::Tensor& q_offsets, int64_t block_size, int64_t num_heads,
                              int64_t num_kv_heads, int64_t head_dim, double scale,
                              int64_t window) {
  const int64_t T = q_in.size(0), H = num_heads, B = tables.size(0);
  TORCH_CHECK(H > 0 && num_kv_heads > 0 && H % num_kv_heads == 0, "cpu_attention: ", H,
              " heads do not share ", num_kv_heads, " KV heads evenly");
  TORCH_CHECK(rope.has_value() == slots.has_value(), "cpu_attention: rope and slots go together");
  at::Tensor q = q_in;
  if (rope.has_value()) {
    q = rope_and_write(q_in, pool, kv.size(0), *rope, *slots, H, num_kv_heads, head_dim);
  } else {
    TORCH_CHECK(q.size(1) == H * head_dim, "cpu_attention: q has ", q.size(1),
                " columns, not heads x head_dim = ", H * head_dim);
  }
  for (const at::Tensor* t : {&tables, &starts, &q_lens, &q_offsets})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->size(0) == B,
                "cpu_attention: tables, starts, q_lens and q_offsets: int32, one per sequence");
  Args<E> a{q.data_ptr<float>(),
            q.stride(0),
            pool,
            tables.data_ptr<int32_t>(),
            tables.size(1),
            block_size,
            H,
            num_kv_heads,
            head_dim,
            window,
            static_cast<float>(scale)};
  at::Tensor out = at::empty({T, H * head_dim}, q.options());
  // One unit per (query, head): its sequence and position.
  const int32_t* st = starts.data_ptr<int32_t>();
  const int32_t* ql = q_lens.data_ptr<int32_t>();
  const int32_t* qo = q_offsets.data_ptr<int32_t>();
  std::vector<int64_t> seq_of(T, -1), pos_of(T, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < ql[b]; ++i) {
      const int64_t row = qo[b] + i;
      TORCH_CHECK(row >= 0 && row < T, "cpu_attention: q_offsets/q_lens overrun ", T, " rows");
      seq_of[row] = b;
      pos_of[row] = st[b] + i;
      TORCH_CHECK(pos_of[row] / block_size < a.nb, "cpu_attention: position past the table");
    }
  for (int64_t row = 0; row < T; ++row)
    TORCH_CHECK(seq_of[row] >= 0, "cpu_attention: row ", row, " belongs to no sequence");
  // Units of work: (query, key split), splits at multiples of SPLIT positions, so a
  // query's splits do not depend on the rest of the pass. Unit u leaves its partial
  // result in slot u; a query's units are consecutive, `first[row]` the first.
  struct Unit {
    int64_t row, lo, hi;
  };
  std::vector<Unit> units;
  std::vector<int64_t> first(T + 1);
  for (int64_t row = 0; row < T; ++row) {
    const int64_t pos = pos_of[row];
    const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    first[row] = units.size();
    for (int64_t k0 = lo; k0 <= pos; k0 = (k0 / SPLIT + 1) * SPLIT)
      units.push_back({row, k0, std::min(pos, (k0 / SPLIT + 1) * SPLIT - 1)});
  }
  first.back() = units.size();
  const int64_t U = units.size(), D = head_dim;
  std::vector<float> tops(U * H), sums(U * H), accs(U * H * D);
  int nt = static_cast<int>(std::min<int64_t>(std::max(1, at::get_num_threads()), U));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    Scratch<E> scratch;
#pragma omp for schedule(dynamic)  // a thread the machine slows takes fewer units
    for (int64_t u = 0; u < U; ++u) {
      const Unit& w = units[u];
      const Partial part{&tops[u * H], &sums[u * H], &accs[u * H * D]};
      attend(a, w.row, a.tables + seq_of[w.row] * a.nb, w.lo, w.hi, scratch, part);
    }
  }
  // Each (query, head): its splits merged in order.
  float* o = out.data_ptr<float>();
  for (int64_t row = 0; row < T; ++row) {
    for (int64_t h = 0; h < H; ++h) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t u = first[row]; u < first[row + 1]; ++u) top = std::max(top, tops[u * H + h]);
      float total = 0.0f;
      float* y = o + (row * H + h) * D;
      std::fill(y, y + D, 0.0f);
      for (int64_t u = first[row]; u < first[row + 1]; ++u) {
        const float scale = std::exp(tops[u * H + h] - top);
        total = std::fma(sums[u * H + h], scale, total);
        const float* acc = &accs[(u * H + h) * D];
        for (int64_t d = 0; d < D; ++d) y[d] = std::fma(acc[d], scale, y[d]);
      }
      const float inv = 1.0f / total;
      for (int64_t d = 0; d < D; ++d) y[d] *= inv;
    }
  }
  return out;
}

// Attention of new queries over the pool. With `rope` and `slots`, `q` is the fused qkv
// projection [T, (H + 2 KV) * D]: q and k are rotated and k and v written first.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv,
                           const std::optional<at::Tensor>& rope,
                           const std::optional<at::Tensor>& slots, const at::Tensor& tables,
                           const at::Tensor& starts, const at::Tensor& q_lens,
                           const at::Tensor& q_offsets, int64_t block_size, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.stride(1) == 1,
              "cpu_attention: q must be float32 [T, columns] with contiguous rows");
  const bool bf16 = kv.scalar_type() == at::kBFloat16;
  TORCH_CHECK(kv.dim() == 2 && (bf16 || kv.scalar_type() == at::kFloat) && kv.is_contiguous() &&
                  kv.size(1) == 2 * num_kv_heads * head_dim,
              "cpu_attention: the pool must be contiguous float32 or bfloat16 [slots, ",
              2 * num_kv_heads * head_dim, "], got ", kv.sizes(), " ", kv.scalar_type());
  if (bf16)
    return attend_pool(reinterpret_cast<uint16_t*>(kv.data_ptr<at::BFloat16>()), q, kv, rope, slots,
                       tables, starts, q_lens, q_offsets, block_size, num_heads, num_kv_heads,
                       head_dim, scale, window);
  return attend_pool(kv.data_ptr<float>(), q, kv, rope, slots, tables, starts, q_lens, q_offsets,
                     block_size, num_heads, num_kv_heads, head_dim, scale, window);
}

}  // namespace attention
