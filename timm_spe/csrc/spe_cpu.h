// One-pass per-channel global max and min (and the index of the first of each) over H x W, for CPU.
//
// PyTorch's CPU kernels read the input once for amax and once more for amin, and max(dim) / min(dim) find
// the index element by element. Here one pass keeps, per SIMD lane, the running max, min and (optionally)
// the position of the first of each, and a short lane reduction at the end picks the first overall.
// NCHW-contiguous input: one row of H*W values per (n, c). channels_last: per n, H*W rows of C values,
// vectorised over C. NaN behaves as in max(dim) / amax: a row with NaN gives NaN and the index of its
// first NaN. Registered as torch.ops.timm_spe.max_min and torch.ops.timm_spe.max_min_with_indices.
//
// The gated block tail relu(x * gate + shortcut), written into x in one pass (eager PyTorch takes an addcmul
// pass and a relu pass), with addcmul's rounding (PyTorch's vectorised CPU kernels are built with FMA where the
// CPU has it, so x * gate + shortcut is one fused multiply-add there, and a multiply and an add otherwise) and
// relu's NaN: torch.ops.timm_spe.scale_add_relu_.
//
// BatchNorm's input gradient in the fused block backward in one pass (bn_input_grad_), the per-map sums it needs in
// channels_last (channels_last_per_map_sums), both handling the block's extrema in the same pass, and the N x C
// loads / adds at the extrema's positions for the other functions (take_at, scatter_add_at_; PyTorch's gather /
// scatter_add_ take a generic strided loop for them).
//
// bfloat16 / float16 (autocast, AMP): every kernel loads the 16-bit values into float32 lanes, computes in float32 and
// rounds each result once, to nearest even. max_min, take_at and scatter_add_at_ then give the eager ops' results bit
// for bit (values and first indices; scatter_add_ on the CPU adds in float32 and rounds too), and so does
// scale_add_relu_ (addcmul computes in float32 for 16-bit tensors and rounds once; the product of two 16-bit values is
// exact in float32, so FMA or not gives the same). bn_input_grad_ and channels_last_per_map_sums take float32
// per-channel coefficients / mean and return float32 sums for 16-bit input: one rounding instead of eager's three or
// four 16-bit roundings (more precise; tested against float64).
//
// This header: the SIMD helpers, the 16-bit loads and rounding stores, the multiply-add helper and the argument
// checks the kernels share, and the ops' declarations.
#pragma once
#if defined(__FMA__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <tuple>

namespace timm_spe_cpu {

// Vectors as wide as the CPU's registers (-march=native): 512-bit with AVX-512, else 256-bit. Results do not depend on
// the width: every op is per lane, and the only cross-lane steps (max / min and their first index) are exact.
#ifdef __AVX512F__
#define TIMM_SPE_VEC_BYTES 64
#else
#define TIMM_SPE_VEC_BYTES 32
#endif
template <typename T> struct Simd;
template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(TIMM_SPE_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(TIMM_SPE_VEC_BYTES)));
  typedef int32_t Index;
  static constexpr int lanes = TIMM_SPE_VEC_BYTES / 4;
};
template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(TIMM_SPE_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(TIMM_SPE_VEC_BYTES)));
  typedef int64_t Index;
  static constexpr int lanes = TIMM_SPE_VEC_BYTES / 8;
};

template <typename V, typename T> inline V load(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V, typename T> inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// The type a kernel computes in for storage type T: float for bfloat16 / float16, T itself otherwise.
template <typename T> struct Compute { using type = T; };
template <> struct Compute<c10::BFloat16> { using type = float; };
template <> struct Compute<c10::Half> { using type = float; };
template <typename T> using acc_t = typename Compute<T>::type;
template <typename T> constexpr bool is_16bit = !std::is_same_v<T, acc_t<T>>;
template <typename T> using VecOf = typename Simd<acc_t<T>>::V;

// One vector of compute-type lanes loaded from T (16 or 8 floats from as many bfloat16 / float16 values).
template <typename T> inline VecOf<T> loadv(const T* p) {
  using V = VecOf<T>;
  constexpr int L = Simd<acc_t<T>>::lanes;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bfloat16 is float32's upper half
    typedef uint16_t U16 __attribute__((vector_size(TIMM_SPE_VEC_BYTES / 2)));
    typedef uint32_t U32 __attribute__((vector_size(TIMM_SPE_VEC_BYTES)));
    U16 u;
    std::memcpy(&u, p, sizeof(u));
    return reinterpret_cast<V>(__builtin_convertvector(u, U32) << 16);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if TIMM_SPE_VEC_BYTES == 64
    return reinterpret_cast<V>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)
    return reinterpret_cast<V>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
    V v;
    for (int k = 0; k < L; ++k) v[k] = static_cast<float>(p[k]);
    return v;
#endif
  } else {
    return load<V>(p);
  }
}

