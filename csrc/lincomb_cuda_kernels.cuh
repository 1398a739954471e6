// The CUDA kernels of belm::lincomb_ext and their launch planning, free of torch: this header
// includes CUDA headers only. lincomb_cuda.cu adds the torch glue (argument checks, stream,
// registration); tests/test_extension.py compiles this header into a host-only driver that runs
// the very same per-element code and path planning on the CPU (run_on_host), so the indexing,
// packing, per-sample rows and roundings are checked on machines without a GPU.
//
// With inputs x, t_1..t_K (K = 1 to 6) and one coefficient row c[m] per output m (M = 1 to 3):
//
//   inverse == false:  out[m] <- c[m,0]*x + c[m,1]*t_1 + ... + c[m,K]*t_K
//                      acc = c0*x; acc = fma(c1, t1, acc); ...; acc = fma(cK, tK, acc)
//   inverse == true:   out[m] <- (x - c[m,1]*t_1 - ... - c[m,K]*t_K) / c[m,0]
//                      acc = 1*x; acc = fma(-c1, t1, acc); ...; acc / c0
//
// Every operand has its own float dtype, read at run time (a warp-uniform branch per operand:
// no divergence, and no kernel per dtype combination); every input of an element is read before
// any output of it is written, so out[0] may be x itself (the in-place update). Math in float32
// (float64 for float64 x) with the rounding intrinsics written out (__fmul_rn, __fmaf_rn,
// __fdiv_rn: no contraction, no approximate division), one rounding per output to its own dtype
// (__float2half_rn, __float2bfloat16_rn, __double2half, __double2bfloat16, __double2float_rn:
// round to nearest even, directly from the compute dtype). coef is in the compute dtype, in
// device memory, laid out (rows, M, K+1): rows 1 (shared) or B (one row set per index along the
// first dimension).
//
// Paths (chosen by plan()):
//   * rows: every operand contiguous, and a shared coef or per-sample rows of at least kThreads
//     packs. The work is split into coefficient rows (1, or B each covering `inner` consecutive
//     elements): blockIdx.y walks the rows (grid-stride), so a thread loads its row's
//     coefficients once and never divides to find them. When every operand is 16-byte aligned
//     and every row starts on a pack boundary (a single row, or inner a multiple of the pack
//     length P), the vector variant moves P elements of every operand per thread and step: P is
//     16 bytes of the narrowest of x and the outputs, so x and every output move in 128-bit
//     accesses (a wider one in several), and a narrower term in one access of P elements (64
//     bits of float16 next to float32 x, say); the last inner % P elements of a row are done one
//     per thread by its first threads. Otherwise the scalar variant goes element by element,
//     still without divisions;
//   * strided: everything else (transposes, channels-last, slices, shorter per-sample rows),
//     element by element with 64-bit offsets from up to kMaxDims sizes/strides passed by value
//     (after dropping size-1 dimensions and merging dimensions contiguous with their neighbour
//     in every operand, so the limit is on genuinely strided dimensions; beyond it plan() fails
//     with a message naming the workaround). The coefficient row of element i is i / inner
//     there, with a 32-bit division when numel < 2^32.
// All indexing is 64-bit.

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace belm_cuda {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest
constexpr int kMaxDims = 8;
constexpr int kMaxInputs = 7;   // x and up to 6 terms (belm_kernels.ops.MAX_TERMS)
constexpr int kMaxOutputs = 3;  // belm_kernels.ops.MAX_OUTPUTS
constexpr int kMaxOperands = kMaxInputs + kMaxOutputs;

enum class DType : uint8_t { kHalf, kBFloat16, kFloat, kDouble };

__host__ __device__ constexpr int dtype_size(DType t) {
  return t == DType::kHalf || t == DType::kBFloat16 ? 2 : t == DType::kFloat ? 4 : 8;
}

// The operands of one call: inputs (x, then the terms) and outputs, with their dtypes.
struct Operands {
  const void* in[kMaxInputs];
  void* out[kMaxOutputs];
  DType in_t[kMaxInputs];
  DType out_t[kMaxOutputs];
  int nin;  // K + 1
};

// ------------------------------------------------------------------------------------------
// Arithmetic (device: explicit rounding intrinsics; host: the same IEEE operations).

__host__ __device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;  // volatile: never contracted into a following fma
  return r;
#endif
}
__host__ __device__ __forceinline__ double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  volatile double r = a * b;
  return r;
