// Few-row matrix products against int8 / bfloat16 / float32 weights stored [out, in], for XLA:CPU (jax.ffi custom calls).
//
//   y[r, o] = scale[o] * sum_i x[r, i] * float(w[o, i])        (int8 weight, per-output-channel scale)
//   y[r, o] =            sum_i x[r, i] * float(w[o, i])        (bfloat16 or float32 weight)
//
// x: float32 [R, I]; w: int8, bfloat16 (as uint16 bits) or float32 [O, I]; scale: float32 [O]; y: float32 [R, O].
// Float32 accumulation; the weight is widened in registers and read once per call, whatever R is.
//
// Why: XLA:CPU lowers a one-row product against a weight cast in the dot to a generated loop that streams
// int8 at ~10 GB/s and bf16 at ~15 GB/s, half of what the float32 dot reaches, so int8/bf16 decode paid in time what
// it saved in bytes; and XLA's float32 dot reads the weight 1.3-3x slower than the bandwidth allows at 2-16 rows.
// Here: one row is the textbook memory-bound matrix-vector product (one linear weight stream), 2-3 rows share
// that stream; more rows are register tiles of 4 rows x 4 output channels (16 FMAs for every 8 loads; the next
// tile prefetched as one linear stream), so a speculative verify chunk or a small batch costs little more than
// one row. AVX-512 intrinsics where the host has them, otherwise a loop the compiler vectorises (`omp simd`);
// built for the host ISA by llama_jax/cpu_kernels.py; output channels split over XLA's intra-op thread pool.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float widen(float v) { return v; }
inline float widen(int8_t v) { return static_cast<float>(v); }
inline float widen(uint16_t v) { return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16); }

#if defined(__AVX512F__)
#include <immintrin.h>

// 16 weights widened to float32 in registers; `mask` selects the valid lanes of a tail.
inline __m512 widen16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 widen16(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
inline __m512 widen16(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// The four lane sums of a[0..3], as one vector [sum a0, sum a1, sum a2, sum a3].
inline __m256 halves(__m512 a) {
  return _mm256_add_ps(_mm512_extractf32x8_ps(a, 0), _mm512_extractf32x8_ps(a, 1));
}
inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(halves(a0), halves(a1)), _mm256_hadd_ps(halves(a2), halves(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// A register tile: y[r0 + r, o0 + o] for r < kR, o < kO (kO = 1 or a multiple of 4). Every step loads kO weight
// vectors and kR activation vectors for kR x kO FMAs, so a tile of several rows is bound by the FMA rate, not by
// loads; the lane sums are taken once per tile.
template <typename W, int kR, int kO>
inline void tile(const float* x, const W* w, const float* scale, float* y, int64_t I, int64_t O, int64_t r0,
                 int64_t o0) {
  __m512 a[kR * kO];  // a[r * kO + o]: one flat array, which GCC keeps in registers (a 2-D one it spills)
  #pragma GCC unroll 16
  for (int j = 0; j < kR * kO; ++j) a[j] = _mm512_setzero_ps();
  const W* wo = w + o0 * I;
  const char* next = reinterpret_cast<const char*>(wo + kO * I);
  const float* xr = x + r0 * I;
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = I - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (I - i)) - 1);
    // The next tile's weights, kO x I contiguous, fetched as one linear stream at the rate this one is read:
    // each weight row of a tile is too short a stream for the hardware prefetcher to learn.
    #pragma GCC unroll 16
    for (int b = 0; b < kO * 16 * int(sizeof(W)); b += 64) _mm_prefetch(next + i * kO * sizeof(W) + b, _MM_HINT_T0);
    __m512 wv[kO];
    #pragma GCC unroll 16
    for (int o = 0; o < kO; ++o) wv[o] = widen16(wo + o * I + i, m);
    #pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xr + r * I + i);
      #pragma GCC unroll 16
      for (int o = 0; o < kO; ++o) a[r * kO + o] = _mm512_fmadd_ps(xv, wv[o], a[r * kO + o]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < kR; ++r) {
    float* yr = y + (r0 + r) * O + o0;
    if constexpr (kO % 4 != 0) {
#pragma GCC unroll 16
      for (int o = 0; o < kO; ++o) yr[o] = _mm512_reduce_add_ps(a[r * kO + o]) * (scale ? scale[o0 + o] : 1.f);
    } else {
      #pragma GCC unroll 16
      for (int o = 0; o < kO; o += 4) {
        __m128 v = sum4(a[r * kO + o], a[r * kO + o + 1], a[r * kO + o + 2], a[r * kO + o + 3]);
        if (scale) v = _mm_mul_ps(v, _mm_loadu_ps(scale + o0 + o));
        _mm_storeu_ps(yr + o, v);
      }
    }
  }
}

// Output channels [o0, o1) for rows [r0, r0 + kR), in tiles of kO channels and a one-channel tail.
template <typename W, int kR, int kO>
void rows_block(const float* x, const W* w, const float* scale, float* y, int64_t I, int64_t O, int64_t r0,
                int64_t o0, int64_t o1) {
  int64_t o = o0;
  for (; o + kO <= o1; o += kO) tile<W, kR, kO>(x, w, scale, y, I, O, r0, o);
  for (; o < o1; ++o) tile<W, kR, 1>(x, w, scale, y, I, O, r0, o);
}

// One to three rows (decode at batch 1, small verify chunks), one weight row after another: a single linear stream
// the hardware prefetcher follows, each weight vector used for kR rows (2 FMA chains a row; the kR activation rows
// are read from L1). Measured faster for float32 at 1-3 rows than the 4-channel tiles, whose 4 short row streams
// and software prefetches cost more than the extra activation loads (5-6 rows: even; 8: slower); bf16 and int8
// even. At 4 rows the tiles won (SmolLM2's 211 products: 22-23 ms against 27-28, float32, best of 30).
template <typename W, int kR>
void stream_rows(const float* x, const W* w, const float* scale, float* y, int64_t I, int64_t O, int64_t o0,
                 int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* wo = w + o * I;
    __m512 a[2 * kR];
#pragma GCC unroll 16
    for (int j = 0; j < 2 * kR; ++j) a[j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= I; i += 32) {
      const __m512 w0 = widen16(wo + i, 0xFFFF), w1 = widen16(wo + i + 16, 0xFFFF);
#pragma GCC unroll 16
      for (int r = 0; r < kR; ++r) {
        a[2 * r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * I + i), w0, a[2 * r]);
        a[2 * r + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * I + i + 16), w1, a[2 * r + 1]);
      }
    }
    for (; i < I; i += 16) {
      const __mmask16 m = I - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (I - i)) - 1);
      const __m512 w0 = widen16(wo + i, m);
