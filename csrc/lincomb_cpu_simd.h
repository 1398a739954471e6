// The contiguous kernel of belm::lincomb_ext, written once for any instruction set.
//
// No include guard on purpose: lincomb_cpu.cpp includes this file once per instruction set,
// inside a region compiled for that set (#pragma GCC target), after defining
//
//   BELM_ISA          the namespace of this copy (isa_scalar, isa_avx2, isa_avx512), and in it
//   Vec<CT>           the vector operations on CT = float or double lanes: V, L (lanes), U
//                     (vectors per step), load_<dtype>, store_<dtype>, set1, mul, fma, div.
//
// Every function here is defined inside that region, so it is compiled for that instruction set
// and only ever called once the CPU is known to have it (lincomb_cpu.cpp's dispatch). Nothing
// defined in a header outside belm's namespace may be defined after the #pragma (it would be
// compiled for the wider set and could replace the baseline copy at link time); this file only
// defines templates in namespace belm::BELM_ISA.

namespace belm {
namespace {
namespace BELM_ISA {

// U vectors of one operand of dtype D (a compile-time Is<...>, or AnyDType: the dtype t read at
// run time, a branch per operand and step).
template <typename VecT, int U, DType D>
BELM_INLINE void load_typed(typename VecT::V* v, const char* base, int64_t i) {
  constexpr int L = VecT::L;
  if constexpr (D == DType::kHalf) {
    const auto* p = reinterpret_cast<const uint16_t*>(base) + i;
    for (int u = 0; u < U; ++u) v[u] = VecT::load_half(p + u * L);
  } else if constexpr (D == DType::kBFloat16) {
    const auto* p = reinterpret_cast<const uint16_t*>(base) + i;
    for (int u = 0; u < U; ++u) v[u] = VecT::load_bf16(p + u * L);
  } else if constexpr (D == DType::kFloat) {
    const auto* p = reinterpret_cast<const float*>(base) + i;
    for (int u = 0; u < U; ++u) v[u] = VecT::load_float(p + u * L);
  } else {
    const auto* p = reinterpret_cast<const double*>(base) + i;
    for (int u = 0; u < U; ++u) v[u] = VecT::load_double(p + u * L);
  }
}

template <typename VecT, int U, DType D>
BELM_INLINE void store_typed(char* base, int64_t i, const typename VecT::V* v) {
  constexpr int L = VecT::L;
  if constexpr (D == DType::kHalf) {
    auto* p = reinterpret_cast<uint16_t*>(base) + i;
    for (int u = 0; u < U; ++u) VecT::store_half(p + u * L, v[u]);
  } else if constexpr (D == DType::kBFloat16) {
    auto* p = reinterpret_cast<uint16_t*>(base) + i;
    for (int u = 0; u < U; ++u) VecT::store_bf16(p + u * L, v[u]);
  } else if constexpr (D == DType::kFloat) {
    auto* p = reinterpret_cast<float*>(base) + i;
    for (int u = 0; u < U; ++u) VecT::store_float(p + u * L, v[u]);
  } else {
    auto* p = reinterpret_cast<double*>(base) + i;
    for (int u = 0; u < U; ++u) VecT::store_double(p + u * L, v[u]);
  }
}

template <typename VecT, int U, typename D>
BELM_INLINE void load_n(typename VecT::V* v, const char* base, DType t, int64_t i) {
  if constexpr (std::is_same_v<D, AnyDType>) {
    switch (t) {
      case DType::kHalf:
        return load_typed<VecT, U, DType::kHalf>(v, base, i);
      case DType::kBFloat16:
        return load_typed<VecT, U, DType::kBFloat16>(v, base, i);
      case DType::kFloat:
        return load_typed<VecT, U, DType::kFloat>(v, base, i);
      default:
        return load_typed<VecT, U, DType::kDouble>(v, base, i);
    }
  } else {
    load_typed<VecT, U, D::value>(v, base, i);
  }
}

template <typename VecT, int U, typename D>
BELM_INLINE void store_n(char* base, DType t, int64_t i, const typename VecT::V* v) {
  if constexpr (std::is_same_v<D, AnyDType>) {
    switch (t) {
      case DType::kHalf:
        return store_typed<VecT, U, DType::kHalf>(base, i, v);
      case DType::kBFloat16:
        return store_typed<VecT, U, DType::kBFloat16>(base, i, v);
      case DType::kFloat:
        return store_typed<VecT, U, DType::kFloat>(base, i, v);
      default:
        return store_typed<VecT, U, DType::kDouble>(base, i, v);
    }
  } else {
    store_typed<VecT, U, D::value>(base, i, v);
  }
}

// U * L consecutive elements from flat index i, the dtypes as Sig says and KF terms (0: o.nin - 1,
// read at run time): every input is read before any output is written (out[0] may be x itself).
// acc = w0 * x, then acc = fma(w_j, t_j, acc) per term, then (inverse) acc / d: the operations
// of Weights' comment, in that order, on every path.
template <typename VecT, int M, int U, typename Sig, int KF>
BELM_INLINE void step(const Operands& o, int64_t i, const Weights<typename VecT::CT>& w) {
  using V = typename VecT::V;
  V acc[M][U];
  V v[U];
  auto accumulate = [&](int j) {
    for (int m = 0; m < M; ++m) {
      const V c = VecT::set1(w.w[m][j]);
      for (int u = 0; u < U; ++u) acc[m][u] = VecT::fma(c, v[u], acc[m][u]);
    }
  };
  load_n<VecT, U, typename Sig::X>(v, o.in[0], o.in_t[0], i);
  for (int m = 0; m < M; ++m) {
    const V c = VecT::set1(w.w[m][0]);
    for (int u = 0; u < U; ++u) acc[m][u] = VecT::mul(c, v[u]);
  }
  const int last = KF > 0 ? KF : o.nin - 1;  // >= 1: K >= 1
  for (int j = 1; j < last; ++j) {
    load_n<VecT, U, typename Sig::Term>(v, o.in[j], o.in_t[j], i);
    accumulate(j);
  }
  load_n<VecT, U, typename Sig::Last>(v, o.in[last], o.in_t[last], i);
  accumulate(last);
  if (w.divide) {
    for (int m = 0; m < M; ++m) {
      const V d = VecT::set1(w.d[m]);
      for (int u = 0; u < U; ++u) acc[m][u] = VecT::div(acc[m][u], d);
    }
  }
  for (int m = 0; m < M; ++m) store_n<VecT, U, typename Sig::Out>(o.out[m], o.out_t[m], i, acc[m]);
}

// Flat elements [begin, end) of contiguous operands, one coefficient row: U vectors per step,
// then single vectors, then the scalar code (the same operations, one element at a time).
template <typename CT, int M, typename Sig, int KF = 0>
void run_contiguous(const Operands& operands, int64_t begin, int64_t end,
                    const Weights<CT>& weights) {
  using VecT = Vec<CT>;
  constexpr int64_t L = VecT::L, U = VecT::U;
  // Local copies: the outputs' stores cannot alias them, so the pointers, dtypes and
  // coefficients stay in registers instead of being reloaded after every store.
  const Operands o = operands;
  const Weights<CT> w = weights;
  int64_t i = begin;
  for (; i + U * L <= end; i += U * L) step<VecT, M, U, Sig, KF>(o, i, w);
  if constexpr (U > 1) {
    for (; i + L <= end; i += L) step<VecT, M, 1, Sig, KF>(o, i, w);
  }
  for (; i < end; ++i) step<Scalar<CT>, M, 1, Sig, KF>(o, i, w);
}

// The kernel for these operands: dtypes fixed at compile time (no branch per step) when every
// operand has x's dtype (any M), or all but the last term does (M = 1: lincomb3_'s float16 model
// output next to a float32 state, say); read at run time otherwise. The three-term update of
// the BELM samplers (lincomb3_: K = 2, M = 1) has its number of terms fixed too, which makes its
// loop as lean as a kernel written for it alone.
template <typename CT, int M>
ContiguousFn<CT> contiguous_fn_m(const Operands& o) {
  const DType t = o.in_t[0], z = o.in_t[o.nin - 1];
  bool same = true;
  for (int j = 1; j < o.nin - 1; ++j) same = same && o.in_t[j] == t;
  for (int m = 0; m < M; ++m) same = same && o.out_t[m] == t;
  ContiguousFn<CT> fn = &run_contiguous<CT, M, Signature<AnyDType, AnyDType, AnyDType, AnyDType>>;
  if (!same || (z != t && M > 1)) {
    return fn;
  }
  with_dtype(t, [&](auto x_tag) {
    using X = decltype(x_tag);
    if constexpr ((X::value == DType::kDouble) == std::is_same_v<CT, double>) {
      with_dtype(z, [&](auto z_tag) {
        using Z = decltype(z_tag);
        if constexpr (M == 1 || std::is_same_v<X, Z>) {
          using Sig = Signature<X, X, Z, X>;
          fn = &run_contiguous<CT, M, Sig>;
          if constexpr (M == 1) {
            if (o.nin == 3) {
              fn = &run_contiguous<CT, M, Sig, 2>;
            }
          }
        }
      });
    }
  });
  return fn;
}

template <typename CT>
ContiguousFn<CT> contiguous_fn(const Operands& o) {
  return o.nout == 1   ? contiguous_fn_m<CT, 1>(o)
         : o.nout == 2 ? contiguous_fn_m<CT, 2>(o)
                       : contiguous_fn_m<CT, 3>(o);
}

// Element by element (the strided path): every dtype read at run time.
template <typename CT>
ContiguousFn<CT> dynamic_fn(int m) {
  using Any = Signature<AnyDType, AnyDType, AnyDType, AnyDType>;
  return m == 1 ? &run_contiguous<CT, 1, Any> : m == 2 ? &run_contiguous<CT, 2, Any>
                                                       : &run_contiguous<CT, 3, Any>;
}

}  // namespace BELM_ISA
}  // namespace
}  // namespace belm
