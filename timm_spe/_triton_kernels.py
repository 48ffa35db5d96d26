""" SPE's training passes as Triton kernels: the CUDA path's launches, one per pass over the data

On a GPU every ATen op is a kernel launch, and SPE's N x C gate math in stock ops is ~150 tiny launches per block
(``benchmarks/count_ops.py``). Here each pass is one kernel (launched by :mod:`timm_spe._triton_ops`):

* ``_tail_kernel`` (forward): per (n, c) the max / min over H x W and their first indices, the gate from them and ``p``
  (Eq. 3 inside), and ``relu(y * gate + shortcut)`` written over ``y`` (the layer alone: ``x * gate``, a new tensor);
* ``_sums_kernel`` (backward): the gradient through the block's ReLU, written out (it is the shortcut's), and from it
  per (n, c) ``sum_hw(g)``, ``sum_hw(g * (x - mean))`` and ``x`` at the extrema (the layer alone: ``_dot_kernel``,
  ``sum_hw(g * x)``);
* ``_gate_backward_kernel``: the gate's closed-form backward, the per-channel parameter gradients and, behind BN, BN's
  ``sum(dy)``, ``sum(dy * xhat)``, per channel block;
* ``_input_grad_kernel``: BN's input gradient in one pass, the pooling gradients added at the extrema (the layer
  alone: ``g * gate`` plus them); its first program also computes the gradient of ``p`` through Eq. 3, with the
  Eq. 8 penalty's where it is switched on (``_mix_backward_kernel`` does only that, where no input gradient is needed).

The N x C results travel stacked, one tensor each: ``stats`` (3 x N x C, the activations' dtype: max, min, gate),
``idx`` (2 x N x C, int64: the indices of the max and the min), ``sums`` (4 x N x C, float32: ``sum_hw(g)``,
``sum_hw(g * (x - mean))``, ``x`` at the max, at the min) and ``vv`` (float32, ``2 N C + 2 * programs``: the pooling
gradients at the max and the min, then the partial gradients of ``(lambda, 1 - lambda)`` per channel block).
Activations are addressed as ``n * s_n + c * s_c + hw * s_hw`` (NCHW-contiguous or channels_last); an incoming
gradient by its own three strides.

The math is :mod:`timm_spe.spe_math`'s (the tests compare against the stock functions with ``TRITON_INTERPRET=1`` on
the CPU); float32 accumulation throughout, so results agree with the stock ops to rounding, not bit for bit. Imported
with :mod:`timm_spe._triton_ops`: Triton fixes the interpreter-or-compiler choice when ``triton.language`` is imported,
so a process with ``TRITON_INTERPRET=1`` set before torch is imported runs them on CPU tensors. The autograd functions
are in :mod:`timm_spe.spe_triton`.
"""
import triton
import triton.language as tl


