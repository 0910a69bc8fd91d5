// Decode attention over a dense KV cache, for XLA:CPU (a jax.ffi custom call): the queries of a decode-sized
// chunk (T <= 16 tokens per row) against the cache slots up to each query's position, read in place.
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
// up to the longest query of a row are read; work is split over (row, KV head, slot range) on XLA's intra-op
// thread pool and the partial softmax states merged as in flash-decoding.
//
// Why: the XLA path loops over cache blocks (a while loop per layer) and, on XLA:CPU, copies every block it
// slices out of the stacked cache before the dot; at 4000 tokens that was 24 ms of a 60 ms SmolLM2 step.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

constexpr int64_t kSlots = 64;  // slots scored at a time

struct Partial {  // online-softmax state of the queries of one (row, KV head) over one slot range
  std::vector<float> m, l;  // [Q]
  std::vector<float> acc;   // [Q, H]
};

// ---- the two inner products of a chunk: scores s[j] = q . key_j, and a += sum_j p[j] value_j.
// key_j / value_j = base + j * stride (elements); H the head dim. Portable forms first, AVX-512 ones after.
template <typename C>
void scores_generic(const float* q, const C* k, int64_t stride, int64_t n, int64_t H, float* s) {
  for (int64_t j = 0; j < n; ++j) {
    const C* kj = k + j * stride;
    float a = 0.f;
#pragma omp simd reduction(+ : a)
    for (int64_t h = 0; h < H; ++h) a += q[h] * widen(kj[h]);
    s[j] = a;
  }
}

template <typename C>
void accumulate_generic(const float* p, const C* v, int64_t stride, int64_t n, int64_t H, float* a) {
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    const C* vj = v + j * stride;
    const float pj = p[j];
#pragma omp simd
    for (int64_t h = 0; h < H; ++h) a[h] += pj * widen(vj[h]);
  }
}

#if defined(__AVX512F__)
#include <immintrin.h>

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const uint16_t* p) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// four keys at a time: four independent FMA chains, one reduction each
template <typename C, int HB>
void scores_avx512(const float* q, const C* k, int64_t stride, int64_t n, float* s) {
  __m512 qv[HB];
  for (int i = 0; i < HB; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const C *k0 = k + j * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
    for (int i = 0; i < HB; ++i) {
      a0 = _mm512_fmadd_ps(qv[i], load16(k0 + 16 * i), a0);
      a1 = _mm512_fmadd_ps(qv[i], load16(k1 + 16 * i), a1);
      a2 = _mm512_fmadd_ps(qv[i], load16(k2 + 16 * i), a2);
      a3 = _mm512_fmadd_ps(qv[i], load16(k3 + 16 * i), a3);
    }
    s[j] = _mm512_reduce_add_ps(a0), s[j + 1] = _mm512_reduce_add_ps(a1);
    s[j + 2] = _mm512_reduce_add_ps(a2), s[j + 3] = _mm512_reduce_add_ps(a3);
  }
  for (; j < n; ++j) {
    __m512 a = _mm512_setzero_ps();
    for (int i = 0; i < HB; ++i) a = _mm512_fmadd_ps(qv[i], load16(k + j * stride + 16 * i), a);
    s[j] = _mm512_reduce_add_ps(a);
  }
}

// the accumulator row stays in registers over the chunk
template <typename C, int HB>
void accumulate_avx512(const float* p, const C* v, int64_t stride, int64_t n, float* a) {
  __m512 acc[HB];
  for (int i = 0; i < HB; ++i) acc[i] = _mm512_loadu_ps(a + 16 * i);
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    const __m512 pj = _mm512_set1_ps(p[j]);
    const C* vj = v + j * stride;
    for (int i = 0; i < HB; ++i) acc[i] = _mm512_fmadd_ps(pj, load16(vj + 16 * i), acc[i]);
  }
  for (int i = 0; i < HB; ++i) _mm512_storeu_ps(a + 16 * i, acc[i]);
}
#endif

template <typename C>
void scores(const float* q, const C* k, int64_t stride, int64_t n, int64_t H, float* s) {
#if defined(__AVX512F__)
  if (H == 64) return scores_avx512<C, 4>(q, k, stride, n, s);
  if (H == 128) return scores_avx512<C, 8>(q, k, stride, n, s);
#endif
  scores_generic(q, k, stride, n, H, s);
}

template <typename C>
void accumulate(const float* p, const C* v, int64_t stride, int64_t n, int64_t H, float* a) {
#if defined(__AVX512F__)
  if (H == 64) return accumulate_avx512<C, 4>(p, v, stride, n, a);
  if (H == 128) return accumulate_avx512<C, 8>(p, v, stride, n, a);
#endif
  accumulate_generic(p, v, stride, n, H, a);
}

struct Shape {
  int64_t B, T, N, H, S, K, G, layer;
};

