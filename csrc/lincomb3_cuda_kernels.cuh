// The CUDA kernels of belm::lincomb3_ext and their launch planning, free of torch: this header
// includes CUDA headers only. lincomb3_cuda.cu adds the torch glue (argument checks, stream,
// registration); tests/test_extension.py compiles this header into a host-only driver that runs
// the very same per-element code and path planning on the CPU (run_on_host), so the indexing,
// packing, per-sample rows and roundings are checked on machines without a GPU.
//
//   inverse == false:  x <- a*x + b*y + c*z            t = a*x; t = fma(b, y, t); t = fma(c, z, t)
//   inverse == true:   x <- (x - b*y - c*z) / a        t = fma(-b, y, x); t = fma(-c, z, t); t / a
//
// Math in float32 (float64 for float64 x) with the rounding intrinsics written out (__fmul_rn,
// __fmaf_rn, __fdiv_rn: no contraction, no approximate division), one rounding to x's dtype
// (__float2half_rn / __float2bfloat16_rn: round to nearest even).
//
// Paths (chosen by plan()):
//   * rows: x, y, z contiguous, and a shared coef or per-sample rows of at least kThreads packs.
//     The work is split into coefficient rows (1 for a shared (3,) coef, B for a per-sample
//     (B, 3) one, each covering `inner` consecutive elements): blockIdx.y walks the rows
//     (grid-stride), so a thread loads its row's three coefficients once and never divides to
//     find them. When x, y, z are 16-byte aligned and every row starts on a pack boundary (a
//     single row, or inner a multiple of the pack length), the vector variant moves 16 bytes of
//     x and y per thread and step (128-bit loads and stores; z's pack holds as many elements,
//     so 4 to 64 bytes in pieces of at most 16 bytes) and the last inner % pack elements of a
//     row are done one per thread by its first threads; otherwise the scalar variant goes
//     element by element, still without divisions;
//   * strided: everything else (transposes, channels-last, slices, shorter per-sample rows),
//     element by element with 64-bit offsets from up to kMaxDims sizes/strides passed by value
//     (after dropping size-1 dimensions and merging dimensions contiguous with their neighbour
//     in all three tensors, so the limit is on genuinely strided dimensions; beyond it plan()
//     fails with a message naming the workaround). The coefficient row of element i is
//     i / inner there, with a 32-bit division when numel < 2^32.
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

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ------------------------------------------------------------------------------------------
// Arithmetic (device: explicit rounding intrinsics; host: the same IEEE operations).

__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__host__ __device__ __forceinline__ float to_float(double v) {
#ifdef __CUDA_ARCH__
  return __double2float_rn(v);
#else
  return static_cast<float>(v);
#endif
}
__host__ __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename CT, typename T>
__host__ __device__ __forceinline__ CT to_compute(T v) {
  if constexpr (std::is_same_v<CT, double>) {
    if constexpr (std::is_same_v<T, double>) {
      return v;
    } else {
      return static_cast<double>(to_float(v));  // exact
    }
  } else {
    return to_float(v);
  }
}

template <typename T>
__host__ __device__ __forceinline__ T from_compute(compute_t<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;  // float from float, double from double
  }
}

__host__ __device__ __forceinline__ float combine(float x, float y, float z, float a, float b,
                                                  float c, bool inverse) {
#ifdef __CUDA_ARCH__
  if (!inverse) {
    float t = __fmul_rn(a, x);
    t = __fmaf_rn(b, y, t);
    return __fmaf_rn(c, z, t);
  }
  float t = __fmaf_rn(-b, y, x);
  t = __fmaf_rn(-c, z, t);
  return __fdiv_rn(t, a);
#else
  if (!inverse) {
    volatile float ax = a * x;  // volatile: never contracted into the fma below
    float t = std::fma(b, y, static_cast<float>(ax));
    return std::fma(c, z, t);
  }
  float t = std::fma(-b, y, x);
  t = std::fma(-c, z, t);
  return t / a;
#endif
}

__host__ __device__ __forceinline__ double combine(double x, double y, double z, double a,
                                                   double b, double c, bool inverse) {
#ifdef __CUDA_ARCH__
  if (!inverse) {
    double t = __dmul_rn(a, x);
    t = __fma_rn(b, y, t);
    return __fma_rn(c, z, t);
  }
  double t = __fma_rn(-b, y, x);
  t = __fma_rn(-c, z, t);
  return __ddiv_rn(t, a);
#else
  if (!inverse) {
    volatile double ax = a * x;
    double t = std::fma(b, y, static_cast<double>(ax));
    return std::fma(c, z, t);
  }
  double t = std::fma(-b, y, x);
  t = std::fma(-c, z, t);
  return t / a;
#endif
}

