// CPU kernel of belm::lincomb_ext (the "cpu" backend of belm_kernels): with inputs x, t_1..t_K
// (K = 1 to 6 terms) and coefficient rows c[m] (one per output m = 0..M-1, M = 1 to 3),
//
//   inverse == false:  out[m] <- c[m,0]*x + c[m,1]*t_1 + ... + c[m,K]*t_K
//                      acc = c0*x; acc = fma(c1, t1, acc); ...; acc = fma(cK, tK, acc)
//   inverse == true:   out[m] <- (x - c[m,1]*t_1 - ... - c[m,K]*t_K) / c[m,0]
//                      acc = x; acc = fma(-c1, t1, acc); ...; acc = fma(-cK, tK, acc); acc / c0
//
// with x None meaning x is out[0] as it was (the in-place update). Every operand has its own
// float dtype (float16, bfloat16, float32, float64); every input is read before any output is
// written. coef is (M, K+1) values shared by the batch or (B, M, K+1), one set per index along
// the first dimension (size-1 dimensions may be left out: (K+1,), (B, K+1)). Math in float32
// (float64 for float64 x): terms are rounded to it (float64 -> float32 to nearest even), each
// multiply, fma and the division rounds once, and each output is rounded once to its own dtype,
// to nearest even (a float64 result goes to float16/bfloat16 through float32 rounded to odd,
// which makes the two steps one correct rounding).
//
// The schema is defined once, in Python (belm_kernels/ops.py); this file only registers the CPU
// implementation (TORCH_LIBRARY_IMPL), so it must be loaded after belm_kernels.ops is imported.
// A zero leading coefficient of the inverse is not checked here (ops.py does, where coef is on
// the CPU): it gives inf/nan, as on the GPU.
//
// Paths:
//   * every operand contiguous: one fused pass, at::parallel_for over the flat range (split at
//     sample boundaries for per-sample coefficients), AVX-512F or AVX2+FMA+F16C code chosen at
//     run time, portable code otherwise. The vector code is lincomb_cpu_simd.h, compiled once
//     per instruction set inside a #pragma GCC target region, so the library itself needs only
//     the baseline ISA;
//   * anything else (strided, channels-last, sliced views): a TensorIterator over the outputs,
//     the inputs and (per-sample rows) a broadcast view of the row indices; inner runs that are
//     contiguous for every operand reuse the vectorised code.
// The vector and scalar code compute the same operations in the same order with the same
// roundings, so every path gives bit-identical results. BELM_KERNELS_CPU_ISA=scalar|avx2|avx512
// (read once) caps the instruction set, which the tests use to check exactly that.

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BELM_X86 1
#else
#define BELM_X86 0
#endif

// The vector code must be inlined into each instruction set's loops (a call per step would move
// every vector through memory).
#define BELM_INLINE inline __attribute__((always_inline))

