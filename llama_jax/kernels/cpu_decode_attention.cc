// Attention over a dense KV cache, for XLA:CPU (a jax.ffi custom call): the queries of a decode step, a
// speculative verify chunk or a prefill chunk against the cache slots up to each query's position, read in place.
//
//   q:         float32 [B, T, N, H]      queries (RoPE applied), N = K * G query heads in GQA groups
//   k, v:      [L, B, S, K, H] (or [B, S, K, H] with L = 1): float32, bfloat16 (also as uint16 bits) or int8
//   k_scale, v_scale: float32 [L, B, S, K] for an int8 cache (key = k * k_scale), else [1] (unused)
//   positions: int32 [B, T]              query positions; query (b, t) attends to slots s <= positions[b, t]
//   layer:     int32 [1]                 the layer of a stacked cache
//   out:       float32 [B, T, N, H]      softmax(q k^T / sqrt(H)) v over the visible slots (0 where none is)
//
// Numerics as llama_jax.attention.online_softmax: unscaled float32 scores (times k_scale), the 1/sqrt(H) scale
// inside the exp, float32 running max, sum and accumulator; int8 values scale the probabilities. Only the slots
// up to the longest query of a row are read. Decode-sized chunks (T <= 16): work split over (row, slot range) on
// XLA's intra-op thread pool, the partial softmax states merged as in flash-decoding. Prefill-sized chunks: tasks
// of 128 tokens of a row, each over every slot its tokens see, in chunks of up to 256 slots (flash attention's
// loop: online softmax over key blocks; causal blocks past a token are not read).
//
// Memory order: a task reads its slots front to back in chunks, all KV heads of a slot together (one contiguous
// run), the next chunk prefetched while this one is computed; a bf16 / int8 chunk is widened to float32 once for
// every query of every head. Inner loops: eight keys' scores per reduction tree (decode) or a register-tiled matrix
// product against the chunk's transposed keys (64 or more queries per KV head), a block of queries per value load,
// vectorised exp. Measured (SmolLM2 shapes, 30 layers, 4000 slots, batch 1, 2-core AVX-512): float32 cache 24.3 ->
// 10.0 ms a step; a 5-token verify chunk 24.2 -> 17.5 ms (compute-bound there: ~64% of the FMA peak). A 512-token
// prefill chunk at position 8192 (4 heads / 2 KV heads of 32; 9 / 3 of 64 at 2048): ~146 GFLOP/s against the XLA
// blockwise path's ~95.
//
// Why: the XLA path loops over cache blocks (a while loop per layer) and, on XLA:CPU, copies every block it
// slices out of the stacked cache before the dot; at 4000 tokens that was 24 ms of a 60 ms SmolLM2 step.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }

// exp(x) for x <= 0 (softmax arguments), vectorisable: 2^(x log2 e) = 2^n * 2^f, f in [-0.5, 0.5], degree-6
// polynomial (relative error ~2e-7); arguments below -87 give 0.
#pragma omp declare simd
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22), vectorisable
  const float f = t - n;
  float p = 1.5353362e-4f;
  p = p * f + 1.3398874e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

constexpr int64_t kSlots = 64;          // the most slots scored at a time (one query's dot products)
constexpr int64_t kGemmSlots = 256;     // ... as a matrix product (a prefill-sized chunk)

struct Partial {  // online-softmax state of the queries of one (row, KV head) over one slot range
  std::vector<float> m, l;  // [Q]
  std::vector<float> acc;   // [Q, H]
};

// ---- the two inner products of a chunk, on float32 keys and values (a bf16 / int8 chunk is widened first):
// scores s[j] = q . key_j, and for a block of queries a_u += sum_j p_u[j] value_j. key_j / value_j = base + j *
// stride (elements); H the head dim. Portable forms first, AVX-512 ones after.
void scores_generic(const float* q, const float* k, int64_t stride, int64_t n, int64_t H, float* s) {
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * stride;
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t h = 0; h < H; ++h) a += q[h] * kj[h];
    s[j] = a;
  }
}

