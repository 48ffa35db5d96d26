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
#if defined(__FMA__)
#include <immintrin.h>
#endif
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T> struct Simd;
template <> struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef int32_t Index;
  static constexpr int lanes = 8;
};
template <> struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  typedef int64_t Index;
  static constexpr int lanes = 4;
};

template <typename V, typename T> inline V load(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V, typename T> inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// Lanes rotated by Step: out[k] = v[(k + Step) % lanes] (a constant shuffle).
template <int Step, typename Vec> inline Vec rotate(Vec v) {
  constexpr int n = sizeof(Vec) / sizeof(v[0]);
  using Mask = std::conditional_t<sizeof(v[0]) == 4, int32_t, int64_t>;
  typedef Mask M __attribute__((vector_size(sizeof(Vec))));
  if constexpr (n == 8) {
    return __builtin_shuffle(v, M{Step % 8, (1 + Step) % 8, (2 + Step) % 8, (3 + Step) % 8,
                                  (4 + Step) % 8, (5 + Step) % 8, (6 + Step) % 8, (7 + Step) % 8});
  } else {
    static_assert(n == 4, "4 or 8 lanes");
    return __builtin_shuffle(v, M{Step % 4, (1 + Step) % 4, (2 + Step) % 4, (3 + Step) % 4});
  }
}

// Every lane set to the largest (Greater) or smallest lane value of v, NaN-free lanes.
template <bool Greater, typename Vec> inline Vec all_lanes(Vec v) {
  constexpr int n = sizeof(Vec) / sizeof(v[0]);
  Vec r = rotate<1>(v);
  v = (Greater ? r > v : r < v) ? r : v;
  r = rotate<2>(v);
  v = (Greater ? r > v : r < v) ? r : v;
  if constexpr (n == 8) {
    r = rotate<4>(v);
    v = (Greater ? r > v : r < v) ? r : v;
  }
  return v;
}

// First NaN of a row of n values with stride s (-1 if none).
template <typename T> int64_t first_nan(const T* p, int64_t n, int64_t s) {
  for (int64_t i = 0; i < n; ++i) if (std::isnan(p[i * s])) return i;
  return -1;
}

// NCHW: rows [begin, end) of length len.
template <typename T, bool WithIndex>
void rows_max_min(const T* x, int64_t begin, int64_t end, int64_t len,
                  T* out_max, T* out_min, int64_t* idx_max, int64_t* idx_min) {
  using S = Simd<T>;
  using V = typename S::V;
  using I = typename S::I;
  constexpr int L = S::lanes;
  I lane;
  for (int k = 0; k < L; ++k) lane[k] = k;
  for (int64_t r = begin; r < end; ++r) {
    const T* p = x + r * len;
    T best_max = p[0], best_min = p[0];
    int64_t at_max = 0, at_min = 0, i = 1;
    bool nan = std::isnan(p[0]);
    if (len >= 2 * L) {
      V mx = load<V>(p), mn = mx;
      I ix = lane, in = lane, pos = lane;
      I seen_nan = (mx != mx);
      for (i = L; i + L <= len; i += L) {
        V v = load<V>(p + i);
        pos += L;
        I gt = v > mx, lt = v < mn;
        mx = gt ? v : mx;
        mn = lt ? v : mn;
        if (WithIndex) { ix = gt ? pos : ix; in = lt ? pos : in; }
        seen_nan |= (v != v);
      }
      // lanes -> first overall: the largest value, and among lanes holding it the smallest position
      // (branch-free: rotate-and-combine across lanes, log2(lanes) steps)
      const V all_max = all_lanes<true>(mx), all_min = all_lanes<false>(mn);
      best_max = all_max[0];
      best_min = all_min[0];
      if (WithIndex) {
        const I none = lane + static_cast<typename S::Index>(len);
        at_max = all_lanes<false>((mx == all_max) ? ix : none)[0];
        at_min = all_lanes<false>((mn == all_min) ? in : none)[0];
      }
      for (int k = 0; k < L; ++k) nan |= seen_nan[k] != 0;
    }
    for (; i < len; ++i) {  // remainder (and short rows): later positions win only when strictly better
      T v = p[i];
      if (v > best_max) { best_max = v; at_max = i; }
      if (v < best_min) { best_min = v; at_min = i; }
      nan |= std::isnan(v);
    }
    if (nan) {
      at_max = at_min = first_nan(p, len, 1);
      best_max = best_min = std::numeric_limits<T>::quiet_NaN();
    }
    out_max[r] = best_max;
    out_min[r] = best_min;
    if (WithIndex) { idx_max[r] = at_max; idx_min[r] = at_min; }
  }
}

// channels_last: image n is hw rows of c values; per channel the max and min over rows (vectorised over c).
template <typename T, bool WithIndex>
void channels_last_max_min(const T* x, int64_t n, int64_t hw, int64_t c,
                           T* out_max, T* out_min, int64_t* idx_max, int64_t* idx_min) {
  using S = Simd<T>;
  using V = typename S::V;
  using I = typename S::I;
  using Index = typename S::Index;
  constexpr int L = S::lanes;
  std::vector<Index> ix(c), in(c), nan(c);
  const T* img = x + n * hw * c;
  T* mx = out_max + n * c;
  T* mn = out_min + n * c;
  std::memcpy(mx, img, c * sizeof(T));
  std::memcpy(mn, img, c * sizeof(T));
  std::fill(ix.begin(), ix.end(), 0);
  std::fill(in.begin(), in.end(), 0);
  for (int64_t j = 0; j < c; ++j) nan[j] = std::isnan(img[j]) ? -1 : 0;
  const int64_t j_vec = c - c % L;
  for (int64_t r = 1; r < hw; ++r) {
    const T* row = img + r * c;
    I pos;
    for (int k = 0; k < L; ++k) pos[k] = static_cast<Index>(r);
    for (int64_t j = 0; j < j_vec; j += L) {
      V v = load<V>(row + j), a = load<V>(mx + j), b = load<V>(mn + j);
      I gt = v > a, lt = v < b;
      store(mx + j, gt ? v : a);
      store(mn + j, lt ? v : b);
      if (WithIndex) {
        store(ix.data() + j, gt ? pos : load<I>(ix.data() + j));
        store(in.data() + j, lt ? pos : load<I>(in.data() + j));
      }
      store(nan.data() + j, load<I>(nan.data() + j) | (v != v));
    }
    for (int64_t j = j_vec; j < c; ++j) {
      T v = row[j];
      if (v > mx[j]) { mx[j] = v; ix[j] = r; }
      if (v < mn[j]) { mn[j] = v; in[j] = r; }
      if (std::isnan(v)) nan[j] = -1;
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    if (nan[j]) {
      mx[j] = mn[j] = std::numeric_limits<T>::quiet_NaN();
      ix[j] = in[j] = static_cast<Index>(first_nan(img + j, hw, c));
    }
  }
  if (WithIndex) {
    for (int64_t j = 0; j < c; ++j) { idx_max[n * c + j] = ix[j]; idx_min[n * c + j] = in[j]; }
  }
}

template <bool WithIndex>
std::vector<at::Tensor> max_min_impl(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "timm_spe::max_min expects an N x C x H x W tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "timm_spe::max_min supports float32 and float64, got ", x.scalar_type());
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(hw > 0, "timm_spe::max_min needs a non-empty H x W");
  TORCH_CHECK(hw < (int64_t(1) << 31), "timm_spe::max_min: H x W must be below 2^31");
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor input = channels_last ? x : x.contiguous();
  at::Tensor out_max = at::empty({n, c}, x.options()), out_min = at::empty({n, c}, x.options());
  at::Tensor idx_max, idx_min;
  if (WithIndex) {
    idx_max = at::empty({n, c}, x.options().dtype(at::kLong));
    idx_min = at::empty({n, c}, x.options().dtype(at::kLong));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "timm_spe_max_min", [&] {
    const scalar_t* px = input.data_ptr<scalar_t>();
    scalar_t* pmax = out_max.data_ptr<scalar_t>();
    scalar_t* pmin = out_min.data_ptr<scalar_t>();
    int64_t* pimax = WithIndex ? idx_max.data_ptr<int64_t>() : nullptr;
    int64_t* pimin = WithIndex ? idx_min.data_ptr<int64_t>() : nullptr;
    if (channels_last) {
      at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i)
          channels_last_max_min<scalar_t, WithIndex>(px, i, hw, c, pmax, pmin, pimax, pimin);
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, 32768 / hw);
      at::parallel_for(0, n * c, grain, [&](int64_t b, int64_t e) {
        rows_max_min<scalar_t, WithIndex>(px, b, e, hw, pmax, pmin, pimax, pimin);
      });
    }
  });
  if (WithIndex) return {out_max, idx_max, out_min, idx_min};
  return {out_max, out_min};
}