namespace belm {
namespace {

constexpr int kMaxInputs = 7;  // x and up to 6 terms (belm_kernels.ops.MAX_TERMS)
constexpr int kMaxOutputs = 3;  // belm_kernels.ops.MAX_OUTPUTS

// Elements per parallel task: below this a call runs on one thread (a fork/join costs a few
// microseconds, about what 64K elements of traffic take on one core).
constexpr int64_t kGrainSize = 65536;

enum class DType : uint8_t { kHalf, kBFloat16, kFloat, kDouble };

// The operands of one contiguous run (or one element): byte pointers and dtypes.
struct Operands {
  int nin = 0;   // K + 1: x, then the terms
  int nout = 0;  // M
  const char* in[kMaxInputs] = {};
  DType in_t[kMaxInputs] = {};
  char* out[kMaxOutputs] = {};
  DType out_t[kMaxOutputs] = {};
};

// One coefficient row, as the arithmetic uses it: acc = w[m][0] * x, acc = fma(w[m][j], t_j,
// acc), then acc / d[m] if divide. Forward: w = c, no division. Inverse: w[m][0] = 1 (an exact
// multiply), w[m][j] = -c[m][j] (exact), d[m] = c[m][0].
template <typename CT>
struct Weights {
  CT w[kMaxOutputs][kMaxInputs];
  CT d[kMaxOutputs];
  bool divide;
};

template <typename CT>
Weights<CT> make_weights(const CT* row, int nin, int nout, bool inverse) {
  Weights<CT> w{};
  w.divide = inverse;
  for (int m = 0; m < nout; ++m) {
    const CT* c = row + m * nin;
    w.d[m] = c[0];
    w.w[m][0] = inverse ? CT(1) : c[0];
    for (int j = 1; j < nin; ++j) {
      w.w[m][j] = inverse ? -c[j] : c[j];
    }
  }
  return w;
}

template <typename CT>
using ContiguousFn = void (*)(const Operands&, int64_t, int64_t, const Weights<CT>&);

// Operand dtypes as the vector code sees them: Is<D> (fixed at compile time: no branch per
// step) or AnyDType (read at run time), for x, the terms but the last, the last term and the
// outputs.
template <DType D>
using Is = std::integral_constant<DType, D>;
struct AnyDType {};

template <typename XD, typename TermD, typename LastD, typename OutD>
struct Signature {
  using X = XD;
  using Term = TermD;
  using Last = LastD;
  using Out = OutD;
};

// f(Is<t>{}) for a run-time dtype t.
template <typename F>
void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kHalf:
      return f(Is<DType::kHalf>{});
    case DType::kBFloat16:
      return f(Is<DType::kBFloat16>{});
    case DType::kFloat:
      return f(Is<DType::kFloat>{});
    case DType::kDouble:
      return f(Is<DType::kDouble>{});
  }
}

// ------------------------------------------------------------------------------------------
// Scalar conversions and arithmetic (bit-identical to the vector code).

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even; NaN -> 0x7FC0
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (std::isnan(f)) {
    return 0x7FC0;
  }
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// float64 -> float32 rounded to odd: truncated toward zero, with the last bit set when inexact.
// Rounding that once more to a format of at most 22 significant bits (float16, bfloat16) gives
// the correctly rounded float64 -> 16-bit result.
inline float narrow_to_odd(double d) {
  float f = static_cast<float>(d);
  const double back = f;
  if (back != d) {  // inexact (or NaN, which stays NaN)
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if (std::fabs(back) > std::fabs(d)) {
      u -= 1;  // rounded away from zero: step back toward it
    }
    u |= 1;
    std::memcpy(&f, &u, sizeof(f));
  }
  return f;
}

template <typename T>
struct Scalar {
  using CT = T;
  using V = T;
  static constexpr int L = 1;
  static constexpr int U = 1;
  BELM_INLINE static V load_half(const uint16_t* p) {
    return static_cast<CT>(c10::detail::fp16_ieee_to_fp32_value(*p));
  }
  BELM_INLINE static V load_bf16(const uint16_t* p) { return static_cast<CT>(bf16_bits_to_float(*p)); }
  BELM_INLINE static V load_float(const float* p) { return static_cast<CT>(*p); }
  BELM_INLINE static V load_double(const double* p) { return static_cast<CT>(*p); }  // to nearest even
  BELM_INLINE static float narrow(V v) {  // to float32, on the way to a 16-bit output
    if constexpr (std::is_same_v<CT, double>) {
      return narrow_to_odd(v);
    } else {
      return v;
    }
  }
  BELM_INLINE static void store_half(uint16_t* p, V v) { *p = c10::detail::fp16_ieee_from_fp32_value(narrow(v)); }
  BELM_INLINE static void store_bf16(uint16_t* p, V v) { *p = float_to_bf16_bits(narrow(v)); }
  BELM_INLINE static void store_float(float* p, V v) { *p = static_cast<float>(v); }
  BELM_INLINE static void store_double(double* p, V v) { *p = static_cast<double>(v); }
  BELM_INLINE static V set1(CT c) { return c; }
  BELM_INLINE static V mul(V a, V b) { return a * b; }  // never contracted: -ffp-contract=off
  BELM_INLINE static V fma(V a, V b, V c) { return std::fma(a, b, c); }
  BELM_INLINE static V div(V a, V b) { return a / b; }
};

}  // namespace
}  // namespace belm

// Each file body below is the same generic code (lincomb_cpu_simd.h) for one instruction set.
#define BELM_SIMD_HEADER "lincomb_cpu_simd.h"