#endif
}
__host__ __device__ __forceinline__ float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
__host__ __device__ __forceinline__ double fma_rn(double a, double b, double c) {
#ifdef __CUDA_ARCH__
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
__host__ __device__ __forceinline__ float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
__host__ __device__ __forceinline__ double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

// T -> compute dtype CT: exact, except float64 -> float32 (to nearest even).
template <typename CT, typename T>
__host__ __device__ __forceinline__ CT to_compute(T v) {
  if constexpr (std::is_same_v<T, double>) {
    if constexpr (std::is_same_v<CT, double>) {
      return v;
    } else {
#ifdef __CUDA_ARCH__
      return __double2float_rn(v);
#else
      return static_cast<float>(v);
#endif
    }
  } else if constexpr (std::is_same_v<T, float>) {
    return static_cast<CT>(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return static_cast<CT>(__half2float(v));
  } else {
    return static_cast<CT>(__bfloat162float(v));
  }
}

// Compute dtype -> T, one rounding to nearest even.
template <typename T, typename CT>
__host__ __device__ __forceinline__ T from_compute(CT v) {
  if constexpr (std::is_same_v<T, __half>) {
    if constexpr (std::is_same_v<CT, double>) {
      return __double2half(v);
    } else {
      return __float2half_rn(v);
    }
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    if constexpr (std::is_same_v<CT, double>) {
      return __double2bfloat16(v);
    } else {
      return __float2bfloat16_rn(v);
    }
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<CT, double>) {
#ifdef __CUDA_ARCH__
    return __double2float_rn(v);
#else
    return static_cast<float>(v);
#endif
  } else {
    return static_cast<T>(v);  // exact: float -> float, float -> double, double -> double
  }
}

// f(T{}) for a run-time dtype: a uniform branch (every thread of a launch takes the same one).
template <typename F>
__host__ __device__ __forceinline__ void with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kHalf:
      f(__half{});
      break;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case DType::kFloat:
      f(float{});
      break;
    case DType::kDouble:
      f(double{});
      break;
  }
}

// ------------------------------------------------------------------------------------------
// One coefficient row, as the arithmetic uses it (see the top): w[m][0] * x first (w = 1 for
// the inverse), then fma(w[m][j], t_j, acc) (w = -c for the inverse), then acc / d[m].

template <typename CT, int M>
struct Weights {
  CT w[M][kMaxInputs];
  CT d[M];
};

template <typename CT, int M>
__host__ __device__ __forceinline__ Weights<CT, M> load_weights(const CT* __restrict__ row,
                                                                int nin, bool inverse) {
  Weights<CT, M> w;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int m = 0; m < M; ++m) {
    const CT c0 = row[m * nin];
    w.d[m] = c0;
    w.w[m][0] = inverse ? CT(1) : c0;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int j = 1; j < kMaxInputs; ++j) {
      if (j < nin) {
        const CT c = row[m * nin + j];
        w.w[m][j] = inverse ? -c : c;
      }
    }
  }
  return w;
}

// ------------------------------------------------------------------------------------------
// The problem after planning.

// Operand slots: input j at j, output m at kMaxInputs + m (fixed, so that every index into the
// per-operand arrays below is a compile-time constant in the unrolled kernels).
__host__ __device__ constexpr int output_slot(int m) { return kMaxInputs + m; }

struct StridedLayout {
  int ndim;
  int64_t sizes[kMaxDims];
  int64_t strides[kMaxOperands][kMaxDims];  // in elements, per operand slot (0 when unused)
};

enum class Path { kRowsVec, kRows, kStrided };

struct Problem {
  Operands ops;
  int nout;           // M
  DType ct;           // compute dtype: kFloat, or kDouble for float64 x
  const void* coef;   // compute dtype, contiguous, rows * M * (K+1) values, in device memory
  int64_t n;          // numel
  int64_t rows;       // coefficient rows: 1 (shared) or B (per sample)
  int64_t inner;      // elements per coefficient row (n / rows)
  bool per_sample;
  bool inverse;
  bool idx32;         // n < 2^32: 32-bit row divisions (strided path)
  int pack;           // P: elements per thread and step of the vector path
  Path path;
  StridedLayout layout;
};

// Elements per pack: 16 bytes of the narrowest of x and the outputs (2, 4 or 8).
__host__ inline int pack_len(const Problem& pr) {
  int narrowest = dtype_size(pr.ops.in_t[0]);
  for (int m = 0; m < pr.nout; ++m) {
    narrowest = std::min(narrowest, dtype_size(pr.ops.out_t[m]));
  }
  return 16 / narrowest;
}

