// CPU kernel of belm::lincomb3_ext (the "cpu" backend of belm_kernels).
//
//   inverse == false:  x <- a*x + b*y + c*z                 t = a*x; t = fma(b, y, t); t = fma(c, z, t)
//   inverse == true:   x <- (x - b*y - c*z) / a             t = fma(-b, y, x); t = fma(-c, z, t); t / a
//
// in place on x, with (a, b, c) = coef (shape (3,)) or coef[i] (shape (B, 3), i = index along
// x's first dimension). Math in float32 (float64 for float64 x), one rounding to x's dtype
// (round-to-nearest-even for float16/bfloat16). z may have any float dtype.
//
// The schema is defined once, in Python (belm_kernels/ops.py); this file only registers the CPU
// implementation (TORCH_LIBRARY_IMPL), so it must be loaded after belm_kernels.ops is imported.
// A zero leading coefficient of the inverse is not checked here (ops.py does, where coef is on
// the CPU): it gives inf/nan, as on the GPU.
//
// Paths:
//   * contiguous x, y, z: one fused pass, at::parallel_for over the flat range (split at sample
//     boundaries for per-sample coefficients), AVX-512F or AVX2+FMA+F16C intrinsics chosen at run
//     time (functions compiled with __attribute__((target)), so the library itself needs only
//     the baseline ISA), a portable scalar loop otherwise;
//   * anything else (strided, channels-last, sliced views): a TensorIterator over x (output and
//     input, written in place), y, z and three zero-stride views of the coefficient columns;
//     inner runs that are contiguous for x, y, z reuse the vectorised kernel.
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
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BELM_X86 1
#else
#define BELM_X86 0
#endif

namespace belm {
namespace {

// Elements per parallel task: below this a call runs on one thread (a fork/join costs a few
// microseconds, about what 64K elements of traffic take on one core).
constexpr int64_t kGrainSize = 65536;

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ------------------------------------------------------------------------------------------
// Scalar conversions (bit-identical to the vector ones below).

inline uint16_t float_to_bf16_bits_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (std::isnan(f)) {
    return 0x7FC0;
  }
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <typename CT, typename T>
inline CT load_ct(const T* p) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<CT>(*p);  // double -> float: round to nearest even
  } else {
    return static_cast<CT>(static_cast<float>(*p));  // half/bf16 -> float is exact
  }
}

template <typename T, typename CT>
inline void store_ct(T* p, CT v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    *p = c10::BFloat16(float_to_bf16_bits_rne(v), c10::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    *p = c10::Half(v);  // c10's software conversion: round to nearest even
  } else {
    *p = static_cast<T>(v);
  }
}

template <bool INV, typename CT>
inline CT combine(CT x, CT y, CT z, CT a, CT b, CT c) {
  if constexpr (!INV) {
    CT t = a * x;
    t = std::fma(b, y, t);
    return std::fma(c, z, t);
  } else {
    CT t = std::fma(-b, y, x);
    t = std::fma(-c, z, t);
    return t / a;
  }
}

// Portable contiguous kernel.
template <bool INV, typename XT, typename ZT>
void run_scalar(XT* x, const XT* y, const ZT* z, int64_t n, compute_t<XT> a, compute_t<XT> b,
                compute_t<XT> c) {
  using CT = compute_t<XT>;
  for (int64_t i = 0; i < n; ++i) {
    CT r = combine<INV, CT>(load_ct<CT>(x + i), load_ct<CT>(y + i), load_ct<CT>(z + i), a, b, c);
    store_ct(x + i, r);
  }
}

// ------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C kernels (x86-64 only), selected at run time.

#if BELM_X86
#define BELM_AVX2 __attribute__((target("avx2,fma,f16c")))

// 8 lanes of float from T.
template <typename T>
struct V8;

template <>
struct V8<float> {
  BELM_AVX2 static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  BELM_AVX2 static inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
};

