// One-pass per-channel global max and min over H x W, with or without the first indices (see spe_cpu.h).
#include "spe_cpu.h"

namespace timm_spe_cpu {
namespace {

// NCHW: rows [begin, end) of length len. T: storage type; compared in acc_t<T> (exact: 16-bit values are float32's).
template <typename T, bool WithIndex>
void rows_max_min(const T* x, int64_t begin, int64_t end, int64_t len,
                  T* out_max, T* out_min, int64_t* idx_max, int64_t* idx_min) {
  using A = acc_t<T>;
  using S = Simd<A>;
  using V = typename S::V;
  using I = typename S::I;
  constexpr int L = S::lanes;
  I lane;
  for (int k = 0; k < L; ++k) lane[k] = k;
  for (int64_t r = begin; r < end; ++r) {
    const T* p = x + r * len;
    A best_max = loads(p), best_min = best_max;
    int64_t at_max = 0, at_min = 0, i = 1;
    bool nan = std::isnan(best_max);
    if (len >= 2 * L) {
      V mx = loadv(p), mn = mx;
      I ix = lane, in = lane, pos = lane;
      I seen_nan = (mx != mx);
      for (i = L; i + L <= len; i += L) {
        V v = loadv(p + i);
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
      A v = loads(p + i);
      if (v > best_max) { best_max = v; at_max = i; }
      if (v < best_min) { best_min = v; at_min = i; }
      nan |= std::isnan(v);
    }
    if (nan) {
      at_max = at_min = first_nan(p, len, 1);
      best_max = best_min = std::numeric_limits<A>::quiet_NaN();
    }
    stores(out_max + r, best_max);
    stores(out_min + r, best_min);
    if (WithIndex) { idx_max[r] = at_max; idx_min[r] = at_min; }
  }
}

// channels_last, channels [j0, j0 + K * lanes) of one image (hw rows of c values): the running max, min, their first
// rows and a NaN flag per channel in K vectors each, kept in registers over all rows (rows inner: each row's block is
// a contiguous run of K * lanes values), then stored to the per-channel arrays.
template <typename T, bool WithIndex, int K>
inline void channels_last_block(const T* img, int64_t hw, int64_t c, int64_t j0, acc_t<T>* mx_out, acc_t<T>* mn_out,
                                typename Simd<acc_t<T>>::Index* ix_out, typename Simd<acc_t<T>>::Index* in_out,
                                typename Simd<acc_t<T>>::Index* nan_out) {
  using S = Simd<acc_t<T>>;
  using V = typename S::V;
  using I = typename S::I;
  constexpr int L = S::lanes;
  V mx[K], mn[K];
  I ix[K], in[K], nan[K];
  for (int k = 0; k < K; ++k) {
    mx[k] = mn[k] = loadv(img + j0 + k * L);
    ix[k] = in[k] = I{};
    nan[k] = (mx[k] != mx[k]);
  }
  for (int64_t r = 1; r < hw; ++r) {
    const T* row = img + r * c + j0;
    const I pos = I{} + static_cast<typename S::Index>(r);
    for (int k = 0; k < K; ++k) {
      const V v = loadv(row + k * L);
      const I gt = v > mx[k], lt = v < mn[k];
      mx[k] = gt ? v : mx[k];
      mn[k] = lt ? v : mn[k];
      if (WithIndex) { ix[k] = gt ? pos : ix[k]; in[k] = lt ? pos : in[k]; }
      nan[k] |= (v != v);
    }
  }
  for (int k = 0; k < K; ++k) {
    store(mx_out + j0 + k * L, mx[k]);
    store(mn_out + j0 + k * L, mn[k]);
    store(ix_out + j0 + k * L, ix[k]);
    store(in_out + j0 + k * L, in[k]);
    store(nan_out + j0 + k * L, nan[k]);
  }
}

// channels_last: image n is hw rows of c values; per channel the max and min over rows (vectorised over c, blocks of
// 4 vectors, the remaining vectors in one more block of 2 and / or 1, then the last c % lanes channels one by one),
// stored at the end. A later row wins only when strictly better: the first extremum's row, as in the NCHW path.
template <typename T, bool WithIndex>
void channels_last_max_min(const T* x, int64_t n, int64_t hw, int64_t c,
                           T* out_max, T* out_min, int64_t* idx_max, int64_t* idx_min) {
  using A = acc_t<T>;
  using S = Simd<A>;
  using Index = typename S::Index;
  constexpr int L = S::lanes;
  constexpr int K = 4;
  std::vector<Index> ix(c, 0), in(c, 0), nan(c, 0);
  std::vector<A> mx(c), mn(c);
  const T* img = x + n * hw * c;
  int64_t j = channel_blocks<K, L>(c, [&](int64_t j0, auto k) {
    channels_last_block<T, WithIndex, decltype(k)::value>(img, hw, c, j0, mx.data(), mn.data(), ix.data(), in.data(),
                                                          nan.data());
  });
  for (; j < c; ++j) {
    A best_max = loads(img + j), best_min = best_max;
    Index at_max = 0, at_min = 0;
    bool seen_nan = std::isnan(best_max);
    for (int64_t r = 1; r < hw; ++r) {
      const A v = loads(img + r * c + j);
      if (v > best_max) { best_max = v; at_max = static_cast<Index>(r); }
      if (v < best_min) { best_min = v; at_min = static_cast<Index>(r); }
      seen_nan |= std::isnan(v);
    }
    mx[j] = best_max; mn[j] = best_min; ix[j] = at_max; in[j] = at_min; nan[j] = seen_nan ? -1 : 0;
  }
  for (j = 0; j < c; ++j) {
    if (nan[j]) {
      mx[j] = mn[j] = std::numeric_limits<A>::quiet_NaN();
      ix[j] = in[j] = static_cast<Index>(first_nan(img + j, hw, c));
    }
    stores(out_max + n * c + j, mx[j]);
    stores(out_min + n * c + j, mn[j]);
  }
  if (WithIndex) {
    for (j = 0; j < c; ++j) { idx_max[n * c + j] = ix[j]; idx_min[n * c + j] = in[j]; }
  }
}

template <bool WithIndex>
std::vector<at::Tensor> max_min_impl(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "timm_spe::max_min expects an N x C x H x W tensor, got ", x.dim(), " dims");
  TORCH_CHECK(supported_dtype(x.scalar_type()),
              "timm_spe::max_min supports float32, float64, bfloat16 and float16, got ", x.scalar_type());
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
  TIMM_SPE_DISPATCH(x.scalar_type(), "timm_spe_max_min", [&] {
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_min(const at::Tensor& x) {
  auto r = max_min_impl<false>(x);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> max_min_with_indices(const at::Tensor& x) {
  auto r = max_min_impl<true>(x);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace timm_spe_cpu