// Fills pr->layout/n/rows/inner/idx32/pack/path from the logical sizes and element strides of
// the operands (strides[slot], nullptr for an unused slot; the caller has set the other
// fields). Returns nullptr, or why the kernels cannot take the tensors.
__host__ inline const char* plan(Problem* pr, int ndim, const int64_t* sizes,
                                 const int64_t* const* strides) {
  // Drop size-1 dimensions; merge a dimension into the one outside it when it is contiguous
  // with it in every operand. Keeps the row-major order of the flat logical index.
  int64_t n = 1;
  int nd = 0;
  int64_t size[kMaxDims + 1], st[kMaxOperands][kMaxDims + 1];
  for (int d = 0; d < ndim; ++d) {
    n *= sizes[d];
    if (sizes[d] == 1) {
      continue;
    }
    bool merge = nd > 0;
    for (int k = 0; k < kMaxOperands && merge; ++k) {
      merge = strides[k] == nullptr || st[k][nd - 1] == strides[k][d] * sizes[d];
    }
    if (merge) {
      size[nd - 1] *= sizes[d];
      for (int k = 0; k < kMaxOperands; ++k) {
        st[k][nd - 1] = strides[k] == nullptr ? 0 : strides[k][d];
      }
      continue;
    }
    if (nd == kMaxDims + 1) {
      break;  // too many; reported below
    }
    size[nd] = sizes[d];
    for (int k = 0; k < kMaxOperands; ++k) {
      st[k][nd] = strides[k] == nullptr ? 0 : strides[k][d];
    }
    ++nd;
  }
  if (nd > kMaxDims) {
    return "the CUDA kernel handles at most 8 strided dimensions (after merging contiguous "
           "ones); call .contiguous() on the inputs, or use backend='torch' for this layout";
  }
  if (nd == 0) {  // one element (or a 0-dim tensor)
    size[0] = 1;
    for (int k = 0; k < kMaxOperands; ++k) {
      st[k][0] = strides[k] == nullptr ? 0 : 1;
    }
    nd = 1;
  }
  pr->n = n;
  pr->layout.ndim = nd;
  for (int d = 0; d < kMaxDims; ++d) {
    pr->layout.sizes[d] = d < nd ? size[d] : 1;
    for (int k = 0; k < kMaxOperands; ++k) {
      pr->layout.strides[k][d] = d < nd ? st[k][d] : 0;
    }
  }
  pr->rows = pr->per_sample && ndim > 0 && sizes[0] > 0 ? sizes[0] : 1;
  pr->inner = n / pr->rows;
  pr->idx32 = n <= static_cast<int64_t>(UINT32_MAX);
  pr->pack = pack_len(*pr);
  bool contiguous = nd == 1, aligned = true;
  for (int k = 0; k < kMaxOperands; ++k) {
    if (strides[k] != nullptr) {
      const void* p = k < kMaxInputs ? pr->ops.in[k] : pr->ops.out[k - kMaxInputs];
      contiguous = contiguous && st[k][0] == 1;
      aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    }
  }
  // Rows shorter than one step of a block's packs would leave threads idle: flat, strided path.
  const bool long_rows = pr->rows == 1 || pr->inner >= kThreads * pr->pack;
  const bool rows_aligned = pr->rows == 1 || pr->inner % pr->pack == 0;
  pr->path = !contiguous || !long_rows ? Path::kStrided
             : aligned && rows_aligned ? Path::kRowsVec
                                       : Path::kRows;
  return nullptr;
}

// ------------------------------------------------------------------------------------------
// Per-element and per-pack work, shared by the kernels and run_on_host.

// N elements of T as one object, aligned to min(16, its size): a pack of 16 bytes or less is one
// access; a wider one (float64 next to float16 x) is accessed in pieces of 16 bytes, so it needs
// no more than the 16-byte alignment plan() checks.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// Pack p of an input, widened to CT.
template <typename CT, int P>
__host__ __device__ __forceinline__ void load_pack(CT (&v)[P], const void* base, DType t,
                                                   int64_t p) {
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    const Pack<T, P> pk = reinterpret_cast<const Pack<T, P>*>(base)[p];
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int e = 0; e < P; ++e) {
      v[e] = to_compute<CT>(pk.v[e]);
    }
  });
}

// x and the outputs have at least 16 / P bytes per element (P is chosen so): their narrower
// dtypes are never taken, and are not compiled (no narrow vector access in the vector kernel).
template <typename T, int P>
constexpr bool kFullPack = sizeof(T) * P >= 16;

