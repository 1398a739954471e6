// CUDA implementation of belm::lincomb_ext (the "cuda" backend of belm_kernels): the torch glue
// around the kernels of lincomb_cuda_kernels.cuh (argument checks, current stream, device guard,
// registration). See that header for the arithmetic and the rows/strided paths. The checks here
// keep a direct call of the raw op memory-safe; the user-facing validation is
// belm_kernels/ops.py's, which calls this op as the "cuda" backend's kernel.
//
// Written against torch's stable C ABI only (torch/csrc/stable, torch/headeronly, the AOTI shim)
// and the CUDA headers, so it compiles with plain nvcc against the headers of a CPU build of
// torch, and the library it builds loads in any torch >= 2.10: TORCH_TARGET_VERSION below makes
// the stable headers hide anything newer and refuse the unstable ATen/c10 headers (2.10 is also
// the first version whose stable ABI passes std::vector<Tensor> and std::optional<Tensor>, which
// the schema's Tensor[] and Tensor? need). The schema is defined in Python
// (belm_kernels/ops.py); this file registers only the CUDA implementation.
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

#include "lincomb_cuda_kernels.cuh"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <optional>
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

// "terms[1]", say, for messages.
struct Name {
  const char* base;
  int64_t index = -1;
};

std::ostream& operator<<(std::ostream& os, const Name& name) {
  os << name.base;
  if (name.index >= 0) {
    os << "[" << name.index << "]";
  }
  return os;
}