#pragma GCC unroll 16
      for (int r = 0; r < kR; ++r) a[2 * r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + r * I + i), w0, a[2 * r]);
    }
    const float s = scale ? scale[o] : 1.f;
#pragma GCC unroll 16
    for (int r = 0; r < kR; ++r) y[r * O + o] = _mm512_reduce_add_ps(_mm512_add_ps(a[2 * r], a[2 * r + 1])) * s;
  }
}

// 1-3 rows: one weight stream (stream_rows). More: tiles of 4 channels by 4 rows (16 accumulators: 16
// FMAs for 8 loads a step) and a 1-3-row remainder; each row group after the first reads the chunk's weights
// from L1/L2. (6-row tiles, 24 accumulators, and single-pass 5-8-row tiles measured no faster.)
template <typename W>
void channels(const float* x, const W* w, const float* scale, float* y, int64_t R, int64_t I, int64_t O,
              int64_t o0, int64_t o1) {
  switch (R) {  // 1-3 rows: one weight stream; more: register tiles
    case 1: return stream_rows<W, 1>(x, w, scale, y, I, O, o0, o1);
    case 2: return stream_rows<W, 2>(x, w, scale, y, I, O, o0, o1);
    case 3: return stream_rows<W, 3>(x, w, scale, y, I, O, o0, o1);
    default: break;
  }
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) rows_block<W, 4, 4>(x, w, scale, y, I, O, r, o0, o1);
  switch (R - r) {
    case 3: rows_block<W, 3, 4>(x, w, scale, y, I, O, r, o0, o1); break;
    case 2: rows_block<W, 2, 4>(x, w, scale, y, I, O, r, o0, o1); break;
    case 1: rows_block<W, 1, 4>(x, w, scale, y, I, O, r, o0, o1); break;
    default: break;
  }
}
#else
// Portable form: the compiler vectorises the widening multiply-add for the host ISA.
template <typename W>
void channels(const float* x, const W* w, const float* scale, float* y, int64_t R, int64_t I, int64_t O,
              int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const W* wo = w + o * I;
    const float s = scale ? scale[o] : 1.f;
    for (int64_t r = 0; r < R; ++r) {
      const float* xr = x + r * I;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t i = 0; i < I; ++i) a += xr[i] * widen(wo[i]);
      y[r * O + o] = a * s;
    }
  }
}
#endif

// The output channels in chunks of kChunk, over the calling thread and XLA's intra-op pool (parallel_for.h).
constexpr int64_t kChunk = 64;  // output channels per task: 64 x 1536 int8 = 96 KiB of weight

template <typename W>
ffi::Error Matvec(ffi::ThreadPool pool, const float* x, const W* w, const float* scale, float* y, int64_t R,
                  int64_t I, int64_t O) {
  llama_jax::parallel_for(pool, (O + kChunk - 1) / kChunk, [=](int64_t c) {
    channels<W>(x, w, scale, y, R, I, O, c * kChunk, std::min(O, (c + 1) * kChunk));
  });
  return ffi::Error::Success();
}

ffi::Error MatvecI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                    ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1] || scale.element_count() != wd[0])
    return ffi::Error::InvalidArgument("llama_jax_matvec_i8: want x [R, I], w [O, I], scale [O]");
  return Matvec<int8_t>(pool, x.typed_data(), w.typed_data(), scale.typed_data(), y->typed_data(), xd[0], xd[1],
                        wd[0]);
}

ffi::Error MatvecF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("llama_jax_matvec_f32: want x [R, I], w [O, I]");
  return Matvec<float>(pool, x.typed_data(), w.typed_data(), nullptr, y->typed_data(), xd[0], xd[1], wd[0]);
}

ffi::Error MatvecBF16(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("llama_jax_matvec_bf16: want x [R, I], w [O, I]");
  return Matvec<uint16_t>(pool, x.typed_data(), reinterpret_cast<const uint16_t*>(w.typed_data()), nullptr,
                          y->typed_data(), xd[0], xd[1], wd[0]);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxMatvecI8, MatvecI8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxMatvecBF16, MatvecBF16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlamaJaxMatvecF32, MatvecF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