template <typename CT, int P>
__host__ __device__ __forceinline__ void load_full_pack(CT (&v)[P], const void* base, DType t,
                                                        int64_t p) {
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (kFullPack<T, P>) {
      const Pack<T, P> pk = reinterpret_cast<const Pack<T, P>*>(base)[p];
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
      for (int e = 0; e < P; ++e) {
        v[e] = to_compute<CT>(pk.v[e]);
      }
    }
  });
}

template <typename CT, int P>
__host__ __device__ __forceinline__ void store_full_pack(void* base, DType t, int64_t p,
                                                         const CT (&v)[P]) {
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (kFullPack<T, P>) {
      Pack<T, P> pk;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
      for (int e = 0; e < P; ++e) {
        pk.v[e] = from_compute<T>(v[e]);
      }
      reinterpret_cast<Pack<T, P>*>(base)[p] = pk;
    }
  });
}

template <typename CT>
__host__ __device__ __forceinline__ CT load_element(const void* base, DType t, int64_t offset) {
  CT v{};
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    v = to_compute<CT>(static_cast<const T*>(base)[offset]);
  });
  return v;
}

template <typename CT>
__host__ __device__ __forceinline__ void store_element(void* base, DType t, int64_t offset,
                                                       CT v) {
  with_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    static_cast<T*>(base)[offset] = from_compute<T>(v);
  });
}

// The M results of P elements whose inputs are v(j) (a functor filling in[] for input j).
template <typename CT, int M, int P, typename LoadInput>
__host__ __device__ __forceinline__ void combine(const Operands& ops,
                                                 const Weights<CT, M>& w, bool inverse,
                                                 LoadInput&& load_input, CT (&acc)[M][P]) {
  CT v[P];
  load_input(0, v);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int m = 0; m < M; ++m) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int e = 0; e < P; ++e) {
      acc[m][e] = mul_rn(w.w[m][0], v[e]);
    }
  }
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int j = 1; j < kMaxInputs; ++j) {
    if (j < ops.nin) {
      load_input(j, v);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
      for (int m = 0; m < M; ++m) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
        for (int e = 0; e < P; ++e) {
          acc[m][e] = fma_rn(w.w[m][j], v[e], acc[m][e]);
        }
      }
    }
  }
  if (inverse) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int m = 0; m < M; ++m) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
      for (int e = 0; e < P; ++e) {
        acc[m][e] = div_rn(acc[m][e], w.d[m]);
      }
    }
  }
}

// The P elements from element offset e (a multiple of P) of contiguous, 16-byte aligned
// operands. The operands' addresses are read from ops (the kernel's parameters) at each access,
// not kept in registers.
template <typename CT, int M, int P>
__host__ __device__ __forceinline__ void do_pack(const Operands& ops, int64_t e,
                                                 const Weights<CT, M>& w, bool inverse) {
  const int64_t p = e / P;
  CT acc[M][P];
  combine<CT, M, P>(ops, w, inverse, [&](int j, CT (&v)[P]) {
    if (j == 0) {
      load_full_pack<CT, P>(v, ops.in[0], ops.in_t[0], p);
    } else {
      load_pack<CT, P>(v, ops.in[j], ops.in_t[j], p);
    }
  }, acc);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int m = 0; m < M; ++m) {
    store_full_pack<CT, P>(ops.out[m], ops.out_t[m], p, acc[m]);
  }
}

// One element at the element offsets offset(slot) of its operands.
template <typename CT, int M, typename Offset>
__host__ __device__ __forceinline__ void do_element(const Operands& ops, Offset&& offset,
                                                    const Weights<CT, M>& w, bool inverse) {
  CT acc[M][1];
  combine<CT, M, 1>(ops, w, inverse, [&](int j, CT (&v)[1]) {
    v[0] = load_element<CT>(ops.in[j], ops.in_t[j], offset(j));
  }, acc);
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int m = 0; m < M; ++m) {
    store_element<CT>(ops.out[m], ops.out_t[m], offset(output_slot(m)), acc[m][0]);
  }
}