// Row of the coefficient table for flat element i.
__host__ __device__ __forceinline__ int64_t row_of(int64_t i, int64_t inner, bool idx32) {
  if (idx32) {
    return static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(inner));
  }
  return i / inner;
}

// ------------------------------------------------------------------------------------------
// The problem after planning.

struct StridedLayout {
  int ndim;
  int64_t sizes[kMaxDims];
  int64_t strides[3][kMaxDims];  // in elements, for x, y, z
};

enum class Path { kRowsVec, kRows, kStrided };

struct Problem {
  DType xt, zt;
  void* x;
  const void* y;
  const void* z;
  const void* coef;  // compute dtype, contiguous, 3 or 3*B values, in device memory
  int64_t n;         // numel
  int64_t rows;      // coefficient rows: 1 (shared) or B (per sample)
  int64_t inner;     // elements per coefficient row (n / rows)
  bool per_sample;
  bool inverse;
  bool idx32;  // n < 2^32: 32-bit row divisions (strided path)
  Path path;
  StridedLayout layout;
};

__host__ __device__ constexpr int pack_len(DType xt) {
  return xt == DType::kHalf || xt == DType::kBFloat16 ? 8 : xt == DType::kFloat ? 4 : 2;
}

// Fills pr->layout/rows/inner/idx32/path from the logical sizes and element strides of x, y, z
// (the caller has set the other fields). Returns nullptr, or why the kernels cannot take the
// tensors.
__host__ inline const char* plan(Problem* pr, int ndim, const int64_t* sizes,
                                 const int64_t* x_strides, const int64_t* y_strides,
                                 const int64_t* z_strides) {
  // Drop size-1 dimensions; merge a dimension into the one outside it when it is contiguous
  // with it in all three tensors. Keeps the row-major order of the flat logical index.
  int64_t n = 1;
  int nd = 0;
  int64_t size[kMaxDims + 1], st[3][kMaxDims + 1];
  const int64_t* in[3] = {x_strides, y_strides, z_strides};
  for (int d = 0; d < ndim; ++d) {
    n *= sizes[d];
    if (sizes[d] == 1) {
      continue;
    }
    if (nd > 0 && st[0][nd - 1] == in[0][d] * sizes[d] && st[1][nd - 1] == in[1][d] * sizes[d] &&
        st[2][nd - 1] == in[2][d] * sizes[d]) {
      size[nd - 1] *= sizes[d];
      for (int k = 0; k < 3; ++k) {
        st[k][nd - 1] = in[k][d];
      }
      continue;
    }
    if (nd == kMaxDims + 1) {
      break;  // too many; reported below
    }
    size[nd] = sizes[d];
    for (int k = 0; k < 3; ++k) {
      st[k][nd] = in[k][d];
    }
    ++nd;
  }
  if (nd > kMaxDims) {
    return "the CUDA kernel handles at most 8 strided dimensions (after merging contiguous "
           "ones); call .contiguous() on y and z, or use backend='torch' for this layout";
  }
  if (nd == 0) {  // one element (or a 0-dim tensor)
    size[0] = 1;
    st[0][0] = st[1][0] = st[2][0] = 1;
    nd = 1;
  }
  pr->n = n;
  pr->layout.ndim = nd;
  for (int d = 0; d < kMaxDims; ++d) {
    pr->layout.sizes[d] = d < nd ? size[d] : 1;
    for (int k = 0; k < 3; ++k) {
      pr->layout.strides[k][d] = d < nd ? st[k][d] : 0;
    }
  }
  pr->rows = pr->per_sample && ndim > 0 && sizes[0] > 0 ? sizes[0] : 1;
  pr->inner = n / pr->rows;
  pr->idx32 = n <= static_cast<int64_t>(UINT32_MAX);
  const bool contiguous = nd == 1 && st[0][0] == 1 && st[1][0] == 1 && st[2][0] == 1;
  const bool aligned = reinterpret_cast<uintptr_t>(pr->x) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(pr->y) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(pr->z) % 16 == 0;
  // Rows shorter than one step of a block's packs would leave threads idle: flat, strided path.
  const bool long_rows = pr->rows == 1 || pr->inner >= kThreads * pack_len(pr->xt);
  const bool rows_aligned = pr->rows == 1 || pr->inner % pack_len(pr->xt) == 0;
  pr->path = !contiguous || !long_rows ? Path::kStrided
             : aligned && rows_aligned ? Path::kRowsVec
                                       : Path::kRows;
  return nullptr;
}

// ------------------------------------------------------------------------------------------
// Per-element and per-pack work, shared by the kernels and run_on_host.