// p: [Q, ld] probabilities of Q queries (0 past what a query sees), a: [Q, H] their accumulators
void accumulate_generic(const float* p, int64_t ld, const float* v, int64_t stride, int64_t n, int64_t H, int64_t Q,
                        float* a) {
  for (int64_t u = 0; u < Q; ++u)
    for (int64_t j = 0; j < n; ++j) {
      const float pj = p[u * ld + j];
      if (pj == 0.f) continue;
      const float* vj = v + j * stride;
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) a[u * H + h] += pj * vj[h];
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

// s[0..7] = the sums of the 16 lanes of a[0..7]: one shuffle-and-add tree for the eight (about 3 instructions a
// key, against 8 for a reduction each).
__attribute__((always_inline)) inline void reduce8(const __m512* a, float* s) {
  __m512 x[4];  // x[i]: 128-bit lanes [a_i, a_i, a_{i+4}, a_{i+4}] partial sums (512 -> 256 bits each)
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xEE));
  // lanes [a0, a4, a2, a6] and [a1, a5, a3, a7], 4 partial sums each
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[2], 0x88), _mm512_shuffle_f32x4(x[0], x[2], 0xDD));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[1], x[3], 0x88), _mm512_shuffle_f32x4(x[1], x[3], 0xDD));
  const __m512 z = _mm512_add_ps(_mm512_unpacklo_ps(y0, y1), _mm512_unpackhi_ps(y0, y1));
  const __m512 w = _mm512_add_ps(z, _mm512_shuffle_ps(z, z, 0x4E));  // lane l: [sum y0_l, sum y1_l, ..]
  const __m512i order = _mm512_setr_epi32(0, 1, 8, 9, 4, 5, 12, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm256_storeu_ps(s, _mm512_castps512_ps256(_mm512_permutexvar_ps(order, w)));
}

// eight keys at a time: eight independent FMA chains, one reduction tree
template <int HB>
void scores_avx512(const float* q, const float* k, int64_t stride, int64_t n, float* s) {
  __m512 qv[HB];
  for (int i = 0; i < HB; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m512 a[8];
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < HB; ++i)
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(k + (j + r) * stride + 16 * i), a[r]);
    reduce8(a, s + j);
  }
  for (; j < n; ++j) {
    __m512 a = _mm512_setzero_ps();
    for (int i = 0; i < HB; ++i) a = _mm512_fmadd_ps(qv[i], _mm512_loadu_ps(k + j * stride + 16 * i), a);
    s[j] = _mm512_reduce_add_ps(a);
  }
}

// The register tile both matrix products of attention use: for t < n, acc[r * NB + c] += x[r * x_ld + t] *
// vec[t * vec_ld + 16 c .. + 16] (R scalars broadcast against NB vectors: R x NB independent FMA chains hide the
// FMA latency). acc is one flat array with its loops unrolled by pragma, so GCC keeps it in registers (a 2-D array
// it spills to the stack on every step); each vector is loaded once into a register for the R rows.
template <int R, int NB>
__attribute__((always_inline)) inline void outer_steps(__m512* acc, const float* x, int64_t x_ld, const float* vec,
                                                       int64_t vec_ld, int64_t n) {
  for (int64_t t = 0; t < n; ++t) {
    __m512 vv[NB];
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) {
      vv[c] = _mm512_loadu_ps(vec + t * vec_ld + 16 * c);
      asm("" : "+v"(vv[c]));  // GCC otherwise folds the load into each of the R FMAs
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * x_ld + t]);
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) acc[r * NB + c] = _mm512_fmadd_ps(xr, vv[c], acc[r * NB + c]);
    }
  }
}

// QB queries at a time, their accumulators in registers over the chunk: each value is loaded once for the block
template <int HB, int QB>
void accumulate_block(const float* p, int64_t ld, const float* v, int64_t stride, int64_t n, float* a) {
  __m512 acc[QB * HB];  // acc[u * HB + i]
#pragma GCC unroll 32
  for (int e = 0; e < QB * HB; ++e) acc[e] = _mm512_loadu_ps(a + 16 * e);
  outer_steps<QB, HB>(acc, p, ld, v, stride, n);
#pragma GCC unroll 32
  for (int e = 0; e < QB * HB; ++e) _mm512_storeu_ps(a + 16 * e, acc[e]);
}

template <int HB>
void accumulate_avx512(const float* p, int64_t ld, const float* v, int64_t stride, int64_t n, int64_t Q, float* a) {
  constexpr int QB = HB <= 2 ? 8 : HB <= 4 ? 4 : 2;  // QB x HB accumulators + HB values within the 32 registers
  int64_t u = 0;
  for (; u + QB <= Q; u += QB) accumulate_block<HB, QB>(p + u * ld, ld, v, stride, n, a + u * HB * 16);
  for (; u < Q; ++u) accumulate_block<HB, 1>(p + u * ld, ld, v, stride, n, a + u * HB * 16);
}

