// CUDA implementation of belm::lincomb3_ext (the "cuda" backend of belm_kernels): the torch
// glue around the kernels of lincomb3_cuda_kernels.cuh (argument checks, current stream, device
// guard, registration). See that header for the arithmetic and the rows/strided paths. The
// checks here keep a direct call of the raw op memory-safe; the user-facing validation is
// belm_kernels/ops.py's, which calls this op as the "cuda" backend's kernel.
//
// Written against torch's stable C ABI only (torch/csrc/stable, torch/headeronly, the AOTI shim)
// and the CUDA headers, so it compiles with plain nvcc against the headers of a CPU build of
// torch, and the library it builds loads in any torch >= 2.10: TORCH_TARGET_VERSION below makes
// the stable headers hide anything newer and refuse the unstable ATen/c10 headers. The schema is
// defined in Python (belm_kernels/ops.py); this file registers only the CUDA implementation.
//
// Coefficients stay in device memory and are read by the kernels (never copied to the host), and
// the kernels run on torch's current stream, so the op can be captured in a CUDA graph and a
// replay uses whatever values the coef tensor holds at replay time. No check here synchronises
// with the device (so a zero leading coefficient of the inverse gives inf/nan, as documented).

#ifndef TORCH_TARGET_VERSION
// Stable-ABI features of torch 2.10 at most: the library then loads in torch 2.10, 2.11, ...
#define TORCH_TARGET_VERSION (((0ULL + 2) << 56) | ((0ULL + 10) << 48))
#endif
#ifndef USE_CUDA
// Declares the CUDA parts of the AOTI shim (aoti_torch_get_current_cuda_stream).
#define USE_CUDA
#endif

#include "lincomb3_cuda_kernels.cuh"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <vector>

namespace belm_cuda {
namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half:
      return "float16";
    case ScalarType::BFloat16:
      return "bfloat16";
    case ScalarType::Float:
      return "float32";
    case ScalarType::Double:
      return "float64";
    default:
      return "a non-float dtype";
  }
}

bool to_dtype(ScalarType t, DType* out) {
  switch (t) {
    case ScalarType::Half:
      *out = DType::kHalf;
      return true;
    case ScalarType::BFloat16:
      *out = DType::kBFloat16;
      return true;
    case ScalarType::Float:
      *out = DType::kFloat;
      return true;
    case ScalarType::Double:
      *out = DType::kDouble;
      return true;
    default:
      return false;
  }
}

// [lo, hi) byte range spanned by t (conservative for interleaved views, like ops.py).
void byte_span(const Tensor& t, uintptr_t* lo, uintptr_t* hi) {
  int64_t min_off = 0, max_off = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t ext = (t.size(d) - 1) * t.stride(d);
    if (ext < 0) {
      min_off += ext;
    } else {
      max_off += ext;
    }
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  const auto es = static_cast<int64_t>(t.element_size());
  *lo = base + min_off * es;
  *hi = base + (max_off + 1) * es;
}

bool overlaps(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) {
    return false;
  }
  uintptr_t a0, a1, b0, b1;
  byte_span(a, &a0, &a1);
  byte_span(b, &b0, &b1);
  return a0 < b1 && b0 < a1;
}