// N elements of T as one object, aligned to min(16, its size): x and y packs are exactly 16
// bytes (one 128-bit access); a z pack of another dtype is 4 to 64 bytes, accessed in pieces of
// at most 16 bytes, so it needs no more than the 16-byte alignment plan() checks.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename XT, typename ZT>
__host__ __device__ __forceinline__ void do_pack(XT* __restrict__ x, const XT* __restrict__ y,
                                                 const ZT* __restrict__ z, int64_t p,
                                                 compute_t<XT> a, compute_t<XT> b,
                                                 compute_t<XT> c, bool inverse) {
  using CT = compute_t<XT>;
  constexpr int kVec = 16 / sizeof(XT);
  using XPack = Pack<XT, kVec>;
  using ZPack = Pack<ZT, kVec>;
  static_assert(sizeof(XPack) == 16, "x/y packs must be 128-bit");
  const XPack xv = reinterpret_cast<const XPack*>(x)[p];
  const XPack yv = reinterpret_cast<const XPack*>(y)[p];
  const ZPack zv = reinterpret_cast<const ZPack*>(z)[p];
  XPack out;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int j = 0; j < kVec; ++j) {
    out.v[j] = from_compute<XT>(combine(to_compute<CT>(xv.v[j]), to_compute<CT>(yv.v[j]),
                                        to_compute<CT>(zv.v[j]), a, b, c, inverse));
  }
  reinterpret_cast<XPack*>(x)[p] = out;
}

// One element at element offsets ox, oy, oz.
template <typename XT, typename ZT>
__host__ __device__ __forceinline__ void do_element(XT* __restrict__ x, const XT* __restrict__ y,
                                                    const ZT* __restrict__ z, int64_t ox,
                                                    int64_t oy, int64_t oz, compute_t<XT> a,
                                                    compute_t<XT> b, compute_t<XT> c,
                                                    bool inverse) {
  using CT = compute_t<XT>;
  x[ox] = from_compute<XT>(combine(to_compute<CT>(x[ox]), to_compute<CT>(y[oy]),
                                   to_compute<CT>(z[oz]), a, b, c, inverse));
}

// Row r of the rows path, done by the `nthreads` threads numbered `t` = 0, 1, ...: packs (VEC)
// or elements strided by nthreads, then (VEC) the row's last inner % pack elements.
template <typename XT, typename ZT, bool VEC>
__host__ __device__ __forceinline__ void do_row(XT* __restrict__ x, const XT* __restrict__ y,
                                                const ZT* __restrict__ z,
                                                const compute_t<XT>* __restrict__ coef, int64_t r,
                                                int64_t inner, bool inverse, int64_t t,
                                                int64_t nthreads) {
  using CT = compute_t<XT>;
  const CT a = coef[3 * r], b = coef[3 * r + 1], c = coef[3 * r + 2];
  XT* xr = x + r * inner;
  const XT* yr = y + r * inner;
  const ZT* zr = z + r * inner;
  int64_t first_element = 0;
  if constexpr (VEC) {
    constexpr int kVec = 16 / sizeof(XT);
    const int64_t npacks = inner / kVec;
    for (int64_t p = t; p < npacks; p += nthreads) {
      do_pack<XT, ZT>(xr, yr, zr, p, a, b, c, inverse);
    }
    first_element = npacks * kVec;  // fewer than kVec elements are left
  }
#ifdef __CUDA_ARCH__
#pragma unroll 1  // unrolled, float x with float64 z spills around the division on sm_80
#endif
  for (int64_t i = first_element + t; i < inner; i += nthreads) {
    do_element<XT, ZT>(xr, yr, zr, i, i, i, a, b, c, inverse);
  }
}

__host__ __device__ __forceinline__ void strided_offsets(const StridedLayout& layout, int64_t i,
                                                         int64_t* ox, int64_t* oy,
                                                         int64_t* oz) {
  int64_t rem = i, x = 0, y = 0, z = 0;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int d = kMaxDims - 1; d >= 0; --d) {
    if (d < layout.ndim) {
      const int64_t size = layout.sizes[d];
      const int64_t q = rem / size;
      const int64_t r = rem - q * size;
      x += r * layout.strides[0][d];
      y += r * layout.strides[1][d];
      z += r * layout.strides[2][d];
      rem = q;
    }
  }
  *ox = x;
  *oy = y;
  *oz = z;
}

// ------------------------------------------------------------------------------------------
// Kernels.

template <typename XT, typename ZT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    lincomb3_rows_kernel(XT* __restrict__ x, const XT* __restrict__ y, const ZT* __restrict__ z,
                         const compute_t<XT>* __restrict__ coef, int64_t rows, int64_t inner,
                         bool inverse) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    do_row<XT, ZT, VEC>(x, y, z, coef, r, inner, inverse, t, nthreads);
  }
}