// exp_neg on 16 lanes (the same polynomial as the scalar form)
inline __m512 exp_neg16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5353362e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// s[0..n) <- exp((s - mx) * scale) where mx = max(m, s[0..n)); returns the sum of the new s, mx in *m
inline float softmax_update_avx512(float* s, int64_t n, float scale, float* m) {
  __m512 vmax = _mm512_set1_ps(*m);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  if (j < n) vmax = _mm512_mask_max_ps(vmax, (1u << (n - j)) - 1, vmax, _mm512_maskz_loadu_ps((1u << (n - j)) - 1, s + j));
  const float mx = _mm512_reduce_max_ps(vmax);
  const __m512 vm = _mm512_set1_ps(mx), vs = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 p = _mm512_maskz_mov_ps(k, exp_neg16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), vm), vs)));
    _mm512_mask_storeu_ps(s + j, k, p);
    sum = _mm512_add_ps(sum, p);
  }
  *m = mx;
  return _mm512_reduce_add_ps(sum);
}

// ---- many queries (a prefill chunk): scores as a matrix product. The chunk's keys of one head are transposed
// once, kt[h * ld + j] = key_j[h] (ld = the slots rounded up to 16, zero-padded), then register tiles of R queries x
// NB * 16 slots: per head-dim step NB key loads and R broadcasts for R x NB FMAs, where the dot-product form above
// needs a reduction tree per eight keys for every query.
// (16 slots of one head-dim entry per gather: a scalar transpose's column stores were half of this function's time)
inline void transpose_keys(const float* k, int64_t stride, int64_t n, int64_t H, int64_t ld, float* kt) {
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int32_t>(stride)));
  for (int64_t j = 0; j < ld; j += 16) {
    const __mmask16 m = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);  // n > j
    const float* base = k + j * stride;
    for (int64_t h = 0; h < H; ++h)
      _mm512_storeu_ps(kt + h * ld + j, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, base + h, 4));
  }
}

// s[r * ld + j] = q_r . key_j, r < R, j < 16 NB
template <int R, int NB>
inline void score_tile(const float* q, int64_t H, const float* kt, int64_t ld, float* s) {
  __m512 a[R * NB];
#pragma GCC unroll 16
  for (int e = 0; e < R * NB; ++e) a[e] = _mm512_setzero_ps();
  outer_steps<R, NB>(a, q, H, kt, ld, H);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NB; ++c) _mm512_storeu_ps(s + r * ld + 16 * c, a[r * NB + c]);
}

template <int NB>
void scores_gemm_nb(const float* q, int64_t Q, int64_t H, const float* kt, int64_t ld, float* s) {
  int64_t u = 0;
  for (; u + 4 <= Q; u += 4) score_tile<4, NB>(q + u * H, H, kt, ld, s + u * ld);
  for (; u < Q; ++u) score_tile<1, NB>(q + u * H, H, kt, ld, s + u * ld);
}

// s[u * ld + j] = q_u . key_j for u < Q, j < ld (ld a multiple of 16), in blocks of 64 slots
void scores_gemm(const float* q, int64_t Q, int64_t H, const float* kt, int64_t ld, float* s) {
  for (int64_t c = 0; c < ld; c += 64) {
    switch (std::min<int64_t>(4, (ld - c) / 16)) {
      case 1: scores_gemm_nb<1>(q, Q, H, kt + c, ld, s + c); break;
      case 2: scores_gemm_nb<2>(q, Q, H, kt + c, ld, s + c); break;
      case 3: scores_gemm_nb<3>(q, Q, H, kt + c, ld, s + c); break;
      default: scores_gemm_nb<4>(q, Q, H, kt + c, ld, s + c); break;
    }
  }
}
#endif

// the portable softmax update (see softmax_update_avx512)
inline float softmax_update(float* s, int64_t n, float scale, float* m) {
#if defined(__AVX512F__)
  return softmax_update_avx512(s, n, scale, m);
#else
  float mx = *m;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += (s[j] = exp_neg((s[j] - mx) * scale));
  *m = mx;
  return sum;
#endif
}

