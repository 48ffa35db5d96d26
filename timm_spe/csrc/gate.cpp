// SPE's N x C gate math, one op each way: the forward gate (spe_gate) and the N x C part of the fused block's backward
// (block_backward_coefficients). Eager, each is a chain of ~20 (forward) or ~100 (backward) ops on N x C tensors whose
// dispatch costs more than their arithmetic (see spe_cpu.h).
#include "spe_cpu.h"

namespace timm_spe_cpu {

// Eq. 3 as timm_spe.spe_math.mix_weights computes it: lam = (p^2 + tiny) / (sum(p^2) + 2 tiny), each op rounded in
// p's dtype (float32 / float64), tiny float32's smallest normal number.
at::Tensor mix_weights(const at::Tensor& p) {
  TORCH_CHECK(p.numel() == 2 && p.is_contiguous() && p.device().is_cpu() &&
              (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble),
              "timm_spe::mix_weights: p must be a contiguous 2-element CPU float32 / float64 tensor");
  at::Tensor lam = at::empty({2}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "timm_spe_mix_weights", [&] {
    const scalar_t tiny = static_cast<scalar_t>(1.1754943508222875e-38);
    const scalar_t two_tiny = static_cast<scalar_t>(2 * 1.1754943508222875e-38);
    const scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t s0 = pp[0] * pp[0], s1 = pp[1] * pp[1];
    const scalar_t denominator = (s0 + s1) + two_tiny;
    lam.data_ptr<scalar_t>()[0] = (s0 + tiny) / denominator;
    lam.data_ptr<scalar_t>()[1] = (s1 + tiny) / denominator;
  });
  return lam;
}

// v rounded to T and back (16-bit T; the identity for float / double).
template <typename T> inline acc_t<T> round_to(acc_t<T> v) { return static_cast<acc_t<T>>(static_cast<T>(v)); }
template <typename T> inline VecOf<T> round_to(VecOf<T> v) {
  if constexpr (is_16bit<T>) {
    T tmp[Simd<acc_t<T>>::lanes];
    storev(tmp, v);
    return loadv(tmp);
  } else {
    return v;
  }
}

// The sigmoids' arguments of one pool pair (scalar or vector V of A): z_rew (v_rew = sigmoid(z_rew)) and z_exc. l0, l1
// are lam; l0_low, l1_low lam rounded to T (the paper form's u is an op on the 16-bit pools, see spe_gate).
template <typename T, typename V, typename A>
inline void gate_arguments(V fmax, V fmin, V we, V be, V wr, V br, A l0, A l1, A l0_low, A l1_low, bool paper,
                           V& z_rew, V& z_exc) {
  V u;
  if (paper) {
    z_rew = mul_add(wr, round_to<T>(fmax + fmin), br);  // addcmul(b_rew, w_rew, f_max + f_min)
    u = round_to<T>(round_to<T>(l0_low * fmax) + round_to<T>(l1_low * fmin));
  } else {
    const V m_max = mul_add(wr, fmax, br), m_min = mul_add(wr, fmin, br);
    z_rew = m_max + m_min;
    u = l0 * m_max + l1 * m_min;
  }
  z_exc = mul_add(we, u, be);  // addcmul(b_exc, w_exc, u)
}

// The gate v_exc * v_rew of timm_spe.spe_math.spe_gate from N x C pools, then rounded to the pools' dtype (what the
// layer scales its input by), with eager's results bit for bit: every multiply, add and addcmul rounded as PyTorch's CPU
// ops round them (addcmul as one fused multiply-add where the CPU has FMA, see mul_add; -ffp-contract=off keeps the
// rest apart), in the dtypes eager computes them in: float32 under autocast (16-bit pools, float32 parameters), except
// the paper form's f_max + f_min and lam * f, which eager computes on the 16-bit pools (lam rounded to their dtype, each
// result rounded); and the two sigmoids are PyTorch's own (at::sigmoid_ on N x C tensors laid out as eager's, so that
// the same elements take the same vectorised or scalar exp). Float32 / float64 pools take parameters of their dtype.
// Vectorised along C; the arithmetic is per element, so the same either way.
at::Tensor spe_gate(const at::Tensor& f_max, const at::Tensor& f_min, const at::Tensor& lam, const at::Tensor& w_exc,
                    const at::Tensor& b_exc, const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper) {
  const char* op = "timm_spe::spe_gate";
  TORCH_CHECK(f_max.dim() == 2 && f_max.is_contiguous() && f_max.device().is_cpu() && supported_dtype(f_max.scalar_type()),
              op, ": f_max must be a contiguous N x C CPU float32 / float64 / bfloat16 / float16 tensor");
  check_like_x(f_min, f_max, op, "f_min");
  const int64_t n = f_max.size(0), c = f_max.size(1);
  check_coef(lam, 2, f_max, op, "lam (2)");
  check_coef(w_exc, c, f_max, op, "w_exc (C)");
  check_coef(b_exc, c, f_max, op, "b_exc (C)");
  check_coef(w_rew, c, f_max, op, "w_rew (C)");
  check_coef(b_rew, c, f_max, op, "b_rew (C)");
  const auto acc_opts = f_max.options().dtype(acc_type(f_max));
  at::Tensor z_exc = at::empty({n, c}, acc_opts), z_rew = at::empty({n, c}, acc_opts);
  at::Tensor gate = at::empty({n, c}, f_max.options());
  TIMM_SPE_DISPATCH(f_max.scalar_type(), "timm_spe_spe_gate", [&] {
    using A = acc_t<scalar_t>;
    using V = VecOf<scalar_t>;
    constexpr int L = Simd<A>::lanes;
    const scalar_t* fa = f_max.data_ptr<scalar_t>();
    const scalar_t* fb = f_min.data_ptr<scalar_t>();
    const A *we = w_exc.data_ptr<A>(), *be = b_exc.data_ptr<A>();
    const A *wr = w_rew.data_ptr<A>(), *br = b_rew.data_ptr<A>();
    A *ze = z_exc.data_ptr<A>(), *zr = z_rew.data_ptr<A>();
    const A l0 = lam.data_ptr<A>()[0], l1 = lam.data_ptr<A>()[1];
    const A l0_low = round_to<scalar_t>(l0), l1_low = round_to<scalar_t>(l1);
    const V zero = {};
    for (int64_t b = 0; b < n; ++b) {
      const int64_t row = b * c;
      int64_t ch = 0;
      for (; ch + L <= c; ch += L) {
        V z_r, z_e;
        gate_arguments<scalar_t>(loadv(fa + row + ch), loadv(fb + row + ch), load<V>(we + ch), load<V>(be + ch),
                                 load<V>(wr + ch), load<V>(br + ch), zero + l0, zero + l1, zero + l0_low,
                                 zero + l1_low, paper, z_r, z_e);
        store(zr + row + ch, z_r);
        store(ze + row + ch, z_e);
      }
      for (; ch < c; ++ch) {
        gate_arguments<scalar_t>(loads(fa + row + ch), loads(fb + row + ch), we[ch], be[ch], wr[ch], br[ch], l0, l1,
                                 l0_low, l1_low, paper, zr[row + ch], ze[row + ch]);
      }
    }
  });
  at::sigmoid_(z_rew);
  at::sigmoid_(z_exc);
  TIMM_SPE_DISPATCH(f_max.scalar_type(), "timm_spe_spe_gate_out", [&] {
    using A = acc_t<scalar_t>;
    using V = VecOf<scalar_t>;
    constexpr int L = Simd<A>::lanes;
    const A *ve = z_exc.data_ptr<A>(), *vr = z_rew.data_ptr<A>();
    scalar_t* out = gate.data_ptr<scalar_t>();
    int64_t r = 0;
    for (; r + L <= n * c; r += L) storev(out + r, load<V>(ve + r) * load<V>(vr + r));
    for (; r < n * c; ++r) stores(out + r, ve[r] * vr[r]);
  });
  return gate;
}

// The gate straight from a block output x (N x C x H x W, NCHW or channels_last) and p: max_min, mix_weights and
// spe_gate in one call (one dispatch instead of a dozen Python-level ones per layer in inference).
at::Tensor spe_gate_of(const at::Tensor& x, const at::Tensor& p, const at::Tensor& w_exc, const at::Tensor& b_exc,
                       const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper) {
  auto pools = max_min(x);
  return spe_gate(std::get<0>(pools), std::get<1>(pools), mix_weights(p), w_exc, b_exc, w_rew, b_rew, paper);
}

// Inference tail of a block with SPE: relu(x * gate(x) + shortcut) written into x (spe_gate_of, then scale_add_relu_).
void spe_add_relu_(at::Tensor& x, const at::Tensor& shortcut, const at::Tensor& p, const at::Tensor& w_exc,
                   const at::Tensor& b_exc, const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper) {
  at::Tensor gate = spe_gate_of(x, p, w_exc, b_exc, w_rew, b_rew, paper);
  scale_add_relu_(x, shortcut, gate.view({x.size(0), x.size(1), 1, 1}));
}

// The N x C part of the fused block backward (timm_spe.spe_me._BatchNormSpeAddReLU.backward) in one op, for 16-bit
// activations under autocast: the gate's gradient from the per-map sums, its closed-form vector-Jacobian product
// (spe_me._spe_gate_backward; sigmoid recomputed with std::exp), and BN's backward coefficients. Eager, that is ~100
// small ops per block whose dispatch costs more than their arithmetic. Per-channel sums over N are accumulated in
// double. Returns grad_scale (N x C), sum_term (C), x_coef (C), v_max, v_min (N x C): the arguments of
// timm_spe.cpu_kernels.bn_input_grad_; then
// BN's weight and bias gradients (C) and the gradients of lam (2), w_exc, b_exc, w_rew, b_rew (C each).
std::vector<at::Tensor> block_backward_coefficients(
    const at::Tensor& sum_grad, const at::Tensor& sum_grad_xhat, const at::Tensor& x_max, const at::Tensor& x_min,
    const at::Tensor& f_max, const at::Tensor& f_min, const at::Tensor& gate, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& bn_weight, const at::Tensor& bn_bias, const at::Tensor& lam,
    const at::Tensor& w_exc, const at::Tensor& b_exc, const at::Tensor& w_rew, const at::Tensor& b_rew, bool paper,
    int64_t count) {
  const char* op = "timm_spe::block_backward_coefficients";
  TORCH_CHECK(sum_grad.dim() == 2, op, ": sum_grad must be N x C");
  const int64_t n = sum_grad.size(0), c = sum_grad.size(1);
  for (const at::Tensor* t : {&sum_grad, &sum_grad_xhat})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n * c, op,
                ": the per-map sums must be contiguous float32 N x C tensors");
  const auto low = x_max.scalar_type();
  TORCH_CHECK(low == at::kBFloat16 || low == at::kHalf, op, " takes bfloat16 / float16 pools, got ", low);
  for (const at::Tensor* t : {&x_max, &x_min, &f_max, &f_min, &gate})
    TORCH_CHECK(t->scalar_type() == low && t->is_contiguous() && t->numel() == n * c, op,
                ": pools, x at the extrema and the gate must be contiguous N x C tensors of one 16-bit dtype");
  for (const at::Tensor* t : {&mean, &invstd, &bn_weight, &bn_bias, &w_exc, &b_exc, &w_rew, &b_rew})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == c, op,
                ": per-channel tensors must be contiguous float32 of C values");
  TORCH_CHECK(lam.scalar_type() == at::kFloat && lam.numel() == 2, op, ": lam must be 2 float32 values");
  TORCH_CHECK(count > 0, op, ": count must be positive");
  const at::Tensor lam_c = lam.contiguous();
  const auto f32 = sum_grad.options();
  at::Tensor grad_scale = at::empty({n, c}, f32), v_max = at::empty({n, c}, f32), v_min = at::empty({n, c}, f32);
  at::Tensor sum_term = at::empty({c}, f32), x_coef = at::empty({c}, f32), g_bn_w = at::empty({c}, f32);
  at::Tensor g_bn_b = at::empty({c}, f32), g_w_exc = at::empty({c}, f32), g_b_exc = at::empty({c}, f32);
  at::Tensor g_w_rew = at::empty({c}, f32), g_b_rew = at::empty({c}, f32);
  std::vector<double> lam_max(c), lam_min(c);  // per-channel parts of lam's gradient, summed in channel order
  const float l0 = lam_c.data_ptr<float>()[0], l1 = lam_c.data_ptr<float>()[1];
  AT_DISPATCH_REDUCED_FLOATING_TYPES(low, "timm_spe_block_backward_coefficients", [&] {
    const float* s1 = sum_grad.data_ptr<float>();
    const float* s2 = sum_grad_xhat.data_ptr<float>();
    const scalar_t* xa = x_max.data_ptr<scalar_t>();
    const scalar_t* xb = x_min.data_ptr<scalar_t>();
    const scalar_t* fa = f_max.data_ptr<scalar_t>();
    const scalar_t* fb = f_min.data_ptr<scalar_t>();
    const scalar_t* gt = gate.data_ptr<scalar_t>();
    const float *pm = mean.data_ptr<float>(), *pi = invstd.data_ptr<float>();
    const float *bw = bn_weight.data_ptr<float>(), *bb = bn_bias.data_ptr<float>();
    const float *we = w_exc.data_ptr<float>(), *be = b_exc.data_ptr<float>();
    const float *wr = w_rew.data_ptr<float>(), *br = b_rew.data_ptr<float>();
    float *o_gs = grad_scale.data_ptr<float>(), *o_vx = v_max.data_ptr<float>(), *o_vn = v_min.data_ptr<float>();
    float *o_sum_term = sum_term.data_ptr<float>(), *o_coef = x_coef.data_ptr<float>();
    float *o_bw = g_bn_w.data_ptr<float>(), *o_bb = g_bn_b.data_ptr<float>();
    float *o_we = g_w_exc.data_ptr<float>(), *o_be = g_b_exc.data_ptr<float>();
    float *o_wr = g_w_rew.data_ptr<float>(), *o_br = g_b_rew.data_ptr<float>();
    auto sigmoid = [](float z) { return 1.f / (1.f + std::exp(-z)); };
    at::parallel_for(0, c, 16, [&](int64_t begin, int64_t end) {
      for (int64_t ch = begin; ch < end; ++ch) {
        const float scale = bw[ch] * pi[ch];
        double dy = 0, dy_xhat = 0, wexc = 0, bexc = 0, wrew = 0, brew = 0, lmax = 0, lmin = 0;
        for (int64_t b = 0; b < n; ++b) {
          const int64_t r = b * c + ch;
          const float fmax = static_cast<float>(fa[r]), fmin = static_cast<float>(fb[r]);
          const float g = static_cast<float>(gt[r]);
          // the paper's f_max + f_min is an op on two 16-bit tensors: rounded to their dtype, as eager (and the forward)
          // has it
          const float f_sum = static_cast<float>(static_cast<scalar_t>(fmax + fmin));
          const float grad_gate = bw[ch] * s2[r] + bb[ch] * s1[r];
          float m_max, m_min, v_rew;
          if (paper) {
            m_max = fmax;
            m_min = fmin;
            v_rew = sigmoid(wr[ch] * f_sum + br[ch]);
          } else {
            m_max = wr[ch] * fmax + br[ch];
            m_min = wr[ch] * fmin + br[ch];
            v_rew = sigmoid(m_max + m_min);
          }
          // u = lam[0] * m_max + lam[1] * m_min: in the paper's form m_max, m_min are the 16-bit pools, so (a 0-dim lam
          // does not promote them) eager computes u in their dtype: lam rounded to it, each product and the sum rounded
          auto round16 = [](float v) { return static_cast<float>(static_cast<scalar_t>(v)); };
          const float u = paper ? round16(round16(round16(l0) * m_max) + round16(round16(l1) * m_min))
                                : l0 * m_max + l1 * m_min;
          const float v_exc = sigmoid(we[ch] * u + be[ch]);
          const float d_exc = grad_gate * v_rew * v_exc * (1.f - v_exc);
          const float d_rew = grad_gate * v_exc * v_rew * (1.f - v_rew);
          const float d_u = d_exc * we[ch];
          wexc += double(d_exc) * u;
          bexc += d_exc;
          lmax += double(d_u) * m_max;
          lmin += double(d_u) * m_min;
          float g_max, g_min;
          if (paper) {
            const float d_pooled = d_rew * wr[ch];
            g_max = d_u * l0 + d_pooled;
            g_min = d_u * l1 + d_pooled;
            wrew += double(d_rew) * f_sum;
            brew += d_rew;
          } else {
            const float d_max = d_u * l0 + d_rew, d_min = d_u * l1 + d_rew;
            g_max = d_max * wr[ch];
            g_min = d_min * wr[ch];
            wrew += double(d_max) * fmax + double(d_min) * fmin;
            brew += double(d_max) + d_min;
          }
          const float xhat_max = (static_cast<float>(xa[r]) - pm[ch]) * pi[ch];
          const float xhat_min = (static_cast<float>(xb[r]) - pm[ch]) * pi[ch];
          dy += double(g) * s1[r] + g_max + g_min;
          dy_xhat += double(g) * s2[r] + double(g_max) * xhat_max + double(g_min) * xhat_min;
          o_gs[r] = scale * g;
          o_vx[r] = scale * g_max;
          o_vn[r] = scale * g_min;
        }
        const float coef = static_cast<float>(double(scale) * pi[ch] * dy_xhat / count);
        o_coef[ch] = coef;
        o_sum_term[ch] = static_cast<float>(double(scale) * dy / count);
        o_bw[ch] = static_cast<float>(dy_xhat);
        o_bb[ch] = static_cast<float>(dy);
        o_we[ch] = static_cast<float>(wexc);
        o_be[ch] = static_cast<float>(bexc);
        o_wr[ch] = static_cast<float>(wrew);
        o_br[ch] = static_cast<float>(brew);
        lam_max[ch] = lmax;
        lam_min[ch] = lmin;
      }
    });
  });
  double lmax = 0, lmin = 0;
  for (int64_t ch = 0; ch < c; ++ch) { lmax += lam_max[ch]; lmin += lam_min[ch]; }
  at::Tensor g_lam = at::empty({2}, f32);
  g_lam.data_ptr<float>()[0] = static_cast<float>(lmax);
  g_lam.data_ptr<float>()[1] = static_cast<float>(lmin);
  return {grad_scale, sum_term, x_coef, v_max, v_min, g_bn_w, g_bn_b, g_lam, g_w_exc, g_b_exc, g_w_rew, g_b_rew};
}

}  // namespace timm_spe_cpu