// ------------------------------------------------------------------------------------------
// Portable code: eight elements per step, for the compiler to vectorise for the baseline ISA.

namespace belm {
namespace {
namespace isa_scalar {
template <typename T>
struct Vec : Scalar<T> {
  static constexpr int U = 8;
};
}  // namespace isa_scalar
}  // namespace
}  // namespace belm

#define BELM_ISA isa_scalar
#include BELM_SIMD_HEADER
#undef BELM_ISA

#if BELM_X86
// ------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: 8 float or 4 double lanes.

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace belm {
namespace {
namespace isa_avx2 {

// 8 bfloat16 values (bits in 32-bit lanes, rounded to nearest even; NaN -> 0x7FC0) from floats.
BELM_INLINE __m128i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan), 16);
  // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather qwords 0 and 2.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
}

BELM_INLINE __m128i bf16_bits4(__m128 v) {
  const __m128i u = _mm_castps_si128(v);
  const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
  __m128i r = _mm_add_epi32(u, _mm_add_epi32(lsb, _mm_set1_epi32(0x7FFF)));
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
  r = _mm_srli_epi32(_mm_blendv_epi8(r, _mm_set1_epi32(0x7FC00000), nan), 16);
  return _mm_packus_epi32(r, r);  // low 64 bits: the 4 values
}

BELM_INLINE __m256 bf16_to_float8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

BELM_INLINE __m128 bf16_to_float4(const uint16_t* p) {
  const __m128i w = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm_castsi128_ps(_mm_slli_epi32(w, 16));
}

// narrow_to_odd on 4 lanes.
BELM_INLINE __m128 narrow_to_odd4(__m256d d) {
  const __m128 f = _mm256_cvtpd_ps(d);
  const __m256d back = _mm256_cvtps_pd(f);
  const __m256d sign = _mm256_set1_pd(-0.0);
  const __m256d inexact = _mm256_cmp_pd(back, d, _CMP_NEQ_UQ);
  const __m256d away =
      _mm256_cmp_pd(_mm256_andnot_pd(sign, back), _mm256_andnot_pd(sign, d), _CMP_GT_OQ);
  // The low 32 bits of each 64-bit mask lane, as 4 x 32 bits.
  const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m128i inexact32 = _mm256_castsi256_si128(
      _mm256_permutevar8x32_epi32(_mm256_castpd_si256(inexact), pick));
  const __m128i away32 = _mm256_castsi256_si128(
      _mm256_permutevar8x32_epi32(_mm256_castpd_si256(away), pick));
  __m128i u = _mm_add_epi32(_mm_castps_si128(f), away32);  // -1 where rounded away from zero
  u = _mm_or_si128(u, _mm_and_si128(inexact32, _mm_set1_epi32(1)));
  return _mm_castsi128_ps(u);
}

template <typename CT>
struct Vec;

template <>
struct Vec<float> {
  using CT = float;
  using V = __m256;
  static constexpr int L = 8;
  static constexpr int U = 2;
  BELM_INLINE static V load_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  BELM_INLINE static V load_bf16(const uint16_t* p) { return bf16_to_float8(p); }
  BELM_INLINE static V load_float(const float* p) { return _mm256_loadu_ps(p); }
  BELM_INLINE static V load_double(const double* p) {
    const __m128 lo = _mm256_cvtpd_ps(_mm256_loadu_pd(p));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_loadu_pd(p + 4));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  }
  BELM_INLINE static void store_half(uint16_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  BELM_INLINE static void store_bf16(uint16_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits8(v));
  }
  BELM_INLINE static void store_float(float* p, V v) { _mm256_storeu_ps(p, v); }
  BELM_INLINE static void store_double(double* p, V v) {
    _mm256_storeu_pd(p, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(p + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  BELM_INLINE static V set1(float c) { return _mm256_set1_ps(c); }
  BELM_INLINE static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  BELM_INLINE static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  BELM_INLINE static V div(V a, V b) { return _mm256_div_ps(a, b); }
};

template <>
struct Vec<double> {
  using CT = double;
  using V = __m256d;
  static constexpr int L = 4;
  static constexpr int U = 2;
  BELM_INLINE static V load_half(const uint16_t* p) {
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  BELM_INLINE static V load_bf16(const uint16_t* p) { return _mm256_cvtps_pd(bf16_to_float4(p)); }
  BELM_INLINE static V load_float(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
  BELM_INLINE static V load_double(const double* p) { return _mm256_loadu_pd(p); }
  BELM_INLINE static void store_half(uint16_t* p, V v) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p),
                     _mm_cvtps_ph(narrow_to_odd4(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  BELM_INLINE static void store_bf16(uint16_t* p, V v) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), bf16_bits4(narrow_to_odd4(v)));
  }
  BELM_INLINE static void store_float(float* p, V v) { _mm_storeu_ps(p, _mm256_cvtpd_ps(v)); }
  BELM_INLINE static void store_double(double* p, V v) { _mm256_storeu_pd(p, v); }
  BELM_INLINE static V set1(double c) { return _mm256_set1_pd(c); }
  BELM_INLINE static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  BELM_INLINE static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  BELM_INLINE static V div(V a, V b) { return _mm256_div_pd(a, b); }
};

}  // namespace isa_avx2
}  // namespace
}  // namespace belm