void scores(const float* q, const float* k, int64_t stride, int64_t n, int64_t H, float* s) {
#if defined(__AVX512F__)
  if (H == 32) return scores_avx512<2>(q, k, stride, n, s);
  if (H == 64) return scores_avx512<4>(q, k, stride, n, s);
  if (H == 128) return scores_avx512<8>(q, k, stride, n, s);
#endif
  scores_generic(q, k, stride, n, H, s);
}

void accumulate(const float* p, int64_t ld, const float* v, int64_t stride, int64_t n, int64_t H, int64_t Q,
                float* a) {
#if defined(__AVX512F__)
  if (H == 32) return accumulate_avx512<2>(p, ld, v, stride, n, Q, a);
  if (H == 64) return accumulate_avx512<4>(p, ld, v, stride, n, Q, a);
  if (H == 128) return accumulate_avx512<8>(p, ld, v, stride, n, Q, a);
#endif
  accumulate_generic(p, ld, v, stride, n, H, Q, a);
}

struct Shape {
  int64_t B, T, N, H, S, K, G, layer;
};

// Queries per KV head from which the scores are a matrix product (prefill-sized chunks). A speculative verify chunk
// of 6-8 tokens (18-24 queries of SmolLM2) measured 1.62-1.77 decode steps with dot products, 1.85-2.01 with
// the product, whose key transpose its few queries do not repay.
constexpr int64_t kGemmQueries = 64;
// Tokens of a prefill-sized chunk (T > 16) per task: each task reads the slots up to its last token's position.
constexpr int64_t kTaskTokens = 128;

bool gemm_scores(int64_t Q, int64_t H) {
#if defined(__AVX512F__)
  return Q >= kGemmQueries && H % 16 == 0;
#else
  (void)Q, (void)H;
  return false;
#endif
}

// The Q queries of one KV head against the slots [c0, c0 + n) of one chunk: scores, online-softmax update, values.
// kc / vc: that head's key / value of slot c0 in float32, the next slot ``stride`` elements on; su: [Q, 64]
// scratch ([Q, 256] with matrix-product scores, gemm_scores()); kt: [H, 256] scratch for the transposed keys.
void attend_chunk(const Shape& d, int64_t Q, const float* qh, const int32_t* qpos, const float* kc, const float* vc,
                  int64_t stride, const float* ksc, const float* vsc, int64_t c0, int64_t n, float* su, float* kt,
                  Partial& out) {
  const int64_t H = d.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  const bool gemm = gemm_scores(Q, H);
  const int64_t ld = gemm ? (n + 15) / 16 * 16 : n;  // row stride of the scores
#if defined(__AVX512F__)
  if (gemm) {
    transpose_keys(kc, stride, n, H, ld, kt);
    scores_gemm(qh, Q, H, kt, ld, su);
  }
#else
  (void)kt;
#endif
  int64_t most = 0;  // slots the queries see, at most
  for (int64_t u = 0; u < Q; ++u) {
    float* s = su + u * ld;
    const int64_t visible = std::clamp<int64_t>(qpos[u] - c0 + 1, 0, n);  // slots c0 .. qpos[u]
    most = std::max(most, visible);
    std::fill(s + visible, s + n, 0.f);
    if (visible == 0) continue;
    if (!gemm) scores(qh + u * H, kc, stride, visible, H, s);
    if (ksc)
      for (int64_t j = 0; j < visible; ++j) s[j] *= ksc[j * d.K];
    const float old = out.m[u];
    const float sum = softmax_update(s, visible, scale, &out.m[u]);
    const float corr = exp_neg((old - out.m[u]) * scale);  // m = -inf: 0 (acc and l are 0 then)
    out.l[u] = out.l[u] * corr + sum;
    float* a = out.acc.data() + u * H;
    if (corr != 1.f) {
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) a[h] *= corr;
    }
    if (vsc)
      for (int64_t j = 0; j < visible; ++j) s[j] *= vsc[j * d.K];
  }
  if (most > 0) accumulate(su, ld, vc, stride, most, H, Q, out.acc.data());
}

// Slots per chunk: keys and values of a chunk, all KV heads, in float32 (<= 256 KiB), stay in L2 while every query
// of every head reads them; at most `most` (kSlots, or kGemmSlots for matrix-product scores: fewer passes of
// per-query softmax work, a max and a sum reduction and the accumulator rescale, per slot).
int64_t chunk_slots(const Shape& d, int64_t most) {
  return std::clamp<int64_t>((256 << 10) / (8 * d.K * d.H) / 8 * 8, 8, most);
}

