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
// it saved in bytes. This loop is the textbook memory-bound matrix-vector product (vectorised by the compiler
// with `omp simd`, built for the host ISA by llama_jax/cpu_kernels.py) split over XLA's intra-op thread pool.
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

// acc[r] = sum_i xr[r][i] * w[i] for kRows rows; two vectors per step so one row still has two FMA chains.
template <typename W, int kRows>
inline void dot_rows(const float* const* xr, const W* w, int64_t I, float* acc) {
  __m512 a[kRows][2];
  for (int r = 0; r < kRows; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= I; i += 32) {
    const __m512 w0 = widen16(w + i, 0xFFFF), w1 = widen16(w + i + 16, 0xFFFF);
    for (int r = 0; r < kRows; ++r) {
      a[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + i), w0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + i + 16), w1, a[r][1]);
    }
  }
  for (; i < I; i += 16) {
    const __mmask16 m = I - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (I - i)) - 1);
    const __m512 w0 = widen16(w + i, m);
    for (int r = 0; r < kRows; ++r) a[r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xr[r] + i), w0, a[r][0]);
  }
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r][0], a[r][1]));
}
#else
// Portable form: the compiler vectorises the widening multiply-add for the host ISA.
template <typename W, int kRows>
inline void dot_rows(const float* const* xr, const W* w, int64_t I, float* acc) {
  for (int r = 0; r < kRows; ++r) {
    float a = 0.f;
    const float* x = xr[r];
#pragma omp simd reduction(+ : a)
    for (int64_t i = 0; i < I; ++i) a += x[i] * widen(w[i]);
    acc[r] = a;
  }
}
#endif

// Output channels [o0, o1) for rows [r0, r0 + kRows); each weight row is read from memory once per call and from
// L1 for the other row groups.
template <typename W, int kRows>
void rows_block(const float* x, const W* w, const float* scale, float* y, int64_t I, int64_t O, int64_t r0,
                int64_t o0, int64_t o1) {
  const float* xr[kRows];
  for (int r = 0; r < kRows; ++r) xr[r] = x + (r0 + r) * I;
  for (int64_t o = o0; o < o1; ++o) {
    float acc[kRows];
    dot_rows<W, kRows>(xr, w + o * I, I, acc);
    const float s = scale ? scale[o] : 1.f;
    for (int r = 0; r < kRows; ++r) y[(r0 + r) * O + o] = acc[r] * s;
  }
}

template <typename W>
void channels(const float* x, const W* w, const float* scale, float* y, int64_t R, int64_t I, int64_t O,
              int64_t o0, int64_t o1) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) rows_block<W, 4>(x, w, scale, y, I, O, r, o0, o1);
  for (; r + 2 <= R; r += 2) rows_block<W, 2>(x, w, scale, y, I, O, r, o0, o1);
  for (; r < R; ++r) rows_block<W, 1>(x, w, scale, y, I, O, r, o0, o1);
}

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