void lincomb_cuda(std::vector<Tensor> out, std::optional<Tensor> x, std::vector<Tensor> terms,
                  Tensor coef, bool inverse) {
  // Every check runs before anything is written.
  const int64_t nout = static_cast<int64_t>(out.size());
  const int64_t nterms = static_cast<int64_t>(terms.size());
  STD_TORCH_CHECK(nout >= 1 && nout <= kMaxOutputs, "belm::lincomb_ext: out must hold 1 to ",
                  kMaxOutputs, " tensors, got ", nout);
  STD_TORCH_CHECK(nterms >= 1 && nterms <= kMaxInputs - 1,
                  "belm::lincomb_ext: terms must hold 1 to ", kMaxInputs - 1, " tensors, got ",
                  nterms);
  const bool in_place = !x.has_value();
  const Tensor first = in_place ? out[0] : *x;
  STD_TORCH_CHECK(first.defined(), "belm::lincomb_ext: x must be a defined tensor or None");
  STD_TORCH_CHECK(coef.defined() && coef.is_cuda(),
                  "belm::lincomb_ext (CUDA kernel): coef must be a CUDA tensor");
  const int32_t device = first.get_device_index();
  const int64_t ndim = first.dim();
  Problem pr{};
  auto check_operand = [&](const Tensor& t, const Name& name, DType* dtype) {
    STD_TORCH_CHECK(t.defined(), "belm::lincomb_ext: ", name, " must be a defined tensor");
    STD_TORCH_CHECK(t.is_cuda() && t.get_device_index() == device,
                    "belm::lincomb_ext (CUDA kernel): ", name, " must be on x's CUDA device ",
                    "cuda:", device);
    STD_TORCH_CHECK(t.layout() == torch::headeronly::Layout::Strided, "belm::lincomb_ext: ", name,
                    " must be a strided (dense) tensor");
    STD_TORCH_CHECK(to_dtype(t.scalar_type(), dtype), "belm::lincomb_ext: ", name,
                    " must be float16, bfloat16, float32 or float64, got ",
                    dtype_name(t.scalar_type()));
    STD_TORCH_CHECK(t.dim() == ndim, "belm::lincomb_ext: ", name, " must have x's shape (x has ",
                    ndim, " dims, ", name, " ", t.dim(), ")");
    for (int64_t d = 0; d < ndim; ++d) {
      STD_TORCH_CHECK(t.size(d) == first.size(d), "belm::lincomb_ext: ", name,
                      " must have x's shape; they differ in dim ", d, " (x ", first.size(d), ", ",
                      name, " ", t.size(d), ")");
    }
  };
  STD_TORCH_CHECK(first.is_cuda(), "belm::lincomb_ext (CUDA kernel): x must be a CUDA tensor");
  check_operand(first, {in_place ? "out[0] (x, updated in place)" : "x"}, &pr.ops.in_t[0]);
  for (int64_t k = 0; k < nterms; ++k) {
    check_operand(terms[k], {"terms", k}, &pr.ops.in_t[k + 1]);
  }
  for (int64_t m = 0; m < nout; ++m) {
    check_operand(out[m], {"out", m}, &pr.ops.out_t[m]);
  }
  const ScalarType xt = first.scalar_type();
  const ScalarType ct = xt == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  STD_TORCH_CHECK(coef.get_device_index() == device,
                  "belm::lincomb_ext: coef must be on x's CUDA device cuda:", device);
  STD_TORCH_CHECK(coef.scalar_type() == ct, "belm::lincomb_ext: coef must be ", dtype_name(ct),
                  " for ", dtype_name(xt), " x (the compute dtype), got ",
                  dtype_name(coef.scalar_type()), "; belm_kernels.lincomb converts it for you");
  STD_TORCH_CHECK(coef.is_contiguous(), "belm::lincomb_ext: coef must be contiguous");
  const int64_t nin = nterms + 1;
  const int64_t batch = ndim >= 1 ? first.size(0) : 1;
  const bool shared = coef.dim() >= 1 && coef.size(coef.dim() - 1) == nin &&
                      coef.numel() == nout * nin;
  const bool per_sample = !shared && ndim >= 1 && coef.dim() >= 2 &&
                          coef.size(coef.dim() - 1) == nin && coef.size(0) == batch &&
                          coef.numel() == batch * nout * nin;
  STD_TORCH_CHECK(shared || per_sample, "belm::lincomb_ext: coef must hold one row of K+1 = ",
                  nin, " values per output (shape (M, K+1) = (", nout, ", ", nin,
                  "), or (B, M, K+1) with B = x.shape[0]; size-1 dimensions may be left out), got ",
                  coef.dim(), " dims and ", coef.numel(), " values");
  // Written tensors: one element per address, no memory shared with any other operand (out[0]
  // is the input x itself when x is None).
  for (int64_t m = 0; m < nout; ++m) {
    const Tensor& o = out[m];
    for (int64_t d = 0; d < ndim; ++d) {
      STD_TORCH_CHECK(o.size(d) <= 1 || o.stride(d) != 0, "belm::lincomb_ext: ", Name{"out", m},
                      " has internally overlapping memory (an expanded view?); a written tensor "
                      "needs one element per address");
    }
    STD_TORCH_CHECK(in_place || !overlaps(o, first), "belm::lincomb_ext: ", Name{"out", m},
                    " must not share memory with x (it is written)");
    STD_TORCH_CHECK(!in_place || m == 0 || !overlaps(o, out[0]), "belm::lincomb_ext: ",
                    Name{"out", m}, " must not share memory with out[0] (both are written)");
    for (int64_t k = 0; k < nterms; ++k) {
      STD_TORCH_CHECK(!overlaps(o, terms[k]), "belm::lincomb_ext: ", Name{"out", m},
                      " must not share memory with ", Name{"terms", k}, " (it is written)");
    }
    STD_TORCH_CHECK(!overlaps(o, coef), "belm::lincomb_ext: ", Name{"out", m},
                    " must not share memory with coef (it is written)");
    for (int64_t other = m + 1; other < nout; ++other) {
      STD_TORCH_CHECK(!overlaps(o, out[other]), "belm::lincomb_ext: ", Name{"out", m},
                      " must not share memory with ", Name{"out", other}, " (both are written)");
    }
  }
  if (first.numel() == 0) {
    return;
  }

  pr.ops.nin = static_cast<int>(nin);
  pr.nout = static_cast<int>(nout);
  pr.ct = ct == ScalarType::Double ? DType::kDouble : DType::kFloat;
  pr.coef = coef.data_ptr();
  pr.per_sample = per_sample;
  pr.inverse = inverse;
  // Strides per operand slot (input j: j, output m: kMaxInputs + m; nullptr where unused).
  std::vector<int64_t> sizes(ndim), stride_data(static_cast<size_t>(kMaxOperands) * ndim);
  std::vector<const int64_t*> strides(kMaxOperands, nullptr);
  auto add = [&](int slot, const Tensor& t) {
    int64_t* row = stride_data.data() + slot * ndim;
    for (int64_t d = 0; d < ndim; ++d) {
      row[d] = t.stride(d);
    }
    strides[slot] = row;
  };
  pr.ops.in[0] = first.data_ptr();
  add(0, first);
  for (int64_t k = 0; k < nterms; ++k) {
    pr.ops.in[k + 1] = terms[k].data_ptr();
    add(static_cast<int>(k + 1), terms[k]);
  }
  for (int64_t m = 0; m < nout; ++m) {
    pr.ops.out[m] = out[m].data_ptr();
    add(output_slot(static_cast<int>(m)), out[m]);
  }
  for (int64_t d = 0; d < ndim; ++d) {
    sizes[d] = first.size(d);
  }
  const char* error = plan(&pr, static_cast<int>(ndim), sizes.data(), strides.data());
  STD_TORCH_CHECK(error == nullptr, "belm::lincomb_ext: ", error == nullptr ? "" : error);

  torch::stable::accelerator::DeviceGuard guard(device);
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  const cudaError_t err = launch(pr, static_cast<cudaStream_t>(stream));
  STD_TORCH_CHECK(err == cudaSuccess, "belm::lincomb_ext: CUDA kernel launch failed: ",
                  cudaGetErrorString(err));
}

}  // namespace
}  // namespace belm_cuda

STABLE_TORCH_LIBRARY_IMPL(belm, CUDA, m) {
  m.impl("lincomb_ext", TORCH_BOX(&belm_cuda::lincomb_cuda));
}