#define BELM_ISA isa_avx2
#include BELM_SIMD_HEADER
#undef BELM_ISA

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

// ------------------------------------------------------------------------------------------
// AVX-512F: 16 float or 8 double lanes (the 8-lane conversions reuse AVX2 code).

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

namespace belm {
namespace {
namespace isa_avx512 {

BELM_INLINE __m256 narrow_to_odd8(__m512d d) {
  const __m256 f = _mm512_cvtpd_ps(d);
  const __m512d back = _mm512_cvtps_pd(f);
  const __mmask8 inexact = _mm512_cmp_pd_mask(back, d, _CMP_NEQ_UQ);
  const __mmask8 away = _mm512_cmp_pd_mask(_mm512_abs_pd(back), _mm512_abs_pd(d), _CMP_GT_OQ);
  const __m512i one = _mm512_set1_epi64(1);
  const __m256i away32 = _mm512_cvtepi64_epi32(_mm512_maskz_mov_epi64(away, one));
  const __m256i inexact32 = _mm512_cvtepi64_epi32(_mm512_maskz_mov_epi64(inexact, one));
  const __m256i u = _mm256_sub_epi32(_mm256_castps_si256(f), away32);
  return _mm256_castsi256_ps(_mm256_or_si256(u, inexact32));
}

// 8 bfloat16 values from 8 floats (as isa_avx2::bf16_bits8, compiled here).
BELM_INLINE __m128i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan), 16);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
}

template <typename CT>
struct Vec;