template <typename C>
void attend_range(const Shape& d, const float* q, const C* k, const C* v, const float* ks, const float* vs,
                  const int32_t* pos, int64_t b, int64_t kh, int64_t s0, int64_t s1, Partial& out) {
  const int64_t Q = d.T * d.G, H = d.H;
  const float scale = 1.0f / std::sqrt(static_cast<float>(H));
  // queries of this KV head: u = t * G + g  <->  q[b, t, kh * G + g, :]
  std::vector<float> qbuf(Q * H), scbuf(kSlots);
  std::vector<int32_t> qpos(Q);
  for (int64_t t = 0; t < d.T; ++t)
    for (int64_t g = 0; g < d.G; ++g) {
      std::memcpy(qbuf.data() + (t * d.G + g) * H, q + ((b * d.T + t) * d.N + kh * d.G + g) * H, H * sizeof(float));
      qpos[t * d.G + g] = pos[b * d.T + t];
    }
  out.acc.assign(Q * H, 0.f);
  out.m.assign(Q, -INFINITY);
  out.l.assign(Q, 0.f);
  const int64_t row = (d.layer * d.B + b) * d.S;  // slot 0 of this row in the stacked cache
  const int64_t stride = d.K * H;                 // elements from one slot to the next
  float* su = scbuf.data();
  // chunk-major, query-minor: a chunk's keys and values (<= 64 x 512 B for H = 128 bf16) stay in L1/L2 while
  // every query of the head reads them
  for (int64_t c0 = s0; c0 < s1; c0 += kSlots) {
    const int64_t n = std::min<int64_t>(kSlots, s1 - c0);
    const C* kc = k + ((row + c0) * d.K + kh) * H;
    const C* vc = v + ((row + c0) * d.K + kh) * H;
    const float* ksc = ks ? ks + (row + c0) * d.K + kh : nullptr;
    const float* vsc = vs ? vs + (row + c0) * d.K + kh : nullptr;
    for (int64_t u = 0; u < Q; ++u) {
      const int64_t visible = std::clamp<int64_t>(qpos[u] - c0 + 1, 0, n);  // slots c0 .. qpos[u]
      if (visible == 0) continue;
      scores(qbuf.data() + u * H, kc, stride, visible, H, su);
      float mx = out.m[u];
      for (int64_t j = 0; j < visible; ++j) {
        if (ksc) su[j] *= ksc[j * d.K];
        mx = std::max(mx, su[j]);
      }
      const float corr = exp_neg((out.m[u] - mx) * scale);  // m = -inf: 0 (acc and l are 0 then)
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < visible; ++j) {
        const float p = exp_neg((su[j] - mx) * scale);
        su[j] = p;
        sum += p;
      }
      out.l[u] = out.l[u] * corr + sum;
      out.m[u] = mx;
      float* a = out.acc.data() + u * H;
      if (corr != 1.f) {
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) a[h] *= corr;
      }
      if (vsc)
        for (int64_t j = 0; j < visible; ++j) su[j] *= vsc[j * d.K];
      accumulate(su, vc, stride, visible, H, a);
    }
  }
}

template <typename C>
ffi::Error Attend(ffi::ThreadPool pool, const Shape& d, const float* q, const C* k, const C* v, const float* ks,
                  const float* vs, const int32_t* pos, float* out) {
  const int64_t Q = d.T * d.G;
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
  // split each (row, head)'s slots into ranges of >= 512 so every thread has work at batch 1
  const int64_t split = std::clamp<int64_t>((2 * threads + d.B * d.K - 1) / (d.B * d.K), 1,
                                            std::max<int64_t>(1, most / 512));
  const int64_t tasks = d.B * d.K * split;
  std::vector<Partial> parts(tasks);
  llama_jax::parallel_for(pool, tasks, [&, d](int64_t i) {
    const int64_t b = i / (d.K * split), kh = (i / split) % d.K, part = i % split;
    const int64_t len = need[b], per = (len + split - 1) / split;
    attend_range<C>(d, q, k, v, ks, vs, pos, b, kh, std::min(len, part * per), std::min(len, (part + 1) * per),
                    parts[i]);
  });
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.H));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t kh = 0; kh < d.K; ++kh)
      for (int64_t u = 0; u < Q; ++u) {
        const int64_t t = u / d.G, g = u % d.G;
        float m = -INFINITY;
        for (int64_t p = 0; p < split; ++p) m = std::max(m, parts[(b * d.K + kh) * split + p].m[u]);
        float* o = out + ((b * d.T + t) * d.N + kh * d.G + g) * d.H;
        std::fill(o, o + d.H, 0.f);
        if (m == -INFINITY) continue;
        float l = 0.f;
        for (int64_t p = 0; p < split; ++p) {
          const Partial& part = parts[(b * d.K + kh) * split + p];
          if (part.m[u] == -INFINITY) continue;
          const float c = exp_neg((part.m[u] - m) * scale);
          l += part.l[u] * c;
          const float* a = part.acc.data() + u * d.H;
          for (int64_t h = 0; h < d.H; ++h) o[h] += a[h] * c;
        }
        const float inv = 1.0f / std::max(l, 1.17549435e-38f);
        for (int64_t h = 0; h < d.H; ++h) o[h] *= inv;
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