template <typename XT, typename ZT>
__global__ void __launch_bounds__(kThreads)
    lincomb3_strided_kernel(XT* __restrict__ x, const XT* __restrict__ y,
                            const ZT* __restrict__ z, const compute_t<XT>* __restrict__ coef,
                            int64_t n, int64_t inner, bool per_sample, bool inverse, bool idx32,
                            StridedLayout layout) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < n; i += step) {
    int64_t ox, oy, oz;
    strided_offsets(layout, i, &ox, &oy, &oz);
    const compute_t<XT>* abc = per_sample ? coef + 3 * row_of(i, inner, idx32) : coef;
    do_element<XT, ZT>(x, y, z, ox, oy, oz, abc[0], abc[1], abc[2], inverse);
  }
}

// ------------------------------------------------------------------------------------------
// Dispatch, launch, host emulation.

template <typename F>
__host__ void dispatch_dtype(DType t, F&& f) {
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

__host__ inline unsigned int num_blocks(int64_t work, int64_t max_blocks = kMaxBlocks) {
  const int64_t blocks = (std::max<int64_t>(work, 1) + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min(blocks, max_blocks));
}

// Grid of the rows path: x over the work of one row, y over rows (at most 65535, the y limit;
// the kernel strides over the rest), kMaxBlocks blocks in all.
template <typename XT>
__host__ inline dim3 rows_grid(const Problem& pr) {
  constexpr int kVec = 16 / sizeof(XT);
  const int64_t work = pr.path == Path::kRowsVec
                           ? std::max<int64_t>(pr.inner / kVec, pr.inner % kVec)
                           : pr.inner;
  const int64_t grid_y = std::min<int64_t>(pr.rows, 65535);
  return dim3(num_blocks(work, std::max<int64_t>(kMaxBlocks / grid_y, 1)),
              static_cast<unsigned int>(grid_y));
}

// Launches the planned update on `stream`; returns cudaGetLastError() after the launch.
__host__ inline cudaError_t launch(const Problem& pr, cudaStream_t stream) {
  dispatch_dtype(pr.xt, [&](auto xtag) {
    using XT = decltype(xtag);
    using CT = compute_t<XT>;
    dispatch_dtype(pr.zt, [&](auto ztag) {
      using ZT = decltype(ztag);
      auto* x = static_cast<XT*>(pr.x);
      const auto* y = static_cast<const XT*>(pr.y);
      const auto* z = static_cast<const ZT*>(pr.z);
      const auto* coef = static_cast<const CT*>(pr.coef);
      switch (pr.path) {
        case Path::kRowsVec:
          lincomb3_rows_kernel<XT, ZT, true><<<rows_grid<XT>(pr), kThreads, 0, stream>>>(
              x, y, z, coef, pr.rows, pr.inner, pr.inverse);
          break;
        case Path::kRows:
          lincomb3_rows_kernel<XT, ZT, false><<<rows_grid<XT>(pr), kThreads, 0, stream>>>(
              x, y, z, coef, pr.rows, pr.inner, pr.inverse);
          break;
        case Path::kStrided:
          lincomb3_strided_kernel<XT, ZT><<<num_blocks(pr.n), kThreads, 0, stream>>>(
              x, y, z, coef, pr.n, pr.inner, pr.per_sample, pr.inverse, pr.idx32, pr.layout);
          break;
      }
    });
  });
  return cudaGetLastError();
}

// The same work as launch(), run sequentially on the host with host pointers (for tests): one
// "thread" per row of the rows path, all elements in flat order on the strided path.
__host__ inline void run_on_host(const Problem& pr) {
  dispatch_dtype(pr.xt, [&](auto xtag) {
    using XT = decltype(xtag);
    using CT = compute_t<XT>;
    dispatch_dtype(pr.zt, [&](auto ztag) {
      using ZT = decltype(ztag);
      auto* x = static_cast<XT*>(pr.x);
      const auto* y = static_cast<const XT*>(pr.y);
      const auto* z = static_cast<const ZT*>(pr.z);
      const auto* coef = static_cast<const CT*>(pr.coef);
      if (pr.path == Path::kStrided) {
        for (int64_t i = 0; i < pr.n; ++i) {
          int64_t ox, oy, oz;
          strided_offsets(pr.layout, i, &ox, &oy, &oz);
          const CT* abc = pr.per_sample ? coef + 3 * row_of(i, pr.inner, pr.idx32) : coef;
          do_element<XT, ZT>(x, y, z, ox, oy, oz, abc[0], abc[1], abc[2], pr.inverse);
        }
        return;
      }
      for (int64_t r = 0; r < pr.rows; ++r) {
        if (pr.path == Path::kRowsVec) {
          do_row<XT, ZT, true>(x, y, z, coef, r, pr.inner, pr.inverse, 0, 1);
        } else {
          do_row<XT, ZT, false>(x, y, z, coef, r, pr.inner, pr.inverse, 0, 1);
        }
      }
    });
  });
}

}  // namespace belm_cuda