std::tuple<at::Tensor, at::Tensor> max_min(const at::Tensor& x) {
  auto r = max_min_impl<false>(x);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> max_min_with_indices(const at::Tensor& x) {
  auto r = max_min_impl<true>(x);
  return {r[0], r[1], r[2], r[3]};
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
#ifdef __FMA__
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

// relu(x * g + s) into x for n_rows rows of len values, row r scaled by g[r] (NCHW: rows are maps).
template <typename T>
void rows_scale_add_relu(T* x, const T* s, const T* g, int64_t begin, int64_t end, int64_t len) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::lanes;
  const V zero = {};
  for (int64_t r = begin; r < end; ++r) {
    T* px = x + r * len;
    const T* ps = s + r * len;
    const T gr = g[r];
    V gv = zero + gr;
    int64_t i = 0;
    for (; i + L <= len; i += L) {
      V v = mul_add(load<V>(px + i), gv, load<V>(ps + i));
      store(px + i, (v < zero) ? zero : v);
    }
    for (; i < len; ++i) {
      T v = mul_add(px[i], gr, ps[i]);
      px[i] = v < T(0) ? T(0) : v;
    }
  }
}

// channels_last: pixels [begin, end) of c values each; pixel p of image p / hw scaled by that image's gate row.
template <typename T>
void pixels_scale_add_relu(T* x, const T* s, const T* g, int64_t begin, int64_t end, int64_t hw, int64_t c) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::lanes;
  const V zero = {};
  for (int64_t p = begin; p < end; ++p) {
    T* px = x + p * c;
    const T* ps = s + p * c;
    const T* pg = g + (p / hw) * c;
    int64_t j = 0;
    for (; j + L <= c; j += L) {
      V v = mul_add(load<V>(px + j), load<V>(pg + j), load<V>(ps + j));
      store(px + j, (v < zero) ? zero : v);
    }
    for (; j < c; ++j) {
      T v = mul_add(px[j], pg[j], ps[j]);
      px[j] = v < T(0) ? T(0) : v;
    }
  }
}