// Row r of the rows path, done by the `nthreads` threads numbered `t` = 0, 1, ...: (P > 1) the
// row's last inner % P elements, one each by its first threads (fewer than P <= 8 < nthreads),
// then its packs strided by nthreads; (P = 1) its elements strided by nthreads.
template <typename CT, int M, int P>
__host__ __device__ __forceinline__ void do_row(const Operands& ops, const CT* __restrict__ coef,
                                                int64_t r, int64_t inner, bool inverse, int64_t t,
                                                int64_t nthreads) {
  const Weights<CT, M> w = load_weights<CT, M>(coef + r * M * ops.nin, ops.nin, inverse);
  const int64_t start = r * inner;  // a multiple of P on the vector path
  if constexpr (P > 1) {
    const int64_t npacks = inner / P;
    for (int64_t i = start + npacks * P + t; i < start + inner; i += nthreads) {  // <= 1 step
      do_element<CT, M>(ops, [i](int) { return i; }, w, inverse);
    }
    for (int64_t p = t; p < npacks; p += nthreads) {
      do_pack<CT, M, P>(ops, start + p * P, w, inverse);
    }
  } else {
#ifdef __CUDA_ARCH__
#pragma unroll 1
#endif
    for (int64_t i = start + t; i < start + inner; i += nthreads) {
      do_element<CT, M>(ops, [i](int) { return i; }, w, inverse);
    }
  }
}

// Element offsets of flat index i in every operand slot.
__host__ __device__ __forceinline__ void strided_offsets(const StridedLayout& layout, int64_t i,
                                                         int64_t (&off)[kMaxOperands]) {
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int k = 0; k < kMaxOperands; ++k) {
    off[k] = 0;
  }
  int64_t rem = i;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int d = kMaxDims - 1; d >= 0; --d) {
    if (d < layout.ndim) {
      const int64_t size = layout.sizes[d];
      const int64_t q = rem / size;
      const int64_t r = rem - q * size;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
      for (int k = 0; k < kMaxOperands; ++k) {
        off[k] += r * layout.strides[k][d];
      }
      rem = q;
    }
  }
}

// Row of the coefficient table for flat element i.
__host__ __device__ __forceinline__ int64_t row_of(int64_t i, int64_t inner, bool idx32) {
  if (idx32) {
    return static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(inner));
  }
  return i / inner;
}

template <typename CT, int M>
__host__ __device__ __forceinline__ void do_strided_element(const Operands& ops,
                                                            const StridedLayout& layout,
                                                            const CT* __restrict__ coef,
                                                            int64_t i, int64_t inner,
                                                            bool per_sample, bool inverse,
                                                            bool idx32) {
  int64_t off[kMaxOperands];
  strided_offsets(layout, i, off);
  const int64_t row = per_sample ? row_of(i, inner, idx32) : 0;
  const Weights<CT, M> w = load_weights<CT, M>(coef + row * M * ops.nin, ops.nin, inverse);
  do_element<CT, M>(ops, [&](int slot) { return off[slot]; }, w, inverse);
}

// ------------------------------------------------------------------------------------------
// Kernels: the compute dtype, the number of outputs and (vector kernel) the pack length are
// compile-time; every operand dtype and the number of terms are read at run time.

template <typename CT, int M, int P>
__device__ __forceinline__ void rows_kernel_body(const Operands& ops, const CT* __restrict__ coef,
                                                 int64_t rows, int64_t inner, bool inverse) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    do_row<CT, M, P>(ops, coef, r, inner, inverse, t, nthreads);
  }
}

// Variants whose accumulators alone take 96 bytes or more per thread (three outputs of 8
// elements, say) get all the registers they need (at least one block per SM); the others let
// ptxas trade registers for occupancy as it sees fit (it then spills in none of them).
template <typename CT, int M, int P>
constexpr bool kHeavy = sizeof(CT) * M * P >= 96;

template <typename CT, int M, int P>
__global__ void __launch_bounds__(kThreads)
    lincomb_rows_kernel(const Operands ops, const CT* __restrict__ coef, int64_t rows,
                        int64_t inner, bool inverse) {
  rows_kernel_body<CT, M, P>(ops, coef, rows, inner, inverse);
}

template <typename CT, int M, int P>
__global__ void __launch_bounds__(kThreads, 1)
    lincomb_rows_kernel_heavy(const Operands ops, const CT* __restrict__ coef, int64_t rows,
                              int64_t inner, bool inverse) {
  rows_kernel_body<CT, M, P>(ops, coef, rows, inner, inverse);
}

template <typename CT, int M>
__global__ void __launch_bounds__(kThreads)
    lincomb_strided_kernel(const Operands ops, const CT* __restrict__ coef, int64_t n,
                           int64_t inner, bool per_sample, bool inverse, bool idx32,
                           const StridedLayout layout) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < n; i += step) {
    do_strided_element<CT, M>(ops, layout, coef, i, inner, per_sample, inverse, idx32);
  }
}

