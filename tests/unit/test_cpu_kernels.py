"""The optional one-pass CPU kernels: same values and first-extremum indices as PyTorch's ops (float32, float64,
bfloat16, float16), same model results with them on and off, more precise 16-bit backward passes, traceable by
torch.compile, and a clear error when they cannot be built."""
import copy

import pytest
import timm
import torch
from helpers import ROOT

import timm_spe
from timm_spe import _cpu_build, config, cpu_kernels
from timm_spe.cpu_kernels import (
    bn_input_grad_,
    max_min,
    max_min_with_indices,
    per_map_sums,
    scale_add_relu_,
    scatter_add_at_,
    take_at,
)


def _inputs(shape, dtype, values):
    torch.manual_seed(0)
    if values == 'distinct':
        return torch.randn(*shape, dtype=torch.float64).to(dtype)
    x = torch.randint(-3, 4, shape).to(dtype)  # many ties
    x[0, 0] = 7.
    if values == 'nan':
        x[1, 1].view(-1)[-1] = float('nan')
        x[0, -1].view(-1)[x[0, -1].numel() // 2] = float('nan')
    return x


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = [torch.bfloat16, torch.float16]


# channels_last takes channels in blocks of 4 vectors, one block of 2 and / or 1, then one by one: 31, 59 and 115
# channels take every path for every dtype with 256-bit and with 512-bit vectors (8 or 16 float32 lanes)
@pytest.mark.parametrize('shape', [(2, 3, 1, 1), (2, 3, 1, 7), (2, 5, 4, 5), (3, 19, 8, 8), (2, 16, 16, 16),
                                   (2, 3, 32, 64), (2, 31, 3, 5), (2, 59, 4, 3), (2, 115, 3, 3)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('values', ['distinct', 'ties', 'nan'])
def test_ops_match_torch(cpu_kernels_on, shape, memory_format, dtype, values):
    x = _inputs(shape, dtype, values).contiguous(memory_format=memory_format)
    flat = x.flatten(2)
    f_max, i_max = flat.max(-1)  # first maximum; NaN wins, at its first position
    f_min, i_min = flat.min(-1)
    got = torch.ops.timm_spe.max_min_with_indices(x)
    for a, b in zip(got, (f_max, i_max, f_min, i_min)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for a, b in zip(torch.ops.timm_spe.max_min(x), (flat.amax(-1), flat.amin(-1))):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize('shape', [(2, 3, 1, 1), (2, 5, 4, 5), (3, 19, 8, 8), (2, 16, 16, 16)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('dtype', DTYPES)
def test_block_tail_kernel_rounds_as_addcmul_and_relu_bit_for_bit(cpu_kernels_on, shape, memory_format, dtype):
    """bfloat16 / float16 too: addcmul computes those in float32 and rounds once, as the kernel does."""
    torch.manual_seed(0)
    n, c = shape[0], shape[1]
    x, s = (torch.randn(shape).to(dtype).contiguous(memory_format=memory_format) for _ in range(2))
    x[0, 0, 0, 0] = float('nan')
    s[-1, -1, -1, -1] = float('inf')
    gate = torch.rand(n, c, 1, 1).to(dtype)
    expected = torch.addcmul(s, x, gate).relu_()
    out = x.clone()
    torch.ops.timm_spe.scale_add_relu_(out, s, gate)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert scale_add_relu_(x.clone(), s, gate).eq(expected).logical_or(expected.isnan()).all()


# (3, 8, 40, 40) channels_last: two threads split the 4800 pixels inside the second image
@pytest.mark.parametrize('shape', [(2, 3, 1, 1), (2, 5, 4, 5), (3, 19, 8, 8), (2, 16, 16, 16), (2, 45, 3, 5),
                                   (3, 8, 40, 40)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_bn_input_grad_kernel_rounds_as_the_eager_multiply_adds_bit_for_bit(cpu_kernels_on, shape, memory_format, dtype):
    """float32 / float64: BN's input-gradient multiply-adds and the additions at the extrema as eager rounds them."""
    torch.manual_seed(0)
    n, c = shape[0], shape[1]
    x, g = (torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format) for _ in range(2))
    x[0, 0, 0, 0] = float('nan')
    scale, shift, coef = torch.randn(n, c, dtype=dtype), torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    hw = shape[2] * shape[3]
    i_max, i_min = torch.randint(0, hw, (n, c)), torch.randint(0, hw, (n, c))
    i_min[0, 0] = i_max[0, 0]  # a constant map: both gradients at one position, max's added first
    v_max, v_min = torch.randn(n, c, dtype=dtype), torch.randn(n, c, dtype=dtype)
    expected = torch.addcmul(shift.view(1, c, 1, 1), g, scale.view(n, c, 1, 1)).addcmul_(
        x, coef.view(1, c, 1, 1), value=-1).flatten(2)
    expected = expected.scatter_add(2, i_max.unsqueeze(2), v_max.unsqueeze(2))
    expected = expected.scatter_add(2, i_min.unsqueeze(2), v_min.unsqueeze(2)).view(shape)
    out = torch.empty_like(x)
    torch.ops.timm_spe.bn_input_grad_(out, g, x, scale, shift, coef, i_max, v_max, i_min, v_min)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    for into in ('g', 'x'):  # written over one of its inputs: the same results
        out, g_in, x_in = (t.clone() for t in (g if into == 'g' else x, g, x))
        g_in, x_in = (out, x_in) if into == 'g' else (g_in, out)
        torch.ops.timm_spe.bn_input_grad_(out, g_in, x_in, scale, shift, coef, i_max, v_max, i_min, v_min)
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    # the dispatch's form: shift = mean * coef - sum_term; mean 0 and sum_term -shift give shift exactly
    args = (g, x, scale, -shift, coef, torch.zeros_like(shift), i_max, v_max, i_min, v_min)
    torch.testing.assert_close(bn_input_grad_(torch.empty_like(x), *args), expected, rtol=0, atol=0, equal_nan=True)
    with timm_spe.set_cpu_kernels(False):  # the eager fallback: two multiply-adds and two scatters
        torch.testing.assert_close(bn_input_grad_(torch.empty_like(x), *args), expected, rtol=0, atol=0,
                                   equal_nan=True)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dtype', LOW)
def test_16_bit_backward_passes_compute_in_float32_and_round_once(cpu_kernels_on, dtype, memory_format):
    """BN's input gradient and the per-map sums for bfloat16 / float16 activations (autocast): float32 coefficients,
    float32 arithmetic and one rounding per element, so that against a float64 reference the kernel is within half a
    16-bit unit (plus float32's error) and never worse than the eager 16-bit ops, on activations whose mean is far from
    0 (where the eager form would cancel)."""
    torch.manual_seed(0)
    n, c, h, w = 8, 24, 16, 16
    x = (torch.randn(n, c, h, w) * 0.5 + 6).to(dtype).contiguous(memory_format=memory_format)
    g = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=memory_format)
    mean, invstd = x.float().mean((0, 2, 3)), x.float().var((0, 2, 3)).rsqrt()
    gate, coef = torch.rand(n, c) + 0.5, torch.randn(c) * invstd
    sum_term = torch.randn(c) * 0.1
    f_max, i_max, f_min, i_min = max_min_with_indices(x)
    v_max, v_min = torch.randn(n, c), torch.randn(n, c)
    args = (g, x, gate, sum_term, coef, mean, i_max, v_max, i_min, v_min)

    d = {name: t.double() for name, t in zip(('g', 'x', 'gate', 'sum', 'coef', 'mean'), args[:6])}
    exact = (d['g'] * d['gate'].view(n, c, 1, 1) - d['sum'].view(1, c, 1, 1)
             - (d['x'] - d['mean'].view(1, c, 1, 1)) * d['coef'].view(1, c, 1, 1)).flatten(2)
    exact = exact.scatter_add(2, i_max.unsqueeze(2), v_max.double().unsqueeze(2))
    exact = exact.scatter_add(2, i_min.unsqueeze(2), v_min.double().unsqueeze(2)).view(n, c, h, w)
    kernel = bn_input_grad_(torch.empty_like(x), *args)
    with timm_spe.set_cpu_kernels(False):
        eager = bn_input_grad_(torch.empty_like(x), *args)
    assert kernel.dtype == eager.dtype == dtype and kernel.stride() == x.stride()
    # one rounding: the nearest 16-bit value of the float32 result, whose own error is ~2^-24 * |terms|
    ulp = torch.finfo(dtype).eps * exact.abs()
    kernel_err, eager_err = (kernel.double() - exact).abs(), (eager.double() - exact).abs()
    assert (kernel_err <= 0.5 * ulp + 1e-5 * (1 + exact.abs())).all()
    assert kernel_err.max() <= eager_err.max() and kernel_err.mean() < eager_err.mean()

    sums = per_map_sums(g, x, mean, invstd, torch.empty_like(g), i_max, i_min)
    exact_sums = (d['g'].sum((2, 3)), (d['g'] * (d['x'] - d['mean'].view(1, c, 1, 1))
                                        * invstd.double().view(1, c, 1, 1)).sum((2, 3)))
    for got, ref in zip(sums[:2], exact_sums):
        assert got.dtype == torch.float32
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5
    for got, index in zip(sums[2:], (i_max, i_min)):  # x at the extrema: x's values, exact
        assert got.dtype == dtype and torch.equal(got, x.flatten(2).gather(2, index.unsqueeze(2)).squeeze(2))
    torch.testing.assert_close(sums[2], f_max, rtol=0, atol=0)
    torch.testing.assert_close(sums[3], f_min, rtol=0, atol=0)


@pytest.mark.parametrize('paper', [False, True], ids=['official', 'paper'])
@pytest.mark.parametrize('dtype', LOW)
def test_block_backward_coefficients_are_the_eager_n_by_c_backward_in_one_op(cpu_kernels_on, dtype, paper):
    """The N x C part of the fused block's backward for 16-bit activations: the same values as the eager ops of
    spe_me (the gate's VJP and BN's coefficients) to float32 rounding, in both formulations, with the paper form's
    16-bit intermediates (its u and f_max + f_min are ops on 16-bit pools) rounded as eager rounds them."""
    torch.manual_seed(0)
    n, c, count = 8, 24, 8 * 16
    a = dict(sum_grad=torch.randn(n, c), sum_grad_xhat=torch.randn(n, c), x_max=(torch.randn(n, c) + 2).to(dtype),
             x_min=(torch.randn(n, c) - 2).to(dtype), f_max=(torch.randn(n, c) + 2).to(dtype),
             f_min=(torch.randn(n, c) - 2).to(dtype), gate=torch.rand(n, c).to(dtype), mean=torch.randn(c),
             invstd=torch.rand(c) + .5, bn_weight=torch.randn(c), bn_bias=torch.randn(c), lam=torch.tensor([.3, .7]),
             w_exc=torch.randn(c), b_exc=torch.randn(c), w_rew=torch.randn(c), b_rew=torch.randn(c))
    got = cpu_kernels.block_backward_coefficients(**a, paper=paper, count=count)
    grad_gate = a['bn_weight'] * a['sum_grad_xhat'] + a['bn_bias'] * a['sum_grad']
    g_max, g_min, *param_grads = timm_spe.spe_me._spe_gate_backward(
        grad_gate, a['f_max'], a['f_min'], a['lam'], a['w_exc'], a['b_exc'], a['w_rew'], a['b_rew'], paper)
    xhat_max, xhat_min = ((a[k] - a['mean']) * a['invstd'] for k in ('x_max', 'x_min'))
    sum_dy = (a['gate'] * a['sum_grad'] + g_max + g_min).sum(0)
    sum_dy_xhat = (a['gate'] * a['sum_grad_xhat'] + g_max * xhat_max + g_min * xhat_min).sum(0)
    scale = a['bn_weight'] * a['invstd']
    expected = [scale * a['gate'], scale * sum_dy / count, scale * a['invstd'] * sum_dy_xhat / count, scale * g_max,
                scale * g_min, sum_dy_xhat, sum_dy, *param_grads]
    assert len(got) == len(expected) == 12
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == torch.float32 and g.shape == e.shape, i
        torch.testing.assert_close(g / e.abs().max(), e / e.abs().max(), rtol=0, atol=2e-6, msg=str(i))
    with timm_spe.set_cpu_kernels(False):  # off, or float32 pools: the caller's eager ops
        assert cpu_kernels.block_backward_coefficients(**a, paper=paper, count=count) is None
    a32 = {k: v.float() for k, v in a.items()}
    assert cpu_kernels.block_backward_coefficients(**a32, paper=paper, count=count) is None


def _gate_args(n, c, dtype, scale, seed=0):
    torch.manual_seed(seed)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    f_max, f_min = ((torch.randn(n, c, dtype=torch.float64) * scale + shift).to(dtype) for shift in (1, -1))
    f_max[0, 0], f_min[-1, -1] = float('nan'), float('-inf')
    lam = timm_spe.spe_math.mix_weights(torch.randn(2, dtype=param))
    return (f_max, f_min, lam) + tuple(torch.randn(c, dtype=param) * 2 for _ in range(4))


# 45 and 7 channels leave rows that PyTorch's vectorised loops finish with their scalar code; (300, 200) is more than
# one grain of its parallel loops
@pytest.mark.parametrize('shape', [(128, 64), (3, 45), (1, 1), (7, 7), (300, 200)])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('paper', [False, True], ids=['official', 'paper'])
def test_gate_op_is_the_eager_gate_rounded_to_the_pools_dtype_bit_for_bit(cpu_kernels_on, shape, dtype, paper):
    """The forward gate in one op equals spe_math.spe_gate(...).to(dtype) bit for bit (NaN and infinite pools too):
    float32 math on 16-bit pools with float32 parameters (autocast), the paper form's 16-bit intermediates rounded as
    eager rounds them, each pool's own dtype otherwise; small and large pools (sigmoids saturate at 30 sigma)."""
    for scale in (1., 30.):
        args = _gate_args(*shape, dtype, scale)
        expected = timm_spe.spe_math.spe_gate(*args, paper).to(dtype)
        got = torch.ops.timm_spe.spe_gate(*args, paper)
        assert got.dtype == dtype and got.shape == shape
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
        with torch.no_grad():
            torch.testing.assert_close(cpu_kernels.spe_gate(*args, paper), expected, rtol=0, atol=0, equal_nan=True)


def test_gate_op_runs_only_where_nothing_records_a_gradient_and_dtypes_are_as_autocast_makes_them(cpu_kernels_on,
                                                                                                 monkeypatch):
    """Parameters that need a gradient (training outside the fused functions, or eval with grad on), a 16-bit model's
    16-bit parameters, the kernels off, or a non-CPU-kernel dtype: the eager ops, with their autograd graph."""
    calls = []
    op = torch.ops.timm_spe.spe_gate

    def counting(*a):
        calls.append(1)
        return op(*a)
    monkeypatch.setattr(cpu_kernels.torch.ops.timm_spe, 'spe_gate', counting, raising=False)
    f_max, f_min, lam, *params = _gate_args(4, 6, torch.bfloat16, 1.)
    cpu_kernels.spe_gate(f_max, f_min, lam, *params, False)
    assert len(calls) == 1
    w = params[0].clone().requires_grad_()
    v = cpu_kernels.spe_gate(f_max, f_min, lam, w, *params[1:], False)
    assert v.grad_fn is not None and v.dtype == torch.bfloat16 and len(calls) == 1
    with torch.no_grad():
        cpu_kernels.spe_gate(f_max, f_min, lam, w, *params[1:], False)
    assert len(calls) == 2
    for args in ((f_max, f_min, lam.bfloat16(), *(t.bfloat16() for t in params)),  # a bfloat16 model, no autocast
                 (f_max.float(), f_min, lam, *params),  # pools of two dtypes
                 (f_max, f_min, lam, params[0][:3], *params[1:])):  # a parameter of another size
        with torch.no_grad():
            try:
                cpu_kernels.spe_gate(*args, False)
            except RuntimeError:
                pass  # eager's own error for the wrong size
    assert len(calls) == 2
    with timm_spe.set_cpu_kernels(False), torch.no_grad():
        cpu_kernels.spe_gate(f_max, f_min, lam, *params, False)
    assert len(calls) == 2
    with pytest.raises(RuntimeError, match='w_exc .C. must be contiguous, Float for BFloat16 x'):
        torch.ops.timm_spe.spe_gate(f_max, f_min, lam, params[0].bfloat16(), *params[1:], False)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_mix_weights_op_is_eq_3_bit_for_bit(cpu_kernels_on, dtype):
    """Eq. 3 as spe_math.mix_weights rounds it, for p of every size down to zero and subnormal squares."""
    torch.manual_seed(0)
    for p in [torch.randn(2, dtype=dtype) * scale for scale in (1e-30, 1e-20, 1e-3, 1., 1e3, 1e15)] + [
            torch.zeros(2, dtype=dtype), torch.tensor([0., 3.], dtype=dtype), torch.tensor([-1e-25, 1e-19], dtype=dtype)]:
        torch.testing.assert_close(torch.ops.timm_spe.mix_weights(p), timm_spe.spe_math.mix_weights(p), rtol=0, atol=0,
                                   msg=str(p))


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('paper', [False, True], ids=['official', 'paper'])
def test_inference_tail_in_one_op_equals_its_steps_bit_for_bit(cpu_kernels_on, memory_format, dtype, paper):
    """spe_gate_of(x, p, ...) is max_min, Eq. 3 and the eager gate rounded to x's dtype; spe_add_relu_ writes
    relu(x * that gate + shortcut) into x as scale_add_relu_ does; ties and NaN in x included."""
    param = torch.float64 if dtype == torch.float64 else torch.float32
    for values, shape in (('distinct', (3, 45, 5, 7)), ('ties', (2, 64, 8, 8)), ('nan', (2, 19, 4, 4))):
        x = _inputs(shape, dtype, values).contiguous(memory_format=memory_format)
        shortcut = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
        p = torch.randn(2, dtype=param)
        params = [torch.randn(shape[1], dtype=param) for _ in range(4)]
        f_max, f_min = x.amax((2, 3)), x.amin((2, 3))
        gate = timm_spe.spe_math.spe_gate(f_max, f_min, timm_spe.spe_math.mix_weights(p), *params, paper).to(dtype)
        with torch.no_grad():
            got = cpu_kernels.spe_gate_of(x, p, *params, paper)
            torch.testing.assert_close(got, gate, rtol=0, atol=0, equal_nan=True)
            out = x.clone()
            assert cpu_kernels.spe_add_relu_(out, shortcut, p, *params, paper)
        expected = torch.addcmul(shortcut, x, gate.view(*shape[:2], 1, 1)).relu_()
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        assert out.is_contiguous(memory_format=memory_format)


def test_inference_ops_leave_what_they_do_not_take_to_the_caller(cpu_kernels_on):
    """A gradient to record, another layout for the shortcut, 16-bit parameters without autocast, a parameter of
    another size, kernels off: spe_gate_of gives None and spe_add_relu_ False, x untouched."""
    x, shortcut = torch.randn(2, 6, 4, 4).bfloat16(), torch.randn(2, 6, 4, 4).bfloat16()
    p, params = torch.randn(2), [torch.randn(6) for _ in range(4)]
    with torch.no_grad():
        assert cpu_kernels.spe_gate_of(x, p, *params, False) is not None
    cases = [(x, shortcut, p.requires_grad_(), params),
             (x, shortcut.contiguous(memory_format=torch.channels_last), p.detach(), params),
             (x, shortcut, p.detach().bfloat16(), [t.bfloat16() for t in params]),
             (x, shortcut, p.detach(), [params[0][:3]] + params[1:]),
             (x.int(), shortcut, p.detach(), params)]
    for a, s, q, ps in cases:
        before = a.clone()
        assert not cpu_kernels.spe_add_relu_(a, s, q, *ps, False)
        assert torch.equal(a, before)
    assert cpu_kernels.spe_gate_of(x, p.requires_grad_(), *params, False) is None
    with timm_spe.set_cpu_kernels(False), torch.no_grad():
        assert cpu_kernels.spe_gate_of(x, p, *params, False) is None
        assert not cpu_kernels.spe_add_relu_(x.clone(), shortcut, p, *params, False)


def test_16_bit_kernels_take_float32_coefficients_only(cpu_kernels_on):
    x = torch.randn(2, 4, 3, 3).bfloat16()
    c16, index = torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match='shift .C. must be contiguous, Float for BFloat16 x'):
        torch.ops.timm_spe.bn_input_grad_(torch.empty_like(x), x, x, torch.ones(2, 4), c16, torch.zeros(4),
                                          index, torch.zeros(2, 4), index, torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match='mean .C. must be contiguous, Float for BFloat16 x'):
        torch.ops.timm_spe.channels_last_per_map_sums(x.contiguous(memory_format=torch.channels_last),
                                                      x.contiguous(memory_format=torch.channels_last), c16, index,
                                                      index)
    with pytest.raises(RuntimeError, match='supports float32, float64, bfloat16 and float16, got Int'):
        torch.ops.timm_spe.max_min(x.int())


@pytest.mark.parametrize('shape', [(2, 3, 1, 1), (2, 5, 4, 5), (3, 19, 8, 8)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('dtype', DTYPES)
def test_values_at_and_additions_at_the_extrema_match_gather_and_scatter_add(cpu_kernels_on, shape, memory_format, dtype):
    torch.manual_seed(0)
    n, c, h, w = shape
    x = torch.randn(shape).to(dtype).contiguous(memory_format=memory_format)
    index, values = torch.randint(0, h * w, (n, c)), torch.randn(n, c).to(dtype)
    flat = x.flatten(2)  # a copy for channels_last: the expected values in NCHW order
    torch.testing.assert_close(torch.ops.timm_spe.take_at(x, index), flat.gather(2, index.unsqueeze(2)).squeeze(2),
                               rtol=0, atol=0)
    expected = flat.scatter_add(2, index.unsqueeze(2), values.unsqueeze(2)).view(shape)
    got = x.clone()
    torch.ops.timm_spe.scatter_add_at_(got, index, values)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.is_contiguous(memory_format=memory_format)
    with timm_spe.set_cpu_kernels(False):  # the eager fallbacks give the same
        eager = x.clone()
        scatter_add_at_(eager, index, values)
        torch.testing.assert_close(take_at(x, index), torch.ops.timm_spe.take_at(x, index), rtol=0, atol=0)
    torch.testing.assert_close(eager, got, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f'index {h * w} out of range for H x W = {h * w}'):
        torch.ops.timm_spe.take_at(x, torch.full((n, c), h * w))
    with pytest.raises(RuntimeError, match='out of range'):
        torch.ops.timm_spe.scatter_add_at_(x.clone(), torch.full((n, c), -1), values)
    coef = values.to(cpu_kernels.coef_dtype(x))
    with pytest.raises(RuntimeError, match='out of range'):
        torch.ops.timm_spe.bn_input_grad_(torch.empty_like(x), x, x, coef, coef.new_zeros(c), coef.new_zeros(c),
                                          index, coef, torch.full((n, c), h * w), coef)


def test_tail_kernels_take_only_matching_layouts(cpu_kernels_on):
    x = torch.randn(4, 6, 8, 8)
    s, gate = torch.randn_like(x), torch.rand(4, 6, 1, 1)
    assert cpu_kernels.kernels_apply_per_map(x, s, gate)
    for args in ((x, s.contiguous(memory_format=torch.channels_last), gate), (x, s.double(), gate),
                 (x, s, gate.double()), (x, s, torch.rand(6, 4, 1, 1).transpose(0, 1)), (x, s, gate[:2]),
                 (x.bfloat16(), s.bfloat16(), gate)):
        assert not cpu_kernels.kernels_apply_per_map(*args)
        expected = torch.addcmul(args[1], args[0], args[2]).relu_() if args[2].shape == gate.shape else None
        if expected is not None:  # the eager ops take the rest
            torch.testing.assert_close(scale_add_relu_(args[0].clone(), args[1], args[2]), expected.to(args[0].dtype),
                                       rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='shortcut must have x.s shape, strides and dtype'):
        torch.ops.timm_spe.scale_add_relu_(x.clone(), s.contiguous(memory_format=torch.channels_last), gate)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_spe_functions_use_kernels_only_where_they_apply(cpu_kernels_on, memory_format):
    x = torch.randn(4, 6, 8, 8).contiguous(memory_format=memory_format)
    assert cpu_kernels.kernels_apply(x) and cpu_kernels.kernels_apply(x.bfloat16()) and cpu_kernels.kernels_apply(x.half())
    for t in (x.int(), x.transpose(2, 3) if memory_format == torch.contiguous_format else x.permute(0, 1, 3, 2),
              x[:, :, :0], x.flatten(2)):
        assert not cpu_kernels.kernels_apply(t)
    with torch.no_grad():
        torch.testing.assert_close(max_min(x), (x.amax((2, 3)), x.amin((2, 3))), rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    f_max, f_min = max_min(xg)  # needs a gradient: the differentiable ops
    assert f_max.grad_fn is not None and f_min.grad_fn is not None
    with timm_spe.set_cpu_kernels(False):
        assert not cpu_kernels.kernels_apply(x)
        expected = max_min_with_indices(x)
    for a, b in zip(max_min_with_indices(x), expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_model_results_equal_with_and_without_kernels(memory_format):
    torch.manual_seed(0)
    m = timm.create_model('resnet83_spe', num_classes=10).to(memory_format=memory_format)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = copy.deepcopy(m)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=memory_format)
    with timm_spe.set_cpu_kernels(False):
        out_ref = ref.train()(x)
        out_ref.square().mean().backward()
        with torch.no_grad():
            eval_ref = ref.eval()(x)
    with timm_spe.set_cpu_kernels(True):
        out = m.train()(x)
        out.square().mean().backward()
        with torch.no_grad():
            eval_out = m.eval()(x)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(eval_out, eval_ref, rtol=0, atol=0)
    # channels_last backward sums in the (c - mean) form (test_channels_last_per_map_sums_are_more_precise): float32
    # rounding apart; NCHW: bit for bit
    exact = dict(rtol=0, atol=0) if memory_format == torch.contiguous_format else {}
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **exact, msg=name)


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('dtype', LOW)
def test_model_under_autocast_gives_the_same_outputs_with_and_without_kernels(memory_format, dtype):
    """bfloat16 / float16 autocast: the kernels run (max/min, tail, backward sums, BN's input gradient) and the train
    and eval outputs are equal bit for bit; the whole gradient with the kernels is as close to a float64 model's as
    the eager 16-bit one, and the two differ by less than either differs from float64 (the kernels round once where
    eager 16-bit ops round several times)."""
    torch.manual_seed(0)
    m = timm_spe.resnet.CifarResNet(depth=20, attn_layer='spe', num_classes=10).to(memory_format=memory_format)
    with torch.no_grad():  # resnet83_spe's blocks, two a stage
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=memory_format)
    outputs, grads = {}, {}
    for name, kernels in (('float64', False), ('eager', False), ('kernels', True)):
        model = copy.deepcopy(m).double() if name == 'float64' else copy.deepcopy(m)
        with timm_spe.set_cpu_kernels(kernels), torch.autocast('cpu', dtype=dtype, enabled=name != 'float64'):
            out = model.train()(x.to(next(model.parameters()).dtype))
            out.double().square().mean().backward()
            with torch.no_grad():
                outputs[name] = (out, model.eval()(x.to(out.dtype)))
        grads[name] = torch.cat([p.grad.double().flatten() for p in model.parameters()])
    assert outputs['kernels'][0].dtype == dtype
    for a, b in zip(outputs['kernels'], outputs['eager']):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def distance(a, b):
        return ((grads[a] - grads[b]).norm() / grads[b].norm()).item()
    assert distance('kernels', 'float64') <= 1.05 * distance('eager', 'float64')
    assert distance('kernels', 'eager') < distance('eager', 'float64')


# blocks of 8 vectors, one block of 4, 2, 1, then one by one: 123 and 243 take every path with 8 and 16 float32 lanes
@pytest.mark.parametrize('channels', [40, 123, 243])
def test_channels_last_per_map_sums_are_more_precise(cpu_kernels_on, channels):
    """The channels_last kernel sums grad * (c - mean) in one read; eager sums grad * c and subtracts mean * sum(grad),
    which loses ~|mean| / std of relative precision: against float64, the kernel is several times closer."""
    torch.manual_seed(0)
    shape = (8, channels, 16, 16)
    c = (torch.randn(shape) * 0.5 + 10).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    mean, invstd = c.mean((0, 2, 3)), c.var((0, 2, 3)).rsqrt()
    c64, m64, s64 = c.double(), mean.double().view(1, -1, 1, 1), invstd.double().view(1, -1, 1, 1)
    exact = (grad.double().sum((2, 3)), (grad.double() * (c64 - m64) * s64).sum((2, 3)))

    def error(sums):
        return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(sums, exact))

    i_max, i_min = torch.randint(0, 256, (8, channels)), torch.randint(0, 256, (8, channels))
    with_kernel = per_map_sums(grad, c, mean, invstd, torch.empty_like(grad), i_max, i_min)
    with timm_spe.set_cpu_kernels(False):
        eager = per_map_sums(grad, c, mean, invstd, torch.empty_like(grad), i_max, i_min)
    assert error(with_kernel[:2]) < 2e-6 and error(with_kernel[:2]) * 3 < error(eager[:2])
    for a, b in zip(with_kernel[2:], eager[2:]):  # x at the extrema, picked up in the same read: exact
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_keeps_kernel_ops_for_inference(cpu_kernels_on):
    """Exported under no_grad (inference), the program calls the kernels; with grad enabled, the plain ops."""
    torch.manual_seed(0)
    m = timm_spe.resnet.CifarResNet(depth=11, attn_layer='spe').eval()
    x = torch.randn(2, 3, 32, 32)
    inference = {'timm_spe.spe_add_relu_.default'}  # the whole inference tail of a block in one op
    for grad, expected in ((False, inference), (True, set())):
        with torch.set_grad_enabled(grad):
            exported = torch.export.export(m, (x,))
        ops = {str(node.target) for node in exported.graph.nodes if 'timm_spe' in str(node.target)}
        assert ops == expected
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), m(x), rtol=0, atol=0)


def test_set_cpu_kernels_acts_at_once_and_as_a_context_manager_that_restores(cpu_kernels_on):
    assert timm_spe.cpu_kernels_enabled()
    with timm_spe.set_cpu_kernels(False) as setting:
        assert not timm_spe.cpu_kernels_enabled() and setting.previous is True
        with pytest.raises(KeyError):
            with timm_spe.set_cpu_kernels(True):
                assert timm_spe.cpu_kernels_enabled()
                raise KeyError('the previous setting comes back on an error too')
        assert not timm_spe.cpu_kernels_enabled()
    assert timm_spe.cpu_kernels_enabled()
    timm_spe.set_cpu_kernels(False)  # called, not entered: the setting stays
    assert not timm_spe.cpu_kernels_enabled()


def test_build_failure_names_cause_and_fix(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(*args, **kwargs):
        raise OSError('g++: command not found')

    monkeypatch.setattr(config, '_state', {'enabled': False, 'loaded': False})
    monkeypatch.setattr(cpp_extension, 'load', no_compiler)
    with pytest.raises(RuntimeError, match=r'(?s)g\+\+: command not found.*C\+\+ compiler.*ninja.*set_cpu_kernels\(False\)'):
        timm_spe.set_cpu_kernels(True)
    assert not timm_spe.cpu_kernels_enabled()
    monkeypatch.setenv('TIMM_SPE_CPU_KERNELS', '1')
    with pytest.warns(UserWarning, match='C\\+\\+ compiler'):
        config._from_env()
    monkeypatch.setenv('TIMM_SPE_CPU_KERNELS', 'maybe')
    with pytest.warns(UserWarning, match='not understood'):
        config._from_env()
    assert not timm_spe.cpu_kernels_enabled()


def test_build_is_cached_per_cpu_model(monkeypatch, tmp_path):
    """-march=native binaries are named by the CPU's feature flags, so a shared cache never runs one CPU's build
    on another."""
    import torch.utils.cpp_extension as cpp_extension
    signatures = []
    for i, flags in enumerate(('fpu sse2 avx2', 'fpu sse2 avx2 avx512f', 'fpu sse2 avx2')):
        info = tmp_path / f'cpuinfo{i}'
        info.write_text(f'processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: none\n')
        signatures.append(_cpu_build._cpu_signature(str(info)))
    assert signatures[0] != signatures[1] and signatures[0] == signatures[2]

    names = []

    def record(name, **kwargs):
        names.append(name)
        raise OSError('stop here')

    monkeypatch.setattr(config, '_state', {'enabled': False, 'loaded': False})
    monkeypatch.setattr(cpp_extension, 'load', record)
    with pytest.raises(RuntimeError, match='stop here'):
        timm_spe.set_cpu_kernels(True)
    assert names == [f'timm_spe_cpu_{_cpu_build._cpu_signature()}_{_cpu_build._source_signature()}']


def test_the_build_is_named_by_every_source_file_the_header_included(monkeypatch, tmp_path):
    """PyTorch's extension cache watches only the listed .cpp files: a changed header must change the build's name."""
    for name in ('spe_cpu.h', 'spe_cpu.cpp'):
        (tmp_path / name).write_text('// one\n')
    monkeypatch.setattr(_cpu_build, '_CSRC', tmp_path)
    before = _cpu_build._source_signature()
    (tmp_path / 'spe_cpu.h').write_text('// two\n')
    assert _cpu_build._source_signature() != before
    # and every .cpp file of csrc/ is compiled (a new one left out would build without its ops)
    assert sorted(p.name for p in _cpu_build._SOURCES) == sorted(p.name for p in (ROOT / 'timm_spe' / 'csrc').glob('*.cpp'))


def test_run_sh_train_switches_kernels_on_unless_set():
    run_sh = (ROOT / 'run.sh').read_text()
    branch = run_sh.split('    train)\n', 1)[1].split(';;', 1)[0]
    assert 'export TIMM_SPE_CPU_KERNELS="${TIMM_SPE_CPU_KERNELS:-1}"' in branch