// Checks a 4-D float32/float64 tensor in NCHW or channels_last for `op`; true for channels_last.
bool channels_last_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, " expects N x C x H x W tensors, got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              op, " supports float32 and float64, got ", x.scalar_type());
  const bool channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), op, ": x must be NCHW or channels_last");
  return channels_last;
}

void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() && t.scalar_type() == x.scalar_type(),
              op, ": ", name, " must have x's shape, strides and dtype");
}

void check_vector(const at::Tensor& t, int64_t numel, const at::Tensor& x, const char* op, const char* what) {
  TORCH_CHECK(t.numel() == numel && t.is_contiguous() && t.scalar_type() == x.scalar_type(),
              op, ": ", what, " must be contiguous, of x's dtype");
}

// fn(begin, end) in parallel over the N * C maps (NCHW) or the N * H * W pixels (channels_last).
template <typename Fn>
void for_maps_or_pixels(bool channels_last, int64_t n, int64_t c, int64_t hw, const Fn& fn) {
  if (channels_last) {
    at::parallel_for(0, n * hw, std::max<int64_t>(1, 32768 / c), fn);
  } else {
    at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / hw), fn);
  }
}

void scale_add_relu_(at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& gate) {
  const char* op = "timm_spe::scale_add_relu_";
  const bool channels_last = channels_last_input(x, op);
  check_like_x(shortcut, x, op, "shortcut");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  check_vector(gate, n * c, x, op, "gate (N x C, or N x C x 1 x 1)");
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "timm_spe_scale_add_relu_", [&] {
    scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* ps = shortcut.data_ptr<scalar_t>();
    const scalar_t* pg = gate.data_ptr<scalar_t>();
    for_maps_or_pixels(channels_last, n, c, hw, [&](int64_t b, int64_t e) {
      if (channels_last) pixels_scale_add_relu<scalar_t>(px, ps, pg, b, e, hw, c);
      else rows_scale_add_relu<scalar_t>(px, ps, pg, b, e, hw);
    });
  });
}