// Row b, tokens [t0, t1), slots [s0, s1), every KV head: out[kh] is the partial state of head kh's queries. Chunk
// by chunk, front to back; a bfloat16 / int8 chunk is first widened to float32 whole (all heads of a slot are one
// contiguous run of K * H elements, so this is one sequential read the hardware prefetchers follow), a float32
// chunk read in place.
template <typename C>
void attend_range(const Shape& d, const float* q, const C* k, const C* v, const float* ks, const float* vs,
                  const int32_t* pos, int64_t b, int64_t t0, int64_t t1, int64_t s0, int64_t s1, Partial* out) {
  const int64_t Tn = t1 - t0, Q = Tn * d.G, H = d.H, KH = d.K * H;
  const bool gemm = gemm_scores(Q, H);
  const int64_t cap = gemm ? kGemmSlots : kSlots, slots = chunk_slots(d, cap);
  constexpr bool in_place = std::is_same_v<C, float>;
  // queries of KV head kh: u = t * G + g  <->  q[b, t0 + t, kh * G + g, :], stored at qbuf[(kh * Q + u) * H]
  std::vector<float> qbuf(d.K * Q * H), scbuf(Q * cap), wide(in_place ? 0 : 2 * slots * KH);
  std::vector<float> kt(gemm ? H * cap : 0);
  std::vector<int32_t> qpos(Q);
  int32_t top = -1;  // the last slot any query of the range sees
  for (int64_t kh = 0; kh < d.K; ++kh)
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t g = 0; g < d.G; ++g)
        std::memcpy(qbuf.data() + (kh * Q + t * d.G + g) * H, q + ((b * d.T + t0 + t) * d.N + kh * d.G + g) * H,
                    H * sizeof(float));
  for (int64_t t = 0; t < Tn; ++t)
    for (int64_t g = 0; g < d.G; ++g) top = std::max(top, qpos[t * d.G + g] = pos[b * d.T + t0 + t]);
  for (int64_t kh = 0; kh < d.K; ++kh) {
    out[kh].acc.assign(Q * H, 0.f);
    out[kh].m.assign(Q, -INFINITY);
    out[kh].l.assign(Q, 0.f);
  }
  const int64_t row = (d.layer * d.B + b) * d.S;  // slot 0 of this row in the stacked cache
  for (int64_t c0 = s0; c0 < std::min<int64_t>(s1, top + 1); c0 += slots) {
    const int64_t n = std::min<int64_t>({slots, s1 - c0, top + 1 - c0});
    const C *kc = k + (row + c0) * KH, *vc = v + (row + c0) * KH;
    // the next chunk's keys and values are fetched into L2 while this one is computed
    const int64_t ahead = std::min<int64_t>(slots, std::min<int64_t>(s1, top + 1) - c0 - n) * KH * sizeof(C);
    for (int64_t off = 0; off < ahead; off += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(kc + n * KH) + off, 0, 2);
      __builtin_prefetch(reinterpret_cast<const char*>(vc + n * KH) + off, 0, 2);
    }
    const float *kf, *vf;
    if constexpr (in_place) {
      kf = kc, vf = vc;
    } else {
      float *kw = wide.data(), *vw = wide.data() + slots * KH;
#pragma omp simd
      for (int64_t e = 0; e < n * KH; ++e) kw[e] = widen(kc[e]);
#pragma omp simd
      for (int64_t e = 0; e < n * KH; ++e) vw[e] = widen(vc[e]);
      kf = kw, vf = vw;
    }
    for (int64_t kh = 0; kh < d.K; ++kh) {
      const int64_t at = (row + c0) * d.K + kh;  // scale index of (slot c0, head kh)
      attend_chunk(d, Q, qbuf.data() + kh * Q * H, qpos.data(), kf + kh * H, vf + kh * H, KH,
                   ks ? ks + at : nullptr, vs ? vs + at : nullptr, c0, n, scbuf.data(), kt.data(), out[kh]);
    }
  }
}