template <>
struct Vec<float> {
  using CT = float;
  using V = __m512;
  static constexpr int L = 16;
  static constexpr int U = 2;
  BELM_INLINE static V load_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  BELM_INLINE static V load_bf16(const uint16_t* p) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  BELM_INLINE static V load_float(const float* p) { return _mm512_loadu_ps(p); }
  BELM_INLINE static V load_double(const double* p) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(p));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                               _mm256_castps_pd(hi), 1));
  }
  BELM_INLINE static void store_half(uint16_t* p, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  BELM_INLINE static void store_bf16(uint16_t* p, V v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC00000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
  BELM_INLINE static void store_float(float* p, V v) { _mm512_storeu_ps(p, v); }
  BELM_INLINE static void store_double(double* p, V v) {
    _mm512_storeu_pd(p, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    _mm512_storeu_pd(p + 8, _mm512_cvtps_pd(_mm256_castpd_ps(
                                _mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
  }
  BELM_INLINE static V set1(float c) { return _mm512_set1_ps(c); }
  BELM_INLINE static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  BELM_INLINE static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  BELM_INLINE static V div(V a, V b) { return _mm512_div_ps(a, b); }
};

template <>
struct Vec<double> {
  using CT = double;
  using V = __m512d;
  static constexpr int L = 8;
  static constexpr int U = 2;
  BELM_INLINE static V load_half(const uint16_t* p) {
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  BELM_INLINE static V load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  BELM_INLINE static V load_float(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
  BELM_INLINE static V load_double(const double* p) { return _mm512_loadu_pd(p); }
  BELM_INLINE static void store_half(uint16_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(narrow_to_odd8(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  BELM_INLINE static void store_bf16(uint16_t* p, V v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16_bits8(narrow_to_odd8(v)));
  }
  BELM_INLINE static void store_float(float* p, V v) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(v)); }
  BELM_INLINE static void store_double(double* p, V v) { _mm512_storeu_pd(p, v); }
  BELM_INLINE static V set1(double c) { return _mm512_set1_pd(c); }
  BELM_INLINE static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
  BELM_INLINE static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  BELM_INLINE static V div(V a, V b) { return _mm512_div_pd(a, b); }
};

}  // namespace isa_avx512
}  // namespace
}  // namespace belm

#define BELM_ISA isa_avx512
#include BELM_SIMD_HEADER
#undef BELM_ISA

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // BELM_X86

namespace belm {
namespace {

// ------------------------------------------------------------------------------------------
// Instruction set: the best this CPU has, capped by BELM_KERNELS_CPU_ISA (read once).

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if BELM_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  Isa best = Isa::kScalar;
  if (avx2) {
    best = __builtin_cpu_supports("avx512f") ? Isa::kAvx512 : Isa::kAvx2;
  }
#else
  Isa best = Isa::kScalar;
#endif
  const char* env = std::getenv("BELM_KERNELS_CPU_ISA");
  Isa cap = Isa::kAvx512;
  if (env != nullptr && env[0] != '\0') {
    if (std::strcmp(env, "scalar") == 0) {
      cap = Isa::kScalar;
    } else if (std::strcmp(env, "avx2") == 0) {
      cap = Isa::kAvx2;
    }
  }
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// The contiguous kernel for these operands, in the best instruction set.
template <typename CT>
ContiguousFn<CT> contiguous_fn(const Operands& o) {
#if BELM_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return isa_avx512::contiguous_fn<CT>(o);
    case Isa::kAvx2:
      return isa_avx2::contiguous_fn<CT>(o);
    case Isa::kScalar:
      break;
  }
#endif
  return isa_scalar::contiguous_fn<CT>(o);
}

// ------------------------------------------------------------------------------------------
// Drivers.

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    default:
      return DType::kDouble;  // checked before: float64
  }
}

// The operands with their data pointers (in place: x is out[0]).
Operands make_operands(at::TensorList out, const at::Tensor& first, at::TensorList terms) {
  Operands o;
  o.nin = static_cast<int>(terms.size()) + 1;
  o.nout = static_cast<int>(out.size());
  o.in[0] = static_cast<const char*>(first.const_data_ptr());
  o.in_t[0] = to_dtype(first.scalar_type());
  for (size_t k = 0; k < terms.size(); ++k) {
    o.in[k + 1] = static_cast<const char*>(terms[k].const_data_ptr());
    o.in_t[k + 1] = to_dtype(terms[k].scalar_type());
  }
  for (size_t m = 0; m < out.size(); ++m) {
    o.out[m] = static_cast<char*>(out[m].data_ptr());
    o.out_t[m] = to_dtype(out[m].scalar_type());
  }
  return o;
}

int64_t element_size(DType t) {
  return t == DType::kHalf || t == DType::kBFloat16 ? 2 : t == DType::kFloat ? 4 : 8;
}

// Every operand contiguous (same sizes, so the same layout). coef: `rows` (1 or B) rows of
// M * (K+1) values; row r covers flat elements [r * inner, (r + 1) * inner).
template <typename CT>
void lincomb_contiguous(const Operands& o, int64_t n, const CT* coef, int64_t rows,
                        bool inverse) {
  const ContiguousFn<CT> run = contiguous_fn<CT>(o);
  const int64_t inner = n / rows;
  const int64_t row_size = static_cast<int64_t>(o.nin) * o.nout;
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t row = i / inner;
      const int64_t stop = std::min(end, (row + 1) * inner);
      run(o, i, stop, make_weights(coef + row * row_size, o.nin, o.nout, inverse));
      i = stop;
    }
  });
}