// Values at, and additions to, one H x W position per (n, c): x[n, c].flatten()[index[n, c]] (gather, and
// scatter_add_ of one value per map). PyTorch's gather / scatter_add_ walk N x C x 1 index tensors with generic
// strided loops (~0.2-0.6 ms per call on a block output here); these are N x C loads / adds at computed offsets.
// Offsets: NCHW (n * C + c) * HW + i, channels_last (n * HW + i) * C + c.
void check_index(const at::Tensor& index, const at::Tensor& x, const char* op) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == x.size(0) * x.size(1),
              op, ": index must be a contiguous N x C int64 tensor");
}

void check_index_range(const int64_t* index, int64_t numel, int64_t hw, const char* op) {
  for (int64_t r = 0; r < numel; ++r) {
    TORCH_CHECK(index[r] >= 0 && index[r] < hw, op, ": index ", index[r], " out of range for H x W = ", hw);
  }
}

at::Tensor take_at(const at::Tensor& x, const at::Tensor& index) {
  const char* op = "timm_spe::take_at";
  const bool channels_last = channels_last_input(x, op);
  check_index(index, x, op);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = at::empty({n, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "timm_spe_take_at", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    const int64_t* pi = index.data_ptr<int64_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    check_index_range(pi, n * c, hw, op);
    for (int64_t b = 0; b < n; ++b) {  // nested loops: no integer division per element
      const int64_t* ib = pi + b * c;
      scalar_t* ob = po + b * c;
      if (channels_last) {
        const scalar_t* xb = px + b * hw * c;
        for (int64_t ch = 0; ch < c; ++ch) ob[ch] = xb[ib[ch] * c + ch];
      } else {
        const scalar_t* xb = px + b * c * hw;
        for (int64_t ch = 0; ch < c; ++ch) ob[ch] = xb[ch * hw + ib[ch]];
      }
    }
  });
  return out;
}

void scatter_add_at_(at::Tensor& t, const at::Tensor& index, const at::Tensor& values) {
  const char* op = "timm_spe::scatter_add_at_";
  const bool channels_last = channels_last_input(t, op);
  check_index(index, t, op);
  const int64_t n = t.size(0), c = t.size(1), hw = t.size(2) * t.size(3);
  check_vector(values, n * c, t, op, "values (N x C)");
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "timm_spe_scatter_add_at_", [&] {
    scalar_t* pt = t.data_ptr<scalar_t>();
    const int64_t* pi = index.data_ptr<int64_t>();
    const scalar_t* pv = values.data_ptr<scalar_t>();
    check_index_range(pi, n * c, hw, op);
    for (int64_t b = 0; b < n; ++b) {
      const int64_t* ib = pi + b * c;
      const scalar_t* vb = pv + b * c;
      if (channels_last) {
        scalar_t* tb = pt + b * hw * c;
        for (int64_t ch = 0; ch < c; ++ch) tb[ib[ch] * c + ch] += vb[ch];
      } else {
        scalar_t* tb = pt + b * c * hw;
        for (int64_t ch = 0; ch < c; ++ch) tb[ch * hw + ib[ch]] += vb[ch];
      }
    }
  });
}