template <>
struct V8<double> {
  BELM_AVX2 static inline __m256 load(const double* p) {
    __m128 lo = _mm256_cvtpd_ps(_mm256_loadu_pd(p));
    __m128 hi = _mm256_cvtpd_ps(_mm256_loadu_pd(p + 4));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
  }
};

template <>
struct V8<c10::Half> {
  BELM_AVX2 static inline __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  BELM_AVX2 static inline void store(c10::Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

template <>
struct V8<c10::BFloat16> {
  BELM_AVX2 static inline __m256 load(const c10::BFloat16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  BELM_AVX2 static inline void store(c10::BFloat16* p, __m256 v) {
    // Round to nearest even: (u + 0x7FFF + ((u >> 16) & 1)) >> 16; NaN -> 0x7FC0.
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
    r = _mm256_srli_epi32(r, 16);
    // packus works per 128-bit lane: [r0..r3 r0..r3 | r4..r7 r4..r7]; gather qwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};

// 4 lanes of double from T.
template <typename T>
struct V4d;

template <>
struct V4d<double> {
  BELM_AVX2 static inline __m256d load(const double* p) { return _mm256_loadu_pd(p); }
  BELM_AVX2 static inline void store(double* p, __m256d v) { _mm256_storeu_pd(p, v); }
};

template <>
struct V4d<float> {
  BELM_AVX2 static inline __m256d load(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
};

template <>
struct V4d<c10::Half> {
  BELM_AVX2 static inline __m256d load(const c10::Half* p) {
    return _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

template <>
struct V4d<c10::BFloat16> {
  BELM_AVX2 static inline __m256d load(const c10::BFloat16* p) {
    __m128i w = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(w, 16)));
  }
};

template <bool INV>
BELM_AVX2 inline __m256 combine8(__m256 x, __m256 y, __m256 z, __m256 a, __m256 b, __m256 c) {
  if constexpr (!INV) {
    __m256 t = _mm256_mul_ps(a, x);
    t = _mm256_fmadd_ps(b, y, t);
    return _mm256_fmadd_ps(c, z, t);
  } else {
    __m256 t = _mm256_fnmadd_ps(b, y, x);  // x - b*y, one rounding
    t = _mm256_fnmadd_ps(c, z, t);
    return _mm256_div_ps(t, a);
  }
}

template <bool INV>
BELM_AVX2 inline __m256d combine4(__m256d x, __m256d y, __m256d z, __m256d a, __m256d b,
                                  __m256d c) {
  if constexpr (!INV) {
    __m256d t = _mm256_mul_pd(a, x);
    t = _mm256_fmadd_pd(b, y, t);
    return _mm256_fmadd_pd(c, z, t);
  } else {
    __m256d t = _mm256_fnmadd_pd(b, y, x);
    t = _mm256_fnmadd_pd(c, z, t);
    return _mm256_div_pd(t, a);
  }
}

template <bool INV, typename XT, typename ZT>
BELM_AVX2 void run_avx2(XT* x, const XT* y, const ZT* z, int64_t n, compute_t<XT> a,
                        compute_t<XT> b, compute_t<XT> c) {
  using CT = compute_t<XT>;
  int64_t i = 0;
  if constexpr (std::is_same_v<CT, float>) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), vc = _mm256_set1_ps(c);
    for (; i + 16 <= n; i += 16) {  // two independent vectors per iteration
      __m256 r0 = combine8<INV>(V8<XT>::load(x + i), V8<XT>::load(y + i), V8<ZT>::load(z + i),
                                va, vb, vc);
      __m256 r1 = combine8<INV>(V8<XT>::load(x + i + 8), V8<XT>::load(y + i + 8),
                                V8<ZT>::load(z + i + 8), va, vb, vc);
      V8<XT>::store(x + i, r0);
      V8<XT>::store(x + i + 8, r1);
    }
    for (; i + 8 <= n; i += 8) {
      V8<XT>::store(x + i, combine8<INV>(V8<XT>::load(x + i), V8<XT>::load(y + i),
                                         V8<ZT>::load(z + i), va, vb, vc));
    }
  } else {
    const __m256d va = _mm256_set1_pd(a), vb = _mm256_set1_pd(b), vc = _mm256_set1_pd(c);
    for (; i + 8 <= n; i += 8) {
      __m256d r0 = combine4<INV>(V4d<XT>::load(x + i), V4d<XT>::load(y + i),
                                 V4d<ZT>::load(z + i), va, vb, vc);
      __m256d r1 = combine4<INV>(V4d<XT>::load(x + i + 4), V4d<XT>::load(y + i + 4),
                                 V4d<ZT>::load(z + i + 4), va, vb, vc);
      V4d<XT>::store(x + i, r0);
      V4d<XT>::store(x + i + 4, r1);
    }
    for (; i + 4 <= n; i += 4) {
      V4d<XT>::store(x + i, combine4<INV>(V4d<XT>::load(x + i), V4d<XT>::load(y + i),
                                          V4d<ZT>::load(z + i), va, vb, vc));
    }
  }
  for (; i < n; ++i) {  // tail: same operations, one element at a time
    CT r = combine<INV, CT>(load_ct<CT>(x + i), load_ct<CT>(y + i), load_ct<CT>(z + i), a, b, c);
    store_ct(x + i, r);
  }
}
// AVX-512F: 16 float lanes (8 double lanes) per vector; same operations, same roundings.
#define BELM_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

template <typename T>
struct V16;

template <>
struct V16<float> {
  BELM_AVX512 static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  BELM_AVX512 static inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
};

template <>
struct V16<double> {
  BELM_AVX512 static inline __m512 load(const double* p) {
    const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(p));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_loadu_pd(p + 8));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)),
                                               _mm256_castps_pd(hi), 1));
  }
};