// Any layout: a TensorIterator over the outputs, the inputs and (per-sample rows) the row index
// of every element (an int64 view with stride 1 along dim 0 and 0 elsewhere).
template <typename CT>
void lincomb_strided(at::TensorList out, const at::Tensor& first, at::TensorList terms,
                     const CT* coef, bool per_sample, bool inverse) {
  at::TensorIteratorConfig config;
  config.set_check_mem_overlap(true).check_all_same_dtype(false).resize_outputs(false);
  for (const at::Tensor& o : out) {
    config.add_output(o);
  }
  config.add_const_input(first);
  for (const at::Tensor& t : terms) {
    config.add_const_input(t);
  }
  at::Tensor row_index;
  if (per_sample) {
    std::vector<int64_t> strides(first.dim(), 0);
    strides[0] = 1;
    row_index = at::arange(first.size(0), first.options().dtype(at::kLong))
                    .as_strided(first.sizes(), strides);
    config.add_const_input(row_index);
  }
  at::TensorIterator iter = config.build();

  const Operands base = make_operands(out, first, terms);
  const int nout = base.nout, nin = base.nin;
  const int64_t row_size = static_cast<int64_t>(nin) * nout;
  const ContiguousFn<CT> run = contiguous_fn<CT>(base);
  const ContiguousFn<CT> run_scalar = isa_scalar::dynamic_fn<CT>(nout);
  const int ntensors = nout + nin + (per_sample ? 1 : 0);
  auto loop = [&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
    const int64_t* outer = strides + ntensors;
    Operands o = base;
    for (int64_t j = 0; j < n1; ++j) {
      bool dense = !per_sample || strides[ntensors - 1] == 0;
      for (int m = 0; m < nout; ++m) {
        o.out[m] = data[m] + j * outer[m];
        dense = dense && strides[m] == element_size(o.out_t[m]);
      }
      for (int k = 0; k < nin; ++k) {
        o.in[k] = data[nout + k] + j * outer[nout + k];
        dense = dense && strides[nout + k] == element_size(o.in_t[k]);
      }
      const char* rows = per_sample ? data[ntensors - 1] + j * outer[ntensors - 1] : nullptr;
      auto row_weights = [&](int64_t i) {
        const int64_t row =
            per_sample ? *reinterpret_cast<const int64_t*>(rows + i * strides[ntensors - 1]) : 0;
        return make_weights(coef + row * row_size, nin, nout, inverse);
      };
      if (dense) {  // contiguous inner run, one row: the vector code
        run(o, 0, n0, row_weights(0));
        continue;
      }
      // Element by element: the operands at element i, one-element runs of the scalar code.
      Operands e = o;
      for (int64_t i = 0; i < n0; ++i) {
        for (int m = 0; m < nout; ++m) {
          e.out[m] = o.out[m] + i * strides[m];
        }
        for (int k = 0; k < nin; ++k) {
          e.in[k] = o.in[k] + i * strides[nout + k];
        }
        run_scalar(e, 0, 1, row_weights(i));
      }
    }
  };
  iter.for_each(loop, kGrainSize);
}

// ------------------------------------------------------------------------------------------
// The op.

// "terms[1]", say, in a message (written only when a check fails).
struct OperandName {
  const char* base;
  int64_t index = -1;
};