// BatchNorm's input gradient in the fused block backward (timm_spe.spe_me._BatchNormSpeAddReLU), with the pooling
// gradients at the extrema added in the same pass:
// out = grad * grad_scale[n, c] + shift[c] - x * x_coef[c], rounded as addcmul(shift, grad, grad_scale) then
// addcmul_(x, x_coef, value=-1); then out[n, c, i_max[n, c]] += v_max[n, c] and out[n, c, i_min[n, c]] += v_min[n, c]
// in that order, as two scatter_add_ calls would add them (with the output still in cache instead of N x C random
// accesses afterwards).
template <typename T>
void rows_bn_input_grad(T* out, const T* g, const T* x, const T* grad_scale, const T* shift, const T* x_coef,
                        const int64_t* i_max, const T* v_max, const int64_t* i_min, const T* v_min,
                        int64_t begin, int64_t end, int64_t c, int64_t len) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::lanes;
  const V zero = {};
  for (int64_t r = begin; r < end; ++r) {
    const int64_t ch = r % c, off = r * len;
    const T a = grad_scale[r], b = shift[ch], m = -x_coef[ch];
    const V av = zero + a, bv = zero + b, mv = zero + m;
    int64_t i = 0;
    for (; i + L <= len; i += L)
      store(out + off + i, mul_add(load<V>(x + off + i), mv, mul_add(load<V>(g + off + i), av, bv)));
    for (; i < len; ++i) out[off + i] = mul_add(x[off + i], m, mul_add(g[off + i], a, b));
    out[off + i_max[r]] += v_max[r];
    out[off + i_min[r]] += v_min[r];
  }
}

// channels_last: i_max / i_min as int32 (N x C), compared lane by lane with each pixel's position.
template <typename T>
void pixels_bn_input_grad(T* out, const T* g, const T* x, const T* grad_scale, const T* shift, const T* x_coef,
                          const int32_t* i_max, const T* v_max, const int32_t* i_min, const T* v_min,
                          int64_t begin, int64_t end, int64_t hw, int64_t c) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  using Index = typename Simd<T>::Index;
  constexpr int L = Simd<T>::lanes;
  const V zero = {};
  std::vector<T> m(c);
  std::vector<Index> jmax(c), jmin(c);
  for (int64_t j = 0; j < c; ++j) m[j] = -x_coef[j];
  int64_t image = -1;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t off = p * c, b = p / hw;
    if (b != image) {  // this image's extrema positions, in the lane width of T
      image = b;
      for (int64_t j = 0; j < c; ++j) { jmax[j] = i_max[b * c + j]; jmin[j] = i_min[b * c + j]; }
    }
    const T* a = grad_scale + b * c;
    const T* vx = v_max + b * c;
    const T* vn = v_min + b * c;
    const Index pos = static_cast<Index>(p - b * hw);
    I posv;
    for (int k = 0; k < L; ++k) posv[k] = pos;
    int64_t j = 0;
    for (; j + L <= c; j += L) {
      V v = mul_add(load<V>(x + off + j), load<V>(m.data() + j),
                    mul_add(load<V>(g + off + j), load<V>(a + j), load<V>(shift + j)));
      v = (load<I>(jmax.data() + j) == posv) ? v + load<V>(vx + j) : v;
      v = (load<I>(jmin.data() + j) == posv) ? v + load<V>(vn + j) : v;
      store(out + off + j, v);
    }
    for (; j < c; ++j) {
      T v = mul_add(x[off + j], m[j], mul_add(g[off + j], a[j], shift[j]));
      if (jmax[j] == pos) v += vx[j];
      if (jmin[j] == pos) v += vn[j];
      out[off + j] = v;
    }
  }
}