// out[b, t0 + t, kh * G + g, :] = the merged softmax average of the partial states parts[0..split) of (b, kh)
// (each over tokens [t0, t0 + Tn)): flash-decoding's merge, one part when the slots were not split.
void finish(const Shape& d, const Partial* const* parts, int64_t split, int64_t b, int64_t kh, int64_t t0, int64_t Tn,
            float* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  for (int64_t u = 0; u < Tn * d.G; ++u) {
    const int64_t t = t0 + u / d.G, g = u % d.G;
    float m = -INFINITY;
    for (int64_t p = 0; p < split; ++p) m = std::max(m, parts[p]->m[u]);
    float* o = out + ((b * d.T + t) * d.N + kh * d.G + g) * d.H;
    std::fill(o, o + d.H, 0.f);
    if (m == -INFINITY) continue;
    float l = 0.f;
    for (int64_t p = 0; p < split; ++p) {
      const Partial& part = *parts[p];
      if (part.m[u] == -INFINITY) continue;
      const float c = exp_neg((part.m[u] - m) * scale);
      l += part.l[u] * c;
      const float* a = part.acc.data() + u * d.H;
      for (int64_t h = 0; h < d.H; ++h) o[h] += a[h] * c;
    }
    const float inv = 1.0f / std::max(l, 1.17549435e-38f);
    for (int64_t h = 0; h < d.H; ++h) o[h] *= inv;
  }
}

template <typename C>
ffi::Error Attend(ffi::ThreadPool pool, const Shape& d, const float* q, const C* k, const C* v, const float* ks,
                  const float* vs, const int32_t* pos, float* out) {
  if (d.T > 16) {
    // a prefill-sized chunk: tasks of kTaskTokens tokens of a row, each over every slot its tokens see (no merge)
    const int64_t per_row = (d.T + kTaskTokens - 1) / kTaskTokens;
    llama_jax::parallel_for(pool, d.B * per_row, [&, d](int64_t i) {
      const int64_t b = i / per_row, t0 = (i % per_row) * kTaskTokens, t1 = std::min(d.T, t0 + kTaskTokens);
      std::vector<Partial> mine(d.K);
      attend_range<C>(d, q, k, v, ks, vs, pos, b, t0, t1, 0, d.S, mine.data());
      for (int64_t kh = 0; kh < d.K; ++kh) {
        const Partial* part = &mine[kh];
        finish(d, &part, 1, b, kh, t0, t1 - t0, out);
      }
    });
    return ffi::Error::Success();
  }
  // slots each row needs: up to its longest query (clamped to the cache)
  std::vector<int64_t> need(d.B);
  int64_t most = 0;
  for (int64_t b = 0; b < d.B; ++b) {
    int64_t top = -1;
    for (int64_t t = 0; t < d.T; ++t) top = std::max<int64_t>(top, pos[b * d.T + t]);
    need[b] = std::clamp<int64_t>(top + 1, 0, d.S);
    most = std::max(most, need[b]);
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // split each row's slots into ranges of >= 512 so every thread has work at batch 1
  const int64_t split =
      std::clamp<int64_t>((2 * threads + d.B - 1) / d.B, 1, std::max<int64_t>(1, most / 512));
  std::vector<Partial> parts(d.B * d.K * split);  // [B, K, split]
  llama_jax::parallel_for(pool, d.B * split, [&, d](int64_t i) {
    const int64_t b = i / split, part = i % split;
    const int64_t len = need[b], per = (len + split - 1) / split;
    std::vector<Partial> mine(d.K);
    attend_range<C>(d, q, k, v, ks, vs, pos, b, 0, d.T, std::min(len, part * per), std::min(len, (part + 1) * per),
                    mine.data());
    for (int64_t kh = 0; kh < d.K; ++kh) parts[(b * d.K + kh) * split + part] = std::move(mine[kh]);
  });
  std::vector<const Partial*> row(split);
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t kh = 0; kh < d.K; ++kh) {
      for (int64_t p = 0; p < split; ++p) row[p] = &parts[(b * d.K + kh) * split + p];
      finish(d, row.data(), split, b, kh, 0, d.T, out);
    }
  return ffi::Error::Success();
}