template <>
struct V16<c10::Half> {
  BELM_AVX512 static inline __m512 load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  BELM_AVX512 static inline void store(c10::Half* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

template <>
struct V16<c10::BFloat16> {
  BELM_AVX512 static inline __m512 load(const c10::BFloat16* p) {
    const __m512i w =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  BELM_AVX512 static inline void store(c10::BFloat16* p, __m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC00000));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
};

template <typename T>
struct V8d;

template <>
struct V8d<double> {
  BELM_AVX512 static inline __m512d load(const double* p) { return _mm512_loadu_pd(p); }
  BELM_AVX512 static inline void store(double* p, __m512d v) { _mm512_storeu_pd(p, v); }
};

template <>
struct V8d<float> {
  BELM_AVX512 static inline __m512d load(const float* p) {
    return _mm512_cvtps_pd(_mm256_loadu_ps(p));
  }
};

template <>
struct V8d<c10::Half> {
  BELM_AVX512 static inline __m512d load(const c10::Half* p) {
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

template <>
struct V8d<c10::BFloat16> {
  BELM_AVX512 static inline __m512d load(const c10::BFloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
};

template <bool INV>
BELM_AVX512 inline __m512 combine16(__m512 x, __m512 y, __m512 z, __m512 a, __m512 b, __m512 c) {
  if constexpr (!INV) {
    __m512 t = _mm512_mul_ps(a, x);
    t = _mm512_fmadd_ps(b, y, t);
    return _mm512_fmadd_ps(c, z, t);
  } else {
    __m512 t = _mm512_fnmadd_ps(b, y, x);
    t = _mm512_fnmadd_ps(c, z, t);
    return _mm512_div_ps(t, a);
  }
}

template <bool INV>
BELM_AVX512 inline __m512d combine8d(__m512d x, __m512d y, __m512d z, __m512d a, __m512d b,
                                     __m512d c) {
  if constexpr (!INV) {
    __m512d t = _mm512_mul_pd(a, x);
    t = _mm512_fmadd_pd(b, y, t);
    return _mm512_fmadd_pd(c, z, t);
  } else {
    __m512d t = _mm512_fnmadd_pd(b, y, x);
    t = _mm512_fnmadd_pd(c, z, t);
    return _mm512_div_pd(t, a);
  }
}

template <bool INV, typename XT, typename ZT>
BELM_AVX512 void run_avx512(XT* x, const XT* y, const ZT* z, int64_t n, compute_t<XT> a,
                            compute_t<XT> b, compute_t<XT> c) {
  using CT = compute_t<XT>;
  int64_t i = 0;
  if constexpr (std::is_same_v<CT, float>) {
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b), vc = _mm512_set1_ps(c);
    for (; i + 32 <= n; i += 32) {
      __m512 r0 = combine16<INV>(V16<XT>::load(x + i), V16<XT>::load(y + i),
                                 V16<ZT>::load(z + i), va, vb, vc);
      __m512 r1 = combine16<INV>(V16<XT>::load(x + i + 16), V16<XT>::load(y + i + 16),
                                 V16<ZT>::load(z + i + 16), va, vb, vc);
      V16<XT>::store(x + i, r0);
      V16<XT>::store(x + i + 16, r1);
    }
    for (; i + 16 <= n; i += 16) {
      V16<XT>::store(x + i, combine16<INV>(V16<XT>::load(x + i), V16<XT>::load(y + i),
                                           V16<ZT>::load(z + i), va, vb, vc));
    }
  } else {
    const __m512d va = _mm512_set1_pd(a), vb = _mm512_set1_pd(b), vc = _mm512_set1_pd(c);
    for (; i + 16 <= n; i += 16) {
      __m512d r0 = combine8d<INV>(V8d<XT>::load(x + i), V8d<XT>::load(y + i),
                                  V8d<ZT>::load(z + i), va, vb, vc);
      __m512d r1 = combine8d<INV>(V8d<XT>::load(x + i + 8), V8d<XT>::load(y + i + 8),
                                  V8d<ZT>::load(z + i + 8), va, vb, vc);
      V8d<XT>::store(x + i, r0);
      V8d<XT>::store(x + i + 8, r1);
    }
    for (; i + 8 <= n; i += 8) {
      V8d<XT>::store(x + i, combine8d<INV>(V8d<XT>::load(x + i), V8d<XT>::load(y + i),
                                           V8d<ZT>::load(z + i), va, vb, vc));
    }
  }
  if (i < n) {  // fewer than one vector left: the AVX2 code finishes (and its scalar tail)
    run_avx2<INV>(x + i, y + i, z + i, n - i, a, b, c);
  }
}
#endif  // BELM_X86

// Instruction sets of the contiguous kernel, best first. BELM_KERNELS_CPU_ISA (read once) caps
// the choice: "scalar", "avx2" or "avx512" (default: the best this CPU supports).
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

// One contiguous run of n elements with one set of coefficients.
template <typename XT, typename ZT>
inline void run_contiguous_chunk(XT* x, const XT* y, const ZT* z, int64_t n, compute_t<XT> a,
                                 compute_t<XT> b, compute_t<XT> c, bool inverse) {
#if BELM_X86
  switch (cpu_isa()) {
    case Isa::kAvx512:
      if (inverse) {
        run_avx512<true>(x, y, z, n, a, b, c);
      } else {
        run_avx512<false>(x, y, z, n, a, b, c);
      }
      return;
    case Isa::kAvx2:
      if (inverse) {
        run_avx2<true>(x, y, z, n, a, b, c);
      } else {
        run_avx2<false>(x, y, z, n, a, b, c);
      }
      return;
    case Isa::kScalar:
      break;
  }
#endif
  if (inverse) {
    run_scalar<true>(x, y, z, n, a, b, c);
  } else {
    run_scalar<false>(x, y, z, n, a, b, c);
  }
}

// ------------------------------------------------------------------------------------------
// Drivers.

// x, y, z contiguous (same sizes, so the same layout). coef rows: `rows` (1 or B) of 3 values;
// row r covers flat elements [r * inner, (r + 1) * inner).
template <typename XT, typename ZT>
void lincomb3_contiguous(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                         const at::Tensor& coef, int64_t rows, bool inverse) {
  using CT = compute_t<XT>;
  XT* xp = x.data_ptr<XT>();
  const XT* yp = y.const_data_ptr<XT>();
  const ZT* zp = z.const_data_ptr<ZT>();
  const CT* cp = coef.const_data_ptr<CT>();
  const int64_t n = x.numel();
  const int64_t inner = n / rows;
  at::parallel_for(0, n, kGrainSize, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t row = i / inner;
      const int64_t stop = std::min(end, (row + 1) * inner);
      const CT* abc = cp + 3 * row;
      run_contiguous_chunk<XT, ZT>(xp + i, yp + i, zp + i, stop - i, abc[0], abc[1], abc[2],
                                   inverse);
      i = stop;
    }
  });
}

// Any layout: TensorIterator over x (written in place), y, z and the coefficient columns
// broadcast to x's shape (stride 3 along dim 0 for per-sample rows, 0 elsewhere).
template <typename XT, typename ZT>
void lincomb3_strided(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                      const at::Tensor& coef, bool per_sample, bool inverse) {
  using CT = compute_t<XT>;
  std::vector<int64_t> col_strides(x.dim(), 0);
  if (per_sample) {
    col_strides[0] = coef.stride(0);
  }
  at::Tensor cols[3];
  for (int k = 0; k < 3; ++k) {
    cols[k] = coef.as_strided(x.sizes(), col_strides, coef.storage_offset() + k * coef.stride(-1));
  }
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .set_check_mem_overlap(true)
                                .check_all_same_dtype(false)
                                .resize_outputs(false)
                                .add_output(x)
                                .add_const_input(x)
                                .add_const_input(y)
                                .add_const_input(z)
                                .add_const_input(cols[0])
                                .add_const_input(cols[1])
                                .add_const_input(cols[2])
                                .build();
  constexpr int kT = 7;  // operands: x (out), x, y, z, a, b, c
  auto loop = [&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
    const int64_t* outer = strides + kT;
    for (int64_t j = 0; j < n1; ++j) {
      char* xo = data[0] + j * outer[0];
      const char* xi = data[1] + j * outer[1];
      const char* yi = data[2] + j * outer[2];
      const char* zi = data[3] + j * outer[3];
      const char* ai = data[4] + j * outer[4];
      const char* bi = data[5] + j * outer[5];
      const char* ci = data[6] + j * outer[6];
      const bool dense = strides[0] == sizeof(XT) && strides[1] == sizeof(XT) &&
                         strides[2] == sizeof(XT) && strides[3] == sizeof(ZT) &&
                         strides[4] == 0 && strides[5] == 0 && strides[6] == 0 && xo == xi;
      if (dense) {
        run_contiguous_chunk<XT, ZT>(reinterpret_cast<XT*>(xo), reinterpret_cast<const XT*>(yi),
                                     reinterpret_cast<const ZT*>(zi), n0,
                                     *reinterpret_cast<const CT*>(ai),
                                     *reinterpret_cast<const CT*>(bi),
                                     *reinterpret_cast<const CT*>(ci), inverse);
        continue;
      }
      for (int64_t i = 0; i < n0; ++i) {
        const CT xv = load_ct<CT>(reinterpret_cast<const XT*>(xi + i * strides[1]));
        const CT yv = load_ct<CT>(reinterpret_cast<const XT*>(yi + i * strides[2]));
        const CT zv = load_ct<CT>(reinterpret_cast<const ZT*>(zi + i * strides[3]));
        const CT a = *reinterpret_cast<const CT*>(ai + i * strides[4]);
        const CT b = *reinterpret_cast<const CT*>(bi + i * strides[5]);
        const CT c = *reinterpret_cast<const CT*>(ci + i * strides[6]);
        const CT r = inverse ? combine<true, CT>(xv, yv, zv, a, b, c)
                             : combine<false, CT>(xv, yv, zv, a, b, c);
        store_ct(reinterpret_cast<XT*>(xo + i * strides[0]), r);
      }
    }
  };
  iter.for_each(loop, kGrainSize);
}

// ------------------------------------------------------------------------------------------
// dtype dispatch on x and z.

template <typename F>
void dispatch_float(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kFloat:
      f(float{});
      break;
    case at::kDouble:
      f(double{});
      break;
    default:
      TORCH_CHECK(false, "belm::lincomb3_ext: ", what,
                  " must be float16, bfloat16, float32 or float64, got ", t);
  }
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void lincomb3_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& z,
                  const at::Tensor& coef, bool inverse) {
  // What keeps a direct call of the raw op memory-safe and well defined, before x is written.
  // The user-facing validation (messages, a zero leading coefficient of the inverse, ...) is
  // belm_kernels/ops.py's; this op is its "cpu" kernel.
  TORCH_CHECK(x.defined() && y.defined() && z.defined() && coef.defined(),
              "belm::lincomb3_ext: x, y, z and coef must be defined tensors");
  for (const at::Tensor* t : {&x, &y, &z, &coef}) {
    TORCH_CHECK(t->device().is_cpu(),
                "belm::lincomb3_ext (CPU kernel): x, y, z and coef must all be CPU tensors, got "
                "x on ", x.device(), ", y on ", y.device(), ", z on ", z.device(), ", coef on ",
                coef.device());
    TORCH_CHECK(t->layout() == at::kStrided,
                "belm::lincomb3_ext: x, y, z and coef must be strided (dense) tensors");
  }
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "belm::lincomb3_ext: x must be float16, bfloat16, float32 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "belm::lincomb3_ext: y must have x's dtype ",
              x.scalar_type(), ", got ", y.scalar_type());
  TORCH_CHECK(is_supported_float(z.scalar_type()),
              "belm::lincomb3_ext: z must be float16, bfloat16, float32 or float64, got ",
              z.scalar_type());
  TORCH_CHECK(y.sizes() == x.sizes(), "belm::lincomb3_ext: y must have x's shape ", x.sizes(),
              ", got ", y.sizes());
  TORCH_CHECK(z.sizes() == x.sizes(), "belm::lincomb3_ext: z must have x's shape ", x.sizes(),
              ", got ", z.sizes());
  TORCH_CHECK(coef.is_floating_point(), "belm::lincomb3_ext: coef must be a float tensor, got ",
              coef.scalar_type());
  const bool shared = coef.dim() == 1 && coef.size(0) == 3;
  const bool per_sample =
      coef.dim() == 2 && x.dim() >= 1 && coef.size(0) == x.size(0) && coef.size(1) == 3;
  TORCH_CHECK(shared || per_sample, "belm::lincomb3_ext: coef must have shape (3,)",
              x.dim() >= 1 ? " or (B, 3) with B = x.shape[0] = " : "",
              x.dim() >= 1 ? std::to_string(x.size(0)) : std::string(), ", got ", coef.sizes());
  at::assert_no_internal_overlap(x);
  at::assert_no_overlap(x, y);
  at::assert_no_overlap(x, z);
  at::assert_no_overlap(x, coef);

  const at::ScalarType ct = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // coef is tiny ((3,) or (B, 3)): bring it to the compute dtype and contiguous for free.
  const at::Tensor c = coef.to(ct).contiguous();
  if (x.numel() == 0) {
    return;
  }
  const bool contiguous = x.is_contiguous() && y.is_contiguous() && z.is_contiguous();
  dispatch_float(x.scalar_type(), "x", [&](auto xtag) {
    using XT = decltype(xtag);
    dispatch_float(z.scalar_type(), "z", [&](auto ztag) {
      using ZT = decltype(ztag);
      if (contiguous) {
        lincomb3_contiguous<XT, ZT>(x, y, z, c, per_sample ? x.size(0) : 1, inverse);
      } else {
        lincomb3_strided<XT, ZT>(x, y, z, c, per_sample, inverse);
      }
    });
  });
}

}  // namespace
}  // namespace belm

TORCH_LIBRARY_IMPL(belm, CPU, m) {
  m.impl("lincomb3_ext", &belm::lincomb3_cpu);
}