void bn_input_grad_(at::Tensor& out, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& grad_scale,
                    const at::Tensor& shift, const at::Tensor& x_coef, const at::Tensor& i_max,
                    const at::Tensor& v_max, const at::Tensor& i_min, const at::Tensor& v_min) {
  const char* op = "timm_spe::bn_input_grad_";
  const bool channels_last = channels_last_input(x, op);
  check_like_x(out, x, op, "out");
  check_like_x(grad, x, op, "grad");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  check_vector(grad_scale, n * c, x, op, "grad_scale (N x C)");
  check_vector(shift, c, x, op, "shift (C)");
  check_vector(x_coef, c, x, op, "x_coef (C)");
  check_index(i_max, x, op);
  check_index(i_min, x, op);
  check_vector(v_max, n * c, x, op, "v_max (N x C)");
  check_vector(v_min, n * c, x, op, "v_min (N x C)");
  if (x.numel() == 0) return;
  check_index_range(i_max.data_ptr<int64_t>(), n * c, hw, op);
  check_index_range(i_min.data_ptr<int64_t>(), n * c, hw, op);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "timm_spe_bn_input_grad_", [&] {
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pgs = grad_scale.data_ptr<scalar_t>();
    const scalar_t* p0 = shift.data_ptr<scalar_t>();
    const scalar_t* p1 = x_coef.data_ptr<scalar_t>();
    const scalar_t* pvx = v_max.data_ptr<scalar_t>();
    const scalar_t* pvn = v_min.data_ptr<scalar_t>();
    if (channels_last) {
      const at::Tensor jmax = i_max.to(at::kInt), jmin = i_min.to(at::kInt);  // hw < 2^31 (max_min's check)
      const int32_t* pjx = jmax.data_ptr<int32_t>();
      const int32_t* pjn = jmin.data_ptr<int32_t>();
      for_maps_or_pixels(true, n, c, hw, [&](int64_t b, int64_t e) {
        pixels_bn_input_grad<scalar_t>(po, pg, px, pgs, p0, p1, pjx, pvx, pjn, pvn, b, e, hw, c);
      });
    } else {
      const int64_t* pix = i_max.data_ptr<int64_t>();
      const int64_t* pin = i_min.data_ptr<int64_t>();
      for_maps_or_pixels(false, n, c, hw, [&](int64_t b, int64_t e) {
        rows_bn_input_grad<scalar_t>(po, pg, px, pgs, p0, p1, pix, pvx, pin, pvn, b, e, c, hw);
      });
    }
  });
}