void lincomb3_cuda(Tensor x, Tensor y, Tensor z, Tensor coef, bool inverse) {
  // Every check runs before x is written.
  STD_TORCH_CHECK(x.defined() && y.defined() && z.defined() && coef.defined(),
                  "belm::lincomb3_ext: x, y, z and coef must be defined tensors");
  STD_TORCH_CHECK(x.is_cuda() && y.is_cuda() && z.is_cuda() && coef.is_cuda(),
                  "belm::lincomb3_ext (CUDA kernel): x, y, z and coef must all be CUDA tensors");
  const int32_t device = x.get_device_index();
  STD_TORCH_CHECK(y.get_device_index() == device && z.get_device_index() == device &&
                      coef.get_device_index() == device,
                  "belm::lincomb3_ext: x, y, z and coef must be on the same CUDA device (x is on "
                  "cuda:", device, ", y on cuda:", y.get_device_index(), ", z on cuda:",
                  z.get_device_index(), ", coef on cuda:", coef.get_device_index(), ")");
  for (const Tensor* t : {&x, &y, &z, &coef}) {
    STD_TORCH_CHECK(t->layout() == torch::headeronly::Layout::Strided,
                    "belm::lincomb3_ext: x, y, z and coef must be strided (dense) tensors");
  }
  const ScalarType xt = x.scalar_type();
  const ScalarType zt = z.scalar_type();
  Problem pr{};
  STD_TORCH_CHECK(to_dtype(xt, &pr.xt),
                  "belm::lincomb3_ext: x must be float16, bfloat16, float32 or float64");
  STD_TORCH_CHECK(y.scalar_type() == xt, "belm::lincomb3_ext: y must have x's dtype ",
                  dtype_name(xt), ", got ", dtype_name(y.scalar_type()));
  STD_TORCH_CHECK(to_dtype(zt, &pr.zt),
                  "belm::lincomb3_ext: z must be float16, bfloat16, float32 or float64");
  const int64_t ndim = x.dim();
  STD_TORCH_CHECK(y.dim() == ndim && z.dim() == ndim,
                  "belm::lincomb3_ext: y and z must have x's shape (x has ", ndim, " dims, y ",
                  y.dim(), ", z ", z.dim(), ")");
  for (int64_t d = 0; d < ndim; ++d) {
    STD_TORCH_CHECK(y.size(d) == x.size(d) && z.size(d) == x.size(d),
                    "belm::lincomb3_ext: y and z must have x's shape; they differ in dim ", d,
                    " (x ", x.size(d), ", y ", y.size(d), ", z ", z.size(d), ")");
  }
  const ScalarType ct = xt == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  STD_TORCH_CHECK(coef.scalar_type() == ct, "belm::lincomb3_ext: coef must be ", dtype_name(ct),
                  " for ", dtype_name(xt), " x (the compute dtype), got ",
                  dtype_name(coef.scalar_type()), "; belm_kernels.lincomb3_ converts it for you");
  STD_TORCH_CHECK(coef.is_contiguous(), "belm::lincomb3_ext: coef must be contiguous");
  const bool shared = coef.dim() == 1 && coef.size(0) == 3;
  const bool per_sample =
      coef.dim() == 2 && ndim >= 1 && coef.size(0) == x.size(0) && coef.size(1) == 3;
  STD_TORCH_CHECK(shared || per_sample,
                  "belm::lincomb3_ext: coef must have shape (3,) or (B, 3) with B = x.shape[0] "
                  "(got ", coef.dim(), " dims, first size ", coef.dim() > 0 ? coef.size(0) : 0,
                  ")");
  for (int64_t d = 0; d < ndim; ++d) {
    STD_TORCH_CHECK(x.size(d) <= 1 || x.stride(d) != 0,
                    "belm::lincomb3_ext: x has internally overlapping memory (an expanded "
                    "view?); an in-place update needs one element per address");
  }
  STD_TORCH_CHECK(!overlaps(x, y),
                  "belm::lincomb3_ext: x must not share memory with y (x is written in place)");
  STD_TORCH_CHECK(!overlaps(x, z),
                  "belm::lincomb3_ext: x must not share memory with z (x is written in place)");
  STD_TORCH_CHECK(!overlaps(x, coef),
                  "belm::lincomb3_ext: x must not share memory with coef (x is written in place)");
  if (x.numel() == 0) {
    return;
  }

  pr.x = x.data_ptr();
  pr.y = y.data_ptr();
  pr.z = z.data_ptr();
  pr.coef = coef.data_ptr();
  pr.per_sample = per_sample;
  pr.inverse = inverse;
  std::vector<int64_t> sizes(ndim), sx(ndim), sy(ndim), sz(ndim);
  for (int64_t d = 0; d < ndim; ++d) {
    sizes[d] = x.size(d);
    sx[d] = x.stride(d);
    sy[d] = y.stride(d);
    sz[d] = z.stride(d);
  }
  const char* error =
      plan(&pr, static_cast<int>(ndim), sizes.data(), sx.data(), sy.data(), sz.data());
  STD_TORCH_CHECK(error == nullptr, "belm::lincomb3_ext: ", error == nullptr ? "" : error);

  torch::stable::accelerator::DeviceGuard guard(device);
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  const cudaError_t err = launch(pr, static_cast<cudaStream_t>(stream));
  STD_TORCH_CHECK(err == cudaSuccess, "belm::lincomb3_ext: CUDA kernel launch failed: ",
                  cudaGetErrorString(err));
}

}  // namespace
}  // namespace belm_cuda

STABLE_TORCH_LIBRARY_IMPL(belm, CUDA, m) {
  m.impl("lincomb3_ext", TORCH_BOX(&belm_cuda::lincomb3_cuda));
}