// One vector stored to T, each lane rounded to nearest even (as c10's conversions round; NaN stays NaN).
template <typename T> inline void storev(T* p, VecOf<T> v) {
  constexpr int L = Simd<acc_t<T>>::lanes;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    typedef uint16_t U16 __attribute__((vector_size(TIMM_SPE_VEC_BYTES / 2)));
    typedef uint32_t U32 __attribute__((vector_size(TIMM_SPE_VEC_BYTES)));
    const U32 bits = reinterpret_cast<U32>(v);
    U32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    rounded = (v != v) ? U32{} + 0x7FC0u : rounded;  // c10::BFloat16's NaN
    const U16 out = __builtin_convertvector(rounded, U16);
    std::memcpy(p, &out, sizeof(out));
  } else if constexpr (std::is_same_v<T, c10::Half>) {
#if TIMM_SPE_VEC_BYTES == 64
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int k = 0; k < L; ++k) p[k] = c10::Half(v[k]);
#endif
  } else {
    store(p, v);
  }
}

// Scalar load / rounding store (c10's conversions round to nearest even).
template <typename T> inline acc_t<T> loads(const T* p) { return static_cast<acc_t<T>>(*p); }
template <typename T> inline void stores(T* p, acc_t<T> v) { *p = static_cast<T>(v); }

// The dtype of per-channel / per-map coefficients and float sums for x: float32 for 16-bit x, x's otherwise.
inline at::ScalarType acc_type(const at::Tensor& x) {
  const auto t = x.scalar_type();
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

// Lanes rotated by Step: out[k] = v[(k + Step) % lanes] (a constant shuffle).
template <int Step, typename Vec> inline Vec rotate(Vec v) {
  constexpr int n = sizeof(Vec) / sizeof(v[0]);
  using Mask = std::conditional_t<sizeof(v[0]) == 4, int32_t, int64_t>;
  typedef Mask M __attribute__((vector_size(sizeof(Vec))));
  M mask;
  for (int k = 0; k < n; ++k) mask[k] = (k + Step) % n;
  return __builtin_shuffle(v, mask);
}

// Every lane set to the largest (Greater) or smallest lane value of v, NaN-free lanes: log2(lanes) rotate-and-combine
// steps.
template <bool Greater, typename Vec> inline Vec all_lanes(Vec v) {
  constexpr int n = sizeof(Vec) / sizeof(v[0]);
  static_assert(n == 4 || n == 8 || n == 16, "4, 8 or 16 lanes");
  Vec r = rotate<1>(v);
  v = (Greater ? r > v : r < v) ? r : v;
  r = rotate<2>(v);
  v = (Greater ? r > v : r < v) ? r : v;
  if constexpr (n >= 8) {
    r = rotate<4>(v);
    v = (Greater ? r > v : r < v) ? r : v;
  }
  if constexpr (n == 16) {
    r = rotate<8>(v);
    v = (Greater ? r > v : r < v) ? r : v;
  }
  return v;
}

// First NaN of a row of n values with stride s (-1 if none).
template <typename T> inline int64_t first_nan(const T* p, int64_t n, int64_t s) {
  for (int64_t i = 0; i < n; ++i) if (std::isnan(static_cast<acc_t<T>>(p[i * s]))) return i;
  return -1;
}

// a * b + c rounded as PyTorch's CPU addcmul rounds it (see the top); built with -ffp-contract=off.
inline float mul_add(float a, float b, float c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}
inline double mul_add(double a, double b, double c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}
template <typename V> inline V mul_add(V a, V b, V c) {
#if TIMM_SPE_VEC_BYTES == 64
  if constexpr (sizeof(a[0]) == 4) {
    return reinterpret_cast<V>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                               reinterpret_cast<__m512>(c)));
  } else {
    return reinterpret_cast<V>(_mm512_fmadd_pd(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b),
                                               reinterpret_cast<__m512d>(c)));
  }
#elif defined(__FMA__)
  if constexpr (sizeof(a[0]) == 4) {
    __m256 r = _mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), reinterpret_cast<__m256>(c));
    return reinterpret_cast<V>(r);
  } else {
    __m256d r = _mm256_fmadd_pd(reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b), reinterpret_cast<__m256d>(c));
    return reinterpret_cast<V>(r);
  }
#else
  return a * b + c;
#endif
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Checks a 4-D float32/float64/bfloat16/float16 tensor in NCHW or channels_last for `op`; true for channels_last.
inline bool channels_last_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, " expects N x C x H x W tensors, got ", x.dim(), " dims");
  TORCH_CHECK(supported_dtype(x.scalar_type()),
              op, " supports float32, float64, bfloat16 and float16, got ", x.scalar_type());
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), op, ": x must be NCHW or channels_last");
  return channels_last;
}

inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() && t.scalar_type() == x.scalar_type(),
              op, ": ", name, " must have x's shape, strides and dtype");
}