std::ostream& operator<<(std::ostream& os, const OperandName& name) {
  os << name.base;
  if (name.index >= 0) {
    os << "[" << name.index << "]";
  }
  return os;
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void lincomb_cpu(at::TensorList out, const std::optional<at::Tensor>& x, at::TensorList terms,
                 const at::Tensor& coef, bool inverse) {
  // What keeps a direct call of the raw op memory-safe and well defined, before anything is
  // written. The user-facing validation (messages, aliasing rules, a zero leading coefficient
  // of the inverse, ...) is belm_kernels/ops.py's; this op is its "cpu" kernel.
  const int64_t nout = static_cast<int64_t>(out.size());
  const int64_t nterms = static_cast<int64_t>(terms.size());
  TORCH_CHECK(nout >= 1 && nout <= kMaxOutputs, "belm::lincomb_ext: out must hold 1 to ",
              kMaxOutputs, " tensors, got ", nout);
  TORCH_CHECK(nterms >= 1 && nterms <= kMaxInputs - 1, "belm::lincomb_ext: terms must hold 1 to ",
              kMaxInputs - 1, " tensors, got ", nterms);
  const bool in_place = !x.has_value();
  TORCH_CHECK(in_place || x->defined(), "belm::lincomb_ext: x must be a defined tensor or None");
  const at::Tensor& first = in_place ? out[0] : *x;
  auto check_operand = [&](const at::Tensor& t, const OperandName& name) {
    TORCH_CHECK(t.defined(), "belm::lincomb_ext: ", name, " must be a defined tensor");
    TORCH_CHECK(t.device().is_cpu(), "belm::lincomb_ext (CPU kernel): ", name,
                " must be a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.layout() == at::kStrided, "belm::lincomb_ext: ", name,
                " must be a strided (dense) tensor");
    TORCH_CHECK(is_supported_float(t.scalar_type()), "belm::lincomb_ext: ", name,
                " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == first.sizes(), "belm::lincomb_ext: ", name, " must have x's shape ",
                first.sizes(), ", got ", t.sizes());
  };
  check_operand(first, {in_place ? "out[0] (x, updated in place)" : "x"});
  for (int64_t k = 0; k < nterms; ++k) {
    check_operand(terms[k], {"terms", k});
  }
  for (int64_t m = 0; m < nout; ++m) {
    check_operand(out[m], {"out", m});
  }
  TORCH_CHECK(coef.defined() && coef.device().is_cpu() && coef.layout() == at::kStrided,
              "belm::lincomb_ext (CPU kernel): coef must be a strided CPU tensor");
  TORCH_CHECK(coef.is_floating_point(), "belm::lincomb_ext: coef must be a float tensor, got ",
              coef.scalar_type());
  const int64_t nin = nterms + 1;
  const int64_t batch = first.dim() >= 1 ? first.size(0) : 1;
  const bool shared = coef.dim() >= 1 && coef.size(-1) == nin && coef.numel() == nout * nin;
  const bool per_sample = !shared && first.dim() >= 1 && coef.dim() >= 2 &&
                          coef.size(-1) == nin && coef.size(0) == batch &&
                          coef.numel() == batch * nout * nin;
  TORCH_CHECK(shared || per_sample, "belm::lincomb_ext: coef must hold one row of K+1 = ", nin,
              " values per output (", nout, " rows: shape (", nout, ", ", nin, ")",
              nout == 1 ? " or (" + std::to_string(nin) + ",)" : std::string(), ")",
              first.dim() >= 1 ? ", or that for every index of x's first dimension (B = " +
                                     std::to_string(batch) + ": shape (B, M, K+1) or (B, K+1))"
                               : std::string(),
              ", got shape ", coef.sizes());
  // Written tensors: one element per address, no memory shared with any other operand (out[0]
  // is the input x itself when x is None).
  for (int64_t m = 0; m < nout; ++m) {
    at::assert_no_internal_overlap(out[m]);
    if (!in_place) {
      at::assert_no_overlap(out[m], first);
    } else if (m > 0) {
      at::assert_no_overlap(out[m], out[0]);
    }
    for (const at::Tensor& t : terms) {
      at::assert_no_overlap(out[m], t);
    }
    at::assert_no_overlap(out[m], coef);
    for (int64_t other = m + 1; other < nout; ++other) {
      at::assert_no_overlap(out[m], out[other]);
    }
  }

  const at::ScalarType ct = first.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // coef is tiny: bring it to the compute dtype and contiguous for free.
  const at::Tensor c = coef.to(ct).contiguous();
  const int64_t n = first.numel();
  if (n == 0) {
    return;
  }
  bool contiguous = first.is_contiguous();
  for (const at::Tensor& t : terms) {
    contiguous = contiguous && t.is_contiguous();
  }
  for (const at::Tensor& t : out) {
    contiguous = contiguous && t.is_contiguous();
  }
  auto run = [&](auto ct_tag) {
    using CT = decltype(ct_tag);
    const CT* cp = c.const_data_ptr<CT>();
    if (contiguous) {
      lincomb_contiguous<CT>(make_operands(out, first, terms), n, cp, per_sample ? batch : 1,
                             inverse);
    } else {
      lincomb_strided<CT>(out, first, terms, cp, per_sample, inverse);
    }
  };
  if (ct == at::kDouble) {
    run(double{});
  } else {
    run(float{});
  }
}

}  // namespace
}  // namespace belm

TORCH_LIBRARY_IMPL(belm, CPU, m) {
  m.impl("lincomb_ext", &belm::lincomb_cpu);
}