template <ffi::DataType DT, typename C>
ffi::Error Handler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> positions,
                   ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || (kd.size() != 5 && kd.size() != 4))
    return ffi::Error::InvalidArgument("llama_jax_decode_attention: want q [B, T, N, H], k [(L,) B, S, K, H]");
  const bool stacked = kd.size() == 5;
  const int64_t off = stacked ? 1 : 0;
  Shape d{qd[0], qd[1], qd[2], qd[3], kd[off + 1], kd[off + 2], 0, 0};
  d.G = d.N / d.K;
  d.layer = stacked ? layer.typed_data()[0] : 0;
  const int64_t L = stacked ? kd[0] : 1;
  if (kd[off] != d.B || kd[off + 3] != d.H || d.N % d.K != 0 || d.layer < 0 || d.layer >= L)
    return ffi::Error::InvalidArgument("llama_jax_decode_attention: q, k and layer do not match");
  const bool scaled = DT == ffi::DataType::S8;
  return Attend<C>(pool, d, q.typed_data(), reinterpret_cast<const C*>(k.untyped_data()),
                   reinterpret_cast<const C*>(v.untyped_data()), scaled ? k_scale.typed_data() : nullptr,
                   scaled ? v_scale.typed_data() : nullptr, positions.typed_data(), out->typed_data());
}

}  // namespace

#define LLAMA_JAX_DECODE_ATTENTION(NAME, DT, C)                                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, (Handler<DT, C>),                                                 \
                                ffi::Ffi::Bind()                                                        \
                                    .Ctx<ffi::ThreadPool>()                                             \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                       \
                                    .Arg<ffi::AnyBuffer>()                                              \
                                    .Arg<ffi::AnyBuffer>()                                              \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                       \
                                    .Arg<ffi::Buffer<ffi::F32>>()                                       \
                                    .Arg<ffi::Buffer<ffi::S32>>()                                       \
                                    .Arg<ffi::Buffer<ffi::S32>>()                                       \
                                    .Ret<ffi::Buffer<ffi::F32>>());

LLAMA_JAX_DECODE_ATTENTION(LlamaJaxDecodeAttentionF32, ffi::DataType::F32, float)
LLAMA_JAX_DECODE_ATTENTION(LlamaJaxDecodeAttention16, ffi::DataType::BF16, uint16_t)
LLAMA_JAX_DECODE_ATTENTION(LlamaJaxDecodeAttentionI8, ffi::DataType::S8, int8_t)

// ---- KV cache write in place: cache[layer, b, positions[b, t]] = values[b, t] (slots outside [0, S) dropped).
//   cache: [L, B, S, K, H] or [B, S, K, H], any dtype; values: [B, T, K, H], the cache's dtype; positions: int32
//   [B, T]; layer: int32 [1]. The result aliases the cache operand (input_output_aliases), so nothing else is
//   copied. Why: XLA:CPU has no bfloat16 scatter, and a uint16 view of a cache that a custom call reads is
//   materialised as a copy of the whole cache.
namespace {

ffi::Error CacheWrite(ffi::AnyBuffer cache, ffi::AnyBuffer values, ffi::Buffer<ffi::S32> positions,
                      ffi::Buffer<ffi::S32> layer, ffi::Result<ffi::AnyBuffer> out) {
  const auto cd = cache.dimensions(), vd = values.dimensions();
  if ((cd.size() != 5 && cd.size() != 4) || vd.size() != 4 || cache.element_type() != values.element_type())
    return ffi::Error::InvalidArgument("llama_jax_kv_write: want cache [(L,) B, S, K, H], values [B, T, K, H]");
  const int64_t off = cd.size() == 5 ? 1 : 0;
  const int64_t L = off ? cd[0] : 1, B = cd[off], S = cd[off + 1], K = cd[off + 2], H = cd[off + 3];
  const int64_t T = vd[1];
  const int64_t l = off ? layer.typed_data()[0] : 0;
  if (vd[0] != B || vd[2] != K || vd[3] != H || l < 0 || l >= L)
    return ffi::Error::InvalidArgument("llama_jax_kv_write: values or layer do not match the cache");
  const size_t row = static_cast<size_t>(K * H) * (cache.size_bytes() / cache.element_count());
  auto* dst = static_cast<char*>(out->untyped_data());
  const auto* src = static_cast<const char*>(values.untyped_data());
  if (dst != cache.untyped_data()) std::memcpy(dst, cache.untyped_data(), cache.size_bytes());  // not aliased
  const int32_t* pos = positions.typed_data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = pos[b * T + t];
      if (s < 0 || s >= S) continue;
      std::memcpy(dst + ((l * B + b) * S + s) * row, src + (b * T + t) * row, row);
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxKVWrite, CacheWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
