// The block tail, the N x C gathers / scatters at the extrema, BatchNorm's input gradient and the channels_last
// per-map sums, each in one pass (see spe_cpu.h).
#include "spe_cpu.h"

namespace timm_spe_cpu {

// relu(x * g + s) into x for n_rows rows of len values, row r scaled by g[r] (NCHW: rows are maps).
template <typename T>
void rows_scale_add_relu(T* x, const T* s, const T* g, int64_t begin, int64_t end, int64_t len) {
  using A = acc_t<T>;
  using V = VecOf<T>;
  constexpr int L = Simd<A>::lanes;
  const V zero = {};
  for (int64_t r = begin; r < end; ++r) {
    T* px = x + r * len;
    const T* ps = s + r * len;
    const A gr = loads(g + r);
    V gv = zero + gr;
    int64_t i = 0;
    for (; i + L <= len; i += L) {
      V v = mul_add(loadv(px + i), gv, loadv(ps + i));
      storev(px + i, (v < zero) ? zero : v);
    }
    for (; i < len; ++i) {
      A v = mul_add(loads(px + i), gr, loads(ps + i));
      stores(px + i, v < A(0) ? A(0) : v);
    }
  }
}

// channels_last: pixels [begin, end) of c values each; pixel p of image p / hw scaled by that image's gate row.
template <typename T>
void pixels_scale_add_relu(T* x, const T* s, const T* g, int64_t begin, int64_t end, int64_t hw, int64_t c) {
  using A = acc_t<T>;
  using V = VecOf<T>;
  constexpr int L = Simd<A>::lanes;
  const V zero = {};
  for (int64_t p = begin; p < end;) {
    const int64_t image = p / hw, stop = std::min(end, (image + 1) * hw);  // one division per image
    const T* pg = g + image * c;
    for (; p < stop; ++p) {
      T* px = x + p * c;
      const T* ps = s + p * c;
      int64_t j = 0;
      for (; j + L <= c; j += L) {
        V v = mul_add(loadv(px + j), loadv(pg + j), loadv(ps + j));
        storev(px + j, (v < zero) ? zero : v);
      }
      for (; j < c; ++j) {
        A v = mul_add(loads(px + j), loads(pg + j), loads(ps + j));
        stores(px + j, v < A(0) ? A(0) : v);
      }
    }
  }
}

void scale_add_relu_(at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& gate) {
  const char* op = "timm_spe::scale_add_relu_";
  const bool channels_last = channels_last_input(x, op);
  check_like_x(shortcut, x, op, "shortcut");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  check_vector(gate, n * c, x, op, "gate (N x C, or N x C x 1 x 1)");
  if (x.numel() == 0) return;
  TIMM_SPE_DISPATCH(x.scalar_type(), "timm_spe_scale_add_relu_", [&] {
    scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t* ps = shortcut.data_ptr<scalar_t>();
    const scalar_t* pg = gate.data_ptr<scalar_t>();
    for_maps_or_pixels(channels_last, n, c, hw, [&](int64_t b, int64_t e) {
      if (channels_last) pixels_scale_add_relu<scalar_t>(px, ps, pg, b, e, hw, c);
      else rows_scale_add_relu<scalar_t>(px, ps, pg, b, e, hw);
    });
  });
}

at::Tensor take_at(const at::Tensor& x, const at::Tensor& index) {
  const char* op = "timm_spe::take_at";
  const bool channels_last = channels_last_input(x, op);
  check_index(index, x, op);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  at::Tensor out = at::empty({n, c}, x.options());
  TIMM_SPE_DISPATCH(x.scalar_type(), "timm_spe_take_at", [&] {
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
  TIMM_SPE_DISPATCH(t.scalar_type(), "timm_spe_scatter_add_at_", [&] {
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
// accesses afterwards). 16-bit x: float32 coefficients, everything in float32 and one rounding per element, the
// additions at the extrema included.
template <typename T>
void rows_bn_input_grad(T* out, const T* g, const T* x, const acc_t<T>* grad_scale, const acc_t<T>* shift,
                        const acc_t<T>* x_coef, const int64_t* i_max, const acc_t<T>* v_max, const int64_t* i_min,
                        const acc_t<T>* v_min, int64_t begin, int64_t end, int64_t c, int64_t len) {
  using A = acc_t<T>;
  using V = VecOf<T>;
  constexpr int L = Simd<A>::lanes;
  const V zero = {};
  for (int64_t r = begin; r < end; ++r) {
    const int64_t ch = r % c, off = r * len;
    const A a = grad_scale[r], b = shift[ch], m = -x_coef[ch];
    const V av = zero + a, bv = zero + b, mv = zero + m;
    const int64_t at_max = i_max[r], at_min = i_min[r];
    A out_max = 0, out_min = 0;
    if constexpr (is_16bit<T>) {  // the extrema's values before the pass (which may overwrite g or x in place)
      auto value = [&](int64_t i) { return mul_add(loads(x + off + i), m, mul_add(loads(g + off + i), a, b)); };
      out_max = value(at_max) + v_max[r];
      out_min = (at_min == at_max ? out_max : value(at_min)) + v_min[r];
    }
    int64_t i = 0;
    for (; i + L <= len; i += L)
      storev(out + off + i, mul_add(loadv(x + off + i), mv, mul_add(loadv(g + off + i), av, bv)));
    for (; i < len; ++i) stores(out + off + i, mul_add(loads(x + off + i), m, mul_add(loads(g + off + i), a, b)));
    if constexpr (is_16bit<T>) {
      stores(out + off + at_max, out_max);
      stores(out + off + at_min, out_min);  // the sum of both where they coincide
    } else {
      out[off + at_max] += v_max[r];
      out[off + at_min] += v_min[r];
    }
  }
}

// channels_last: the pass without the extrema, then per image the (at most 2 x C) outputs at the extrema written again
// with their pooling gradients added: the same float arithmetic, in the same order, as adding them in the pass (for
// 16-bit T one rounding, of the whole sum). Their g and x are read after the image's pass, while still in cache, or
// before it where out is g or x (`aliased`: the pass overwrites them).
template <typename T>
void pixels_bn_input_grad(T* out, const T* g, const T* x, const acc_t<T>* grad_scale, const acc_t<T>* shift,
                          const acc_t<T>* x_coef, const int64_t* i_max, const acc_t<T>* v_max, const int64_t* i_min,
                          const acc_t<T>* v_min, int64_t begin, int64_t end, int64_t hw, int64_t c, bool aliased) {
  using A = acc_t<T>;
  using V = VecOf<T>;
  constexpr int L = Simd<A>::lanes;
  std::vector<A> m(c), fix_value(2 * c);
  std::vector<int64_t> fix_at(2 * c), fix_channel(2 * c);
  std::vector<int8_t> fix_kind(2 * c);  // 1: the max's position, 2: the min's, 3: both
  for (int64_t j = 0; j < c; ++j) m[j] = -x_coef[j];
  for (int64_t p = begin; p < end;) {
    const int64_t b = p / hw, stop = std::min(end, (b + 1) * hw);  // image b: one division per image
    const A* a = grad_scale + b * c;
    auto value = [&](int64_t off, int64_t j) {
      return mul_add(loads(x + off), m[j], mul_add(loads(g + off), a[j], shift[j]));
    };
    int64_t fixes = 0;  // this image's extrema in [p, stop)
    for (int64_t j = 0; j < c; ++j) {
      const int64_t at_max = b * hw + i_max[b * c + j], at_min = b * hw + i_min[b * c + j];
      if (at_max >= p && at_max < stop) {
        fix_at[fixes] = at_max * c + j;
        fix_channel[fixes] = j;
        fix_kind[fixes++] = at_min == at_max ? 3 : 1;
      }
      if (at_min != at_max && at_min >= p && at_min < stop) {
        fix_at[fixes] = at_min * c + j;
        fix_channel[fixes] = j;
        fix_kind[fixes++] = 2;
      }
    }
    auto fixed = [&](int64_t f) {
      const int64_t j = fix_channel[f];
      A v = value(fix_at[f], j);
      if (fix_kind[f] & 1) v += v_max[b * c + j];
      if (fix_kind[f] & 2) v += v_min[b * c + j];
      return v;
    };
    if (aliased) for (int64_t f = 0; f < fixes; ++f) fix_value[f] = fixed(f);
    for (; p < stop; ++p) {
      const int64_t off = p * c;
      int64_t j = 0;
      for (; j + L <= c; j += L)
        storev(out + off + j, mul_add(loadv(x + off + j), load<V>(m.data() + j),
                                      mul_add(loadv(g + off + j), load<V>(a + j), load<V>(shift + j))));
      for (; j < c; ++j) stores(out + off + j, value(off + j, j));
    }
    for (int64_t f = 0; f < fixes; ++f) stores(out + fix_at[f], aliased ? fix_value[f] : fixed(f));
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
  check_coef(grad_scale, n * c, x, op, "grad_scale (N x C)");
  check_coef(shift, c, x, op, "shift (C)");
  check_coef(x_coef, c, x, op, "x_coef (C)");
  check_index(i_max, x, op);
  check_index(i_min, x, op);
  check_coef(v_max, n * c, x, op, "v_max (N x C)");
  check_coef(v_min, n * c, x, op, "v_min (N x C)");
  if (x.numel() == 0) return;
  check_index_range(i_max.data_ptr<int64_t>(), n * c, hw, op);
  check_index_range(i_min.data_ptr<int64_t>(), n * c, hw, op);
  TIMM_SPE_DISPATCH(x.scalar_type(), "timm_spe_bn_input_grad_", [&] {
    using A = acc_t<scalar_t>;
    scalar_t* po = out.data_ptr<scalar_t>();
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const A* pgs = grad_scale.data_ptr<A>();
    const A* p0 = shift.data_ptr<A>();
    const A* p1 = x_coef.data_ptr<A>();
    const A* pvx = v_max.data_ptr<A>();
    const A* pvn = v_min.data_ptr<A>();
    const int64_t* pix = i_max.data_ptr<int64_t>();
    const int64_t* pin = i_min.data_ptr<int64_t>();
    const bool aliased = at::get_overlap_status(out, grad) != at::MemOverlapStatus::No
        || at::get_overlap_status(out, x) != at::MemOverlapStatus::No;
    for_maps_or_pixels(channels_last, n, c, hw, [&](int64_t b, int64_t e) {
      if (channels_last)
        pixels_bn_input_grad<scalar_t>(po, pg, px, pgs, p0, p1, pix, pvx, pin, pvn, b, e, hw, c, aliased);
      else
        rows_bn_input_grad<scalar_t>(po, pg, px, pgs, p0, p1, pix, pvx, pin, pvn, b, e, c, hw);
    });
  });
}

// channels_last: per-(n, c) sums over H x W of grad and of grad * (x - mean[c]) in one read of both, and x at the
// positions i_max / i_min (what the backward needs of x at the extrema; N x C loads, after each image's sums, while it
// is still in cache). NCHW takes BatchNorm's backward kernel on 1 x NC x H x W views instead: see
// timm_spe.cpu_kernels.per_map_sums. 16-bit input: float32 mean and sums (accumulated in float32).
//
// Channels [j0, j0 + K * lanes) of image n: both sums in K vectors each, kept in registers over all hw rows (each
// row's block a contiguous run), then stored; each channel summed in row order, as one channel at a time would be.
template <typename T, int K>
inline void map_sums_block(const T* g, const T* x, const acc_t<T>* mean, acc_t<T>* a, acc_t<T>* b, int64_t n,
                           int64_t hw, int64_t c, int64_t j0) {
  using V = VecOf<T>;
  constexpr int L = Simd<acc_t<T>>::lanes;
  V sa[K], sb[K];
  for (int k = 0; k < K; ++k) sa[k] = sb[k] = V{};
  for (int64_t p = 0; p < hw; ++p) {
    const int64_t off = (n * hw + p) * c + j0;
    for (int k = 0; k < K; ++k) {
      const V gv = loadv(g + off + k * L), xv = loadv(x + off + k * L);
      sa[k] = sa[k] + gv;
      sb[k] = mul_add(gv, xv - load<V>(mean + j0 + k * L), sb[k]);
    }
  }
  for (int k = 0; k < K; ++k) {
    store(a + j0 + k * L, sa[k]);
    store(b + j0 + k * L, sb[k]);
  }
}

// Image n: the sums in blocks of 8 vectors (128 float32 channels with AVX-512, 64 without: whole rows of the usual
// maps; 16 accumulators, in registers with AVX-512's 32), the remaining vectors in one more block (4, 2, 1), then the
// last c % lanes channels one at a time; then x at the extrema, 2 x C loads (exact in T).
template <typename T>
void channels_last_map_sums(const T* g, const T* x, const acc_t<T>* mean, const int64_t* i_max, const int64_t* i_min,
                            acc_t<T>* sum_g, acc_t<T>* sum_gx, T* x_max, T* x_min, int64_t n, int64_t hw, int64_t c) {
  using A = acc_t<T>;
  constexpr int L = Simd<A>::lanes;
  constexpr int K = 8;
  A* a = sum_g + n * c;
  A* b = sum_gx + n * c;
  int64_t j = channel_blocks<K, L>(c, [&](int64_t j0, auto k) {
    map_sums_block<T, decltype(k)::value>(g, x, mean, a, b, n, hw, c, j0);
  });
  for (; j < c; ++j) {
    A sa = A(0), sb = A(0);
    for (int64_t p = 0; p < hw; ++p) {
      const int64_t off = (n * hw + p) * c + j;
      const A gs = loads(g + off), xs = loads(x + off);
      sa += gs;
      sb = mul_add(gs, xs - mean[j], sb);
    }
    a[j] = sa;
    b[j] = sb;
  }
  for (j = 0; j < c; ++j) {
    x_max[n * c + j] = x[(n * hw + i_max[n * c + j]) * c + j];
    x_min[n * c + j] = x[(n * hw + i_min[n * c + j]) * c + j];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> channels_last_per_map_sums(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& i_max,
    const at::Tensor& i_min) {
  const char* op = "timm_spe::channels_last_per_map_sums";
  channels_last_input(x, op);  // 4-D, a supported dtype
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": x must be channels_last");
  check_like_x(grad, x, op, "grad");
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  check_coef(mean, c, x, op, "mean (C)");
  check_index(i_max, x, op);
  check_index(i_min, x, op);
  check_index_range(i_max.data_ptr<int64_t>(), n * c, hw, op);
  check_index_range(i_min.data_ptr<int64_t>(), n * c, hw, op);
  const auto acc_options = x.options().dtype(acc_type(x));
  at::Tensor sum_g = at::empty({n, c}, acc_options), sum_gx = at::empty({n, c}, acc_options);
  at::Tensor x_max = at::empty({n, c}, x.options()), x_min = at::empty({n, c}, x.options());
  TIMM_SPE_DISPATCH(x.scalar_type(), "timm_spe_channels_last_per_map_sums", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pg = grad.data_ptr<scalar_t>();
    const scalar_t* px = x.data_ptr<scalar_t>();
    const A* pm = mean.data_ptr<A>();
    const int64_t* pix = i_max.data_ptr<int64_t>();
    const int64_t* pin = i_min.data_ptr<int64_t>();
    A* pa = sum_g.data_ptr<A>();
    A* pb = sum_gx.data_ptr<A>();
    scalar_t* pxa = x_max.data_ptr<scalar_t>();
    scalar_t* pxb = x_min.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        channels_last_map_sums<scalar_t>(pg, px, pm, pix, pin, pa, pb, pxa, pxb, i, hw, c);
    });
  });
  return {sum_g, sum_gx, x_max, x_min};
}

}  // namespace timm_spe_cpu