inline void check_vector(const at::Tensor& t, int64_t numel, const at::Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(t.numel() == numel && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              op, ": ", what, " must be contiguous, of x's dtype");
}

// Coefficients: contiguous, float32 for 16-bit x, x's dtype otherwise.
inline void check_coef(const at::Tensor& t, int64_t numel, const at::Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(t.numel() == numel && t.is_contiguous() && t.scalar_type() == acc_type(x),
              op, ": ", what, " must be contiguous, ", acc_type(x), " for ", x.scalar_type(), " x");
}

// channels_last reductions walk blocks of channels down an image's rows with their running values in registers:
// block(j, K) for channels [j, j + K * L) (K as a std::integral_constant), blocks of K vectors while they fit, then the
// remaining whole vectors in one block each of K / 2, K / 4, ..., 1 (never a run of single-vector blocks); returns the
// first channel left over (c % L of them, for the caller's scalar loop).
template <int K, int L, typename Block>
inline int64_t remainder_blocks(int64_t c, int64_t j, const Block& block) {
  if constexpr (K >= 1) {
    if (j + K * L <= c) {
      block(j, std::integral_constant<int, K>{});
      j += K * L;
    }
    return remainder_blocks<K / 2, L>(c, j, block);
  } else {
    return j;
  }
}
template <int K, int L, typename Block>
inline int64_t channel_blocks(int64_t c, const Block& block) {
  int64_t j = 0;
  for (; j + K * L <= c; j += K * L) block(j, std::integral_constant<int, K>{});
  return remainder_blocks<K / 2, L>(c, j, block);
}

// AT_DISPATCH over the kernels' four dtypes.
#define TIMM_SPE_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, TYPE, NAME, __VA_ARGS__)

// fn(begin, end) in parallel over the N * C maps (NCHW) or the N * H * W pixels (channels_last).
template <typename Fn>
void for_maps_or_pixels(bool channels_last, int64_t n, int64_t c, int64_t hw, const Fn& fn) {
  if (channels_last) {
    at::parallel_for(0, n * hw, std::max<int64_t>(1, 32768 / c), fn);
  } else {
    at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / hw), fn);
  }
}

// Values at, and additions to, one H x W position per (n, c): x[n, c].flatten()[index[n, c]] (gather, and
// scatter_add_ of one value per map). PyTorch's gather / scatter_add_ walk N x C x 1 index tensors with generic
// strided loops (~0.2-0.6 ms per call on a block output here); these are N x C loads / adds at computed offsets.
// Offsets: NCHW (n * C + c) * HW + i, channels_last (n * HW + i) * C + c.
inline void check_index(const at::Tensor& index, const at::Tensor& x, const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == x.size(0) * x.size(1),
              op, ": index must be a contiguous N x C int64 tensor");
}

inline void check_index_range(const int64_t* index, int64_t numel, int64_t hw, const char* op) {
  for (int64_t r = 0; r < numel; ++r) {
    TORCH_CHECK(index[r] >= 0 && index[r] < hw, op, ": index ", index[r], " out of range for H x W = ", hw);
  }
}

// The ops (registered in spe_cpu.cpp): max_min.cpp, passes.cpp, gate.cpp.
std::tuple<at::Tensor, at::Tensor> max_min(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> max_min_with_indices(const at::Tensor& x);
void scale_add_relu_(at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& gate);
at::Tensor take_at(const at::Tensor& x, const at::Tensor& index);
void scatter_add_at_(at::Tensor& t, const at::Tensor& index, const at::Tensor& values);
void bn_input_grad_(at::Tensor& out, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_scale,
                    const at::Tensor& shift, const at::Tensor& x_coef, const at::Tensor& i_max, const at::Tensor& v_max,
                    const at::Tensor& i_min, const at::Tensor& v_min);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channels_last_per_map_sums(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& i_max,
    const at::Tensor& i_min);
at::Tensor mix_weights(const at::Tensor& p);
at::Tensor spe_gate_of(const at::Tensor& x, const at::Tensor& p, const at::Tensor& w_exc, const at::Tensor& b_exc,
                       const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper);
void spe_add_relu_(at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& p, const at::Tensor& w_exc,
                   const at::Tensor& b_exc, const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper);
at::Tensor spe_gate(const at::Tensor& f_max, const at::Tensor& f_min, const at::Tensor& lam, const at::Tensor& w_exc,
                    const at::Tensor& b_exc, const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper);
std::vector<at::Tensor> block_backward_coefficients(
    const at::Tensor& sum_grad, const at::Tensor& sum_grad_xhat, const at::Tensor& x_max, const at::Tensor& x_min,
    const at::Tensor& f_max, const at::Tensor& f_min, const at::Tensor& gate, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& lam,
    const at::Tensor& w_exc, const at::Tensor& b_exc, const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper,
    int64_t count);

}  // namespace timm_spe_cpu