// channels_last: per-(n, c) sums over H x W of grad and of grad * (x - mean[c]) in one read of both, and x at the
// positions i_max / i_min (what the backward needs of x at the extrema, picked up in the same read instead of N x C
// random accesses). NCHW takes BatchNorm's backward kernel on 1 x NC x H x W views instead: see
// timm_spe.cpu_kernels.per_map_sums.
template <typename T>
void channels_last_map_sums(const T* g, const T* x, const T* mean, const int64_t* i_max, const int64_t* i_min,
                            T* sum_g, T* sum_gx, T* x_max, T* x_min, int64_t n, int64_t hw, int64_t c) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  using Index = typename Simd<T>::Index;
  constexpr int L = Simd<T>::lanes;
  T* a = sum_g + n * c;
  T* b = sum_gx + n * c;
  T* xa = x_max + n * c;
  T* xb = x_min + n * c;
  std::fill(a, a + c, T(0));
  std::fill(b, b + c, T(0));
  std::vector<Index> jmax(c), jmin(c);
  for (int64_t j = 0; j < c; ++j) { jmax[j] = i_max[n * c + j]; jmin[j] = i_min[n * c + j]; }
  const int64_t j_vec = c - c % L;
  for (int64_t p = 0; p < hw; ++p) {
    const int64_t off = (n * hw + p) * c;
    I posv;
    for (int k = 0; k < L; ++k) posv[k] = static_cast<Index>(p);
    int64_t j = 0;
    for (; j < j_vec; j += L) {
      const V gv = load<V>(g + off + j), xv = load<V>(x + off + j);
      store(a + j, load<V>(a + j) + gv);
      store(b + j, mul_add(gv, xv - load<V>(mean + j), load<V>(b + j)));
      store(xa + j, (load<I>(jmax.data() + j) == posv) ? xv : load<V>(xa + j));
      store(xb + j, (load<I>(jmin.data() + j) == posv) ? xv : load<V>(xb + j));
    }
    for (; j < c; ++j) {
      a[j] += g[off + j];
      b[j] = mul_add(g[off + j], x[off + j] - mean[j], b[j]);
      if (jmax[j] == p) xa[j] = x[off + j];
      if (jmin[j] == p) xb[j] = x[off + j];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channels_last_per_map_sums(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& i_max,
    const at::Tensor& i_min) {
  const char* op = "timm_spe::channels_last_per_map_sums";
  channels_last_input(x, op);  // 4-D, float32/float64
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": x must be channels_last");
  check_like_x(grad, x, op, "grad");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  check_vector(mean, c, x, op, "mean (C)");
  check_index(i_max, x, op);
  check_index(i_min, x, op);
  check_index_range(i_max.data_ptr<int64_t>(), n * c, hw, op);
  check_index_range(i_min.data_ptr<int64_t>(), n * c, hw, op);
  at::Tensor sum_g = at::empty({n, c}, x.options()), sum_gx = at::empty({n, c}, x.options());
  at::Tensor x_max = at::empty({n, c}, x.options()), x_min = at::empty({n, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "timm_spe_channels_last_per_map_sums", [&] {
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* pm = mean.data_ptr<scalar_t>();
    const int64_t* pix = i_max.data_ptr<int64_t>();
    const int64_t* pin = i_min.data_ptr<int64_t>();
    scalar_t* pa = sum_g.data_ptr<scalar_t>();
    scalar_t* pb = sum_gx.data_ptr<scalar_t>();
    scalar_t* pxa = x_max.data_ptr<scalar_t>();
    scalar_t* pxb = x_min.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        channels_last_map_sums<scalar_t>(pg, px, pm, pix, pin, pa, pb, pxa, pxb, i, hw, c);
    });
  });
  return {sum_g, sum_gx, x_max, x_min};
}

}  // namespace

TORCH_LIBRARY(timm_spe, m) {
  m.def("max_min(Tensor x) -> (Tensor, Tensor)");
  m.def("max_min_with_indices(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_add_relu_(Tensor(a!) x, Tensor shortcut, Tensor gate) -> ()");
  m.def("channels_last_per_map_sums(Tensor grad, Tensor x, Tensor mean, Tensor i_max, Tensor i_min) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_input_grad_(Tensor(a!) out, Tensor grad, Tensor x, Tensor grad_scale, Tensor shift, Tensor x_coef, "
        "Tensor i_max, Tensor v_max, Tensor i_min, Tensor v_min) -> ()");
  m.def("take_at(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_add_at_(Tensor(a!) t, Tensor index, Tensor values) -> ()");
}

TORCH_LIBRARY_IMPL(timm_spe, CPU, m) {
  m.impl("max_min", &max_min);
  m.impl("max_min_with_indices", &max_min_with_indices);
  m.impl("scale_add_relu_", &scale_add_relu_);
  m.impl("bn_input_grad_", &bn_input_grad_);
  m.impl("channels_last_per_map_sums", &channels_last_per_map_sums);
  m.impl("take_at", &take_at);
  m.impl("scatter_add_at_", &scatter_add_at_);
}