@triton.jit
def _rounded(v, ptr):
    """float32 ``v`` in ``ptr``'s element type, rounded to nearest even. bfloat16 by its bits: the interpreter's cast
    truncates (on the GPU the cast rounds to nearest even, as this does)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _gate(f_max, f_min, lam0, lam1, w_exc, b_exc, w_rew, b_rew, PAPER: tl.constexpr):
    """``(m_max, m_min, u, v_exc, v_rew)`` of spe_math.gate_terms, float32."""
    if PAPER:
        m_max = f_max
        m_min = f_min
        v_rew = tl.sigmoid(b_rew + w_rew * (f_max + f_min))
    else:
        m_max = b_rew + w_rew * f_max
        m_min = b_rew + w_rew * f_min
        v_rew = tl.sigmoid(m_max + m_min)
    u = lam0 * m_max + lam1 * m_min
    v_exc = tl.sigmoid(b_exc + w_exc * u)
    return m_max, m_min, u, v_exc, v_rew


@triton.jit
def _lam(p_ptr):
    p0 = tl.load(p_ptr).to(tl.float32)
    p1 = tl.load(p_ptr + 1).to(tl.float32)
    q0 = p0 * p0
    q1 = p1 * p1
    den = (q0 + q1) + 2 * 1.1754943508222875e-38
    return (q0 + 1.1754943508222875e-38) / den, (q1 + 1.1754943508222875e-38) / den


@triton.jit
def _tail_kernel(y_ptr, s_ptr, out_ptr, p_ptr, w_exc_ptr, b_exc_ptr, w_rew_ptr, b_rew_ptr, stats_ptr, idx_ptr,
                 C, HW, NC, s_n, s_c, s_hw,
                 PAPER: tl.constexpr, TAIL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Pools, gate and ``out = y * gate``; with ``TAIL``, ``out = relu(y * gate + shortcut)``."""
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n * s_n + c * s_c
    run_max = tl.full([BLOCK_C], float('-inf'), tl.float32)
    run_min = tl.full([BLOCK_C], float('inf'), tl.float32)
    i_max = tl.zeros([BLOCK_C], tl.int32)
    i_min = tl.zeros([BLOCK_C], tl.int32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        v = tl.load(y_ptr + base[:, None] + hw[None, :] * s_hw, mask=ok, other=0.).to(tl.float32)
        m, im = tl.max(tl.where(ok, v, float('-inf')), axis=1, return_indices=True)
        k, ik = tl.min(tl.where(ok, v, float('inf')), axis=1, return_indices=True)
        i_max = tl.where(m > run_max, start + im, i_max)  # strict: the first extremum wins
        run_max = tl.maximum(m, run_max)
        i_min = tl.where(k < run_min, start + ik, i_min)
        run_min = tl.minimum(k, run_min)
    run_max = tl.where(c_ok, run_max, 0.)  # no infinities in the gate math of the masked lanes
    run_min = tl.where(c_ok, run_min, 0.)
    lam0, lam1 = _lam(p_ptr)
    _, _, _, v_exc, v_rew = _gate(
        run_max, run_min, lam0, lam1, tl.load(w_exc_ptr + c, mask=c_ok, other=0.),
        tl.load(b_exc_ptr + c, mask=c_ok, other=0.), tl.load(w_rew_ptr + c, mask=c_ok, other=0.),
        tl.load(b_rew_ptr + c, mask=c_ok, other=0.), PAPER)
    nc = n * C + c
    tl.store(stats_ptr + nc, _rounded(run_max, stats_ptr), mask=c_ok)  # exact: a stored value
    tl.store(stats_ptr + NC + nc, _rounded(run_min, stats_ptr), mask=c_ok)
    tl.store(idx_ptr + nc, i_max.to(tl.int64), mask=c_ok)
    tl.store(idx_ptr + NC + nc, i_min.to(tl.int64), mask=c_ok)
    gate = _rounded(v_exc * v_rew, stats_ptr)  # rounded to the activations' dtype, as the layer does
    tl.store(stats_ptr + 2 * NC + nc, gate, mask=c_ok)
    g = gate.to(tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        off = base[:, None] + hw[None, :] * s_hw
        v = tl.load(y_ptr + off, mask=ok, other=0.).to(tl.float32) * g[:, None]
        if TAIL:
            v = tl.maximum(v + tl.load(s_ptr + off, mask=ok, other=0.).to(tl.float32), 0.)
        tl.store(out_ptr + off, _rounded(v, out_ptr), mask=ok)


@triton.jit
def _sums_kernel(g_ptr, out_ptr, x_ptr, gr_ptr, mean_ptr, idx_ptr, sums_ptr, C, HW, NC, s_n, s_c, s_hw,
                 g_n, g_c, g_hw, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """``gr = g`` where the block's output ``out > 0``, else 0 (ReLU's backward, written in ``x``'s layout), and from it
    the per-map sums."""
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n * s_n + c * s_c
    g_base = n * g_n + c * g_c
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.).to(tl.float32)
    acc_g = tl.zeros([BLOCK_C], tl.float32)
    acc_gx = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        off = base[:, None] + hw[None, :] * s_hw
        g = tl.load(g_ptr + g_base[:, None] + hw[None, :] * g_hw, mask=ok, other=0.)
        g = tl.where(tl.load(out_ptr + off, mask=ok, other=0.) <= 0, tl.zeros_like(g), g)  # as threshold_backward
        tl.store(gr_ptr + off, g, mask=ok)
        g = g.to(tl.float32)
        x = tl.load(x_ptr + off, mask=ok, other=0.).to(tl.float32)
        acc_g += tl.sum(g, axis=1)
        acc_gx += tl.sum(g * tl.where(ok, x - mean[:, None], 0.), axis=1)
    nc = n * C + c
    tl.store(sums_ptr + nc, acc_g, mask=c_ok)
    tl.store(sums_ptr + NC + nc, acc_gx, mask=c_ok)
    i_max = tl.load(idx_ptr + nc, mask=c_ok, other=0)
    i_min = tl.load(idx_ptr + NC + nc, mask=c_ok, other=0)
    tl.store(sums_ptr + 2 * NC + nc, tl.load(x_ptr + base + i_max * s_hw, mask=c_ok, other=0.).to(tl.float32),
             mask=c_ok)
    tl.store(sums_ptr + 3 * NC + nc, tl.load(x_ptr + base + i_min * s_hw, mask=c_ok, other=0.).to(tl.float32),
             mask=c_ok)


@triton.jit
def _dot_kernel(g_ptr, x_ptr, out_ptr, C, HW, s_n, s_c, s_hw, g_n, g_c, g_hw,
                BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Per (n, c) ``sum_hw(g * x)``: the gradient of the gate of ``x * gate``."""
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n * s_n + c * s_c
    g_base = n * g_n + c * g_c
    acc = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        acc += tl.sum(tl.load(g_ptr + g_base[:, None] + hw[None, :] * g_hw, mask=ok, other=0.).to(tl.float32)
                      * tl.load(x_ptr + base[:, None] + hw[None, :] * s_hw, mask=ok, other=0.).to(tl.float32), axis=1)
    tl.store(out_ptr + n * C + c, acc, mask=c_ok)


@triton.jit
def _gate_backward_kernel(sums_ptr, stats_ptr, mean_ptr, invstd_ptr, bn_w_ptr, bn_b_ptr, p_ptr, w_exc_ptr, b_exc_ptr,
                          w_rew_ptr, b_rew_ptr, vv_ptr, gwe_ptr, gbe_ptr, gwr_ptr, gbr_ptr, sdy_ptr, sdyx_ptr,
                          N, C, PAPER: tl.constexpr, BN: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """With ``BN``, the gate's gradient from the per-map sums (``sums``) and BN's sums; else ``sums`` is the gate's
    gradient (N x C)."""
    pid = tl.program_id(0)
    NC = N * C
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    if BN:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.)
        invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.)
        bn_w = tl.load(bn_w_ptr + c, mask=c_ok, other=0.).to(tl.float32)
        bn_b = tl.load(bn_b_ptr + c, mask=c_ok, other=0.).to(tl.float32)
        scale = bn_w * invstd
    w_exc = tl.load(w_exc_ptr + c, mask=c_ok, other=0.).to(tl.float32)
    b_exc = tl.load(b_exc_ptr + c, mask=c_ok, other=0.).to(tl.float32)
    w_rew = tl.load(w_rew_ptr + c, mask=c_ok, other=0.).to(tl.float32)
    b_rew = tl.load(b_rew_ptr + c, mask=c_ok, other=0.).to(tl.float32)
    lam0, lam1 = _lam(p_ptr)
    acc_we = tl.zeros([BLOCK_C], tl.float32)
    acc_be = tl.zeros([BLOCK_C], tl.float32)
    acc_wr = tl.zeros([BLOCK_C], tl.float32)
    acc_br = tl.zeros([BLOCK_C], tl.float32)
    acc_dy = tl.zeros([BLOCK_C], tl.float32)
    acc_dyx = tl.zeros([BLOCK_C], tl.float32)
    acc_l0 = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    acc_l1 = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        ok = (n < N)[:, None] & c_ok[None, :]
        nc = n[:, None] * C + c[None, :]
        f_max = tl.load(stats_ptr + nc, mask=ok, other=0.).to(tl.float32)
        f_min = tl.load(stats_ptr + NC + nc, mask=ok, other=0.).to(tl.float32)
        if BN:
            sg = tl.load(sums_ptr + nc, mask=ok, other=0.)
            sgx = invstd[None, :] * tl.load(sums_ptr + NC + nc, mask=ok, other=0.)  # sum_hw(g * xhat)
            grad = bn_w[None, :] * sgx + bn_b[None, :] * sg
        else:
            grad = tl.load(sums_ptr + nc, mask=ok, other=0.)
        m_max, m_min, u, v_exc, v_rew = _gate(f_max, f_min, lam0, lam1, w_exc[None, :], b_exc[None, :],
                                              w_rew[None, :], b_rew[None, :], PAPER)
        d_exc = tl.where(ok, grad * v_rew * v_exc * (1 - v_exc), 0.)
        d_rew = tl.where(ok, grad * v_exc * v_rew * (1 - v_rew), 0.)
        d_u = d_exc * w_exc[None, :]
        acc_we += tl.sum(d_exc * u, axis=0)
        acc_be += tl.sum(d_exc, axis=0)
        acc_l0 += d_u * m_max
        acc_l1 += d_u * m_min
        if PAPER:
            d_pooled = d_rew * w_rew[None, :]
            g_max = d_u * lam0 + d_pooled
            g_min = d_u * lam1 + d_pooled
            acc_wr += tl.sum(d_rew * (f_max + f_min), axis=0)
            acc_br += tl.sum(d_rew, axis=0)
        else:
            d_max = d_u * lam0 + d_rew
            d_min = d_u * lam1 + d_rew
            g_max = d_max * w_rew[None, :]
            g_min = d_min * w_rew[None, :]
            acc_wr += tl.sum(d_max * f_max + d_min * f_min, axis=0)
            acc_br += tl.sum(d_max + d_min, axis=0)
        if BN:
            gate = tl.load(stats_ptr + 2 * NC + nc, mask=ok, other=0.).to(tl.float32)
            xhat_max = (tl.load(sums_ptr + 2 * NC + nc, mask=ok, other=0.) - mean[None, :]) * invstd[None, :]
            xhat_min = (tl.load(sums_ptr + 3 * NC + nc, mask=ok, other=0.) - mean[None, :]) * invstd[None, :]
            acc_dy += tl.sum(tl.where(ok, gate * sg + g_max + g_min, 0.), axis=0)
            acc_dyx += tl.sum(tl.where(ok, gate * sgx + g_max * xhat_max + g_min * xhat_min, 0.), axis=0)
            g_max = scale[None, :] * g_max  # BN's input gradient adds them scaled
            g_min = scale[None, :] * g_min
        tl.store(vv_ptr + nc, g_max, mask=ok)
        tl.store(vv_ptr + NC + nc, g_min, mask=ok)
    tl.store(gwe_ptr + c, acc_we, mask=c_ok)
    tl.store(gbe_ptr + c, acc_be, mask=c_ok)
    tl.store(gwr_ptr + c, acc_wr, mask=c_ok)
    tl.store(gbr_ptr + c, acc_br, mask=c_ok)
    if BN:
        tl.store(sdy_ptr + c, acc_dy, mask=c_ok)
        tl.store(sdyx_ptr + c, acc_dyx, mask=c_ok)
    tl.store(vv_ptr + 2 * NC + 2 * pid, tl.sum(tl.sum(acc_l0, axis=1), axis=0))
    tl.store(vv_ptr + 2 * NC + 2 * pid + 1, tl.sum(tl.sum(acc_l1, axis=1), axis=0))


@triton.jit
def _mix_backward(glam_ptr, p_ptr, on_ptr, gp_ptr, NUM, eta, BLOCK: tl.constexpr):
    """``p``'s gradient from the ``NUM`` partial gradients of ``(lambda, 1 - lambda)`` at ``glam_ptr``."""
    i = tl.arange(0, BLOCK)
    g0 = tl.sum(tl.load(glam_ptr + 2 * i, mask=i < NUM, other=0.), axis=0)
    g1 = tl.sum(tl.load(glam_ptr + 2 * i + 1, mask=i < NUM, other=0.), axis=0)
    p0 = tl.load(p_ptr).to(tl.float32)
    p1 = tl.load(p_ptr + 1).to(tl.float32)
    q0 = p0 * p0
    q1 = p1 * p1
    den = (q0 + q1) + 2 * 1.1754943508222875e-38
    common = (g0 * (q0 + 1.1754943508222875e-38) + g1 * (q1 + 1.1754943508222875e-38)) / (den * den)
    gp0 = 2 * p0 * (g0 / den - common)
    gp1 = 2 * p1 * (g1 / den - common)
    on = tl.load(on_ptr).to(tl.int1)
    gp0 = tl.where(on, gp0 + (2. * eta) * p0, gp0)  # Eq. 8's gradient, where the layer's switch is on
    gp1 = tl.where(on, gp1 + (2. * eta) * p1, gp1)
    tl.store(gp_ptr, _rounded(gp0, gp_ptr))
    tl.store(gp_ptr + 1, _rounded(gp1, gp_ptr))


@triton.jit
def _mix_backward_kernel(vv_ptr, NC, p_ptr, on_ptr, gp_ptr, NUM, eta, BLOCK: tl.constexpr):
    """``p``'s gradient alone (where no input gradient is needed)."""
    _mix_backward(vv_ptr + 2 * NC, p_ptr, on_ptr, gp_ptr, NUM, eta, BLOCK)


@triton.jit
def _input_grad_kernel(g_ptr, x_ptr, dx_ptr, stats_ptr, mean_ptr, invstd_ptr, bn_w_ptr, sdy_ptr, sdyx_ptr, idx_ptr,
                       vv_ptr, p_ptr, on_ptr, gp_ptr, C, HW, NC, count, NUM, eta, s_n, s_c, s_hw, g_n, g_c, g_hw,
                       BN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_MIX: tl.constexpr):
    """With ``BN``, BN's input gradient of ``dy = g * gate + (v at the extrema)``; else ``dy`` itself. The first
    program also writes ``p``'s gradient (``_mix_backward``)."""
    n = tl.program_id(0)
    pid_c = tl.program_id(1)
    if (n == 0) & (pid_c == 0):
        _mix_backward(vv_ptr + 2 * NC, p_ptr, on_ptr, gp_ptr, NUM, eta, BLOCK_MIX)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    nc = n * C + c
    base = n * s_n + c * s_c
    g_base = n * g_n + c * g_c
    a = tl.load(stats_ptr + 2 * NC + nc, mask=c_ok, other=0.).to(tl.float32)
    if BN:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.)
        invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.)
        scale = tl.load(bn_w_ptr + c, mask=c_ok, other=0.).to(tl.float32) * invstd
        x_coef = scale * invstd * tl.load(sdyx_ptr + c, mask=c_ok, other=0.) / count
        shift = scale * tl.load(sdy_ptr + c, mask=c_ok, other=0.) / count
        a = scale * a
    i_max = tl.load(idx_ptr + nc, mask=c_ok, other=-1)
    i_min = tl.load(idx_ptr + NC + nc, mask=c_ok, other=-1)
    v_max = tl.load(vv_ptr + nc, mask=c_ok, other=0.)
    v_min = tl.load(vv_ptr + NC + nc, mask=c_ok, other=0.)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        ok = c_ok[:, None] & (hw < HW)[None, :]
        off = base[:, None] + hw[None, :] * s_hw
        g = tl.load(g_ptr + g_base[:, None] + hw[None, :] * g_hw, mask=ok, other=0.).to(tl.float32)
        dx = g * a[:, None]
        if BN:
            x = tl.load(x_ptr + off, mask=ok, other=0.).to(tl.float32)
            dx = dx - (x - mean[:, None]) * x_coef[:, None] - shift[:, None]
        dx += tl.where(hw[None, :] == i_max[:, None], v_max[:, None], 0.)
        dx += tl.where(hw[None, :] == i_min[:, None], v_min[:, None], 0.)
        tl.store(dx_ptr + off, _rounded(dx, dx_ptr), mask=ok)