// ------------------------------------------------------------------------------------------
// Dispatch, launch, host emulation.

// f(CT{}, integral_constant<M>, integral_constant<P>) for the problem's compute dtype, M and
// pack length (P = 1 unless the vector path runs; float x has P 4 or 8, float64 x 2, 4 or 8).
template <typename F>
__host__ void dispatch(const Problem& pr, F&& f) {
  auto with_m = [&](auto ct, auto p) {
    switch (pr.nout) {
      case 1:
        return f(ct, std::integral_constant<int, 1>{}, p);
      case 2:
        return f(ct, std::integral_constant<int, 2>{}, p);
      default:
        return f(ct, std::integral_constant<int, 3>{}, p);
    }
  };
  auto with_p = [&](auto ct) {
    const int p = pr.path == Path::kRowsVec ? pr.pack : 1;
    if (p == 1) {
      return with_m(ct, std::integral_constant<int, 1>{});
    }
    if (p == 8) {
      return with_m(ct, std::integral_constant<int, 8>{});
    }
    if constexpr (std::is_same_v<decltype(ct), double>) {
      if (p == 2) {
        return with_m(ct, std::integral_constant<int, 2>{});
      }
    }
    return with_m(ct, std::integral_constant<int, 4>{});
  };
  if (pr.ct == DType::kDouble) {
    with_p(double{});
  } else {
    with_p(float{});
  }
}

__host__ inline unsigned int num_blocks(int64_t work, int64_t max_blocks = kMaxBlocks) {
  const int64_t blocks = (std::max<int64_t>(work, 1) + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min(blocks, max_blocks));
}

// Grid of the rows path: x over the work of one row, y over rows (at most 65535, the y limit;
// the kernel strides over the rest), kMaxBlocks blocks in all.
__host__ inline dim3 rows_grid(const Problem& pr) {
  const int64_t p = pr.path == Path::kRowsVec ? pr.pack : 1;
  const int64_t work = std::max<int64_t>(pr.inner / p, pr.inner % p);
  const int64_t grid_y = std::min<int64_t>(pr.rows, 65535);
  return dim3(num_blocks(work, std::max<int64_t>(kMaxBlocks / grid_y, 1)),
              static_cast<unsigned int>(grid_y));
}

#ifdef __CUDACC__
// Launches the planned update on `stream`; returns cudaGetLastError() after the launch.
__host__ inline cudaError_t launch(const Problem& pr, cudaStream_t stream) {
  dispatch(pr, [&](auto ct, auto m, auto p) {
    using CT = decltype(ct);
    constexpr int M = decltype(m)::value, P = decltype(p)::value;
    const auto* coef = static_cast<const CT*>(pr.coef);
    if (pr.path == Path::kStrided) {
      if constexpr (P == 1) {
        lincomb_strided_kernel<CT, M><<<num_blocks(pr.n), kThreads, 0, stream>>>(
            pr.ops, coef, pr.n, pr.inner, pr.per_sample, pr.inverse, pr.idx32, pr.layout);
      }
    } else if constexpr (kHeavy<CT, M, P>) {
      lincomb_rows_kernel_heavy<CT, M, P><<<rows_grid(pr), kThreads, 0, stream>>>(
          pr.ops, coef, pr.rows, pr.inner, pr.inverse);
    } else {
      lincomb_rows_kernel<CT, M, P><<<rows_grid(pr), kThreads, 0, stream>>>(
          pr.ops, coef, pr.rows, pr.inner, pr.inverse);
    }
  });
  return cudaGetLastError();
}
#endif

// The same work as launch(), run sequentially on the host with host pointers (for tests): one
// "thread" per row of the rows path, all elements in flat order on the strided path.
__host__ inline void run_on_host(const Problem& pr) {
  dispatch(pr, [&](auto ct, auto m, auto p) {
    using CT = decltype(ct);
    constexpr int M = decltype(m)::value, P = decltype(p)::value;
    const auto* coef = static_cast<const CT*>(pr.coef);
    if (pr.path == Path::kStrided) {
      for (int64_t i = 0; i < pr.n; ++i) {
        do_strided_element<CT, M>(pr.ops, pr.layout, coef, i, pr.inner, pr.per_sample,
                                  pr.inverse, pr.idx32);
      }
      return;
    }
    for (int64_t r = 0; r < pr.rows; ++r) {
      do_row<CT, M, P>(pr.ops, coef, r, pr.inner, pr.inverse, 0, 1);
    }
  });
}

}  // namespace belm_cuda
