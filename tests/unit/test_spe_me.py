"""timm_spe.spe_me: the memory-efficient autograd functions and the fused block tail against plain autograd and the
reference, their fallbacks (layouts, BatchNorm subclasses) and their first-order-only backward."""
import copy

import pytest
import torch

from benchmarks.spe_reference import reference_spe, spe_params
from timm_spe.cpu_kernels import max_min_with_indices, per_map_sums
from timm_spe.spe import _block_tail_fusable, batch_norm_spe_add_relu
from timm_spe.spe_me import global_max_min, scale_add_relu


def test_global_max_min_gradient_and_ties():
    x = torch.tensor([[[[1., 3.], [3., -2.]]]], requires_grad=True)  # max 3 appears twice
    f_max, f_min = global_max_min(x)
    assert f_max.item() == 3. and f_min.item() == -2.
    (2 * f_max + 5 * f_min).sum().backward()
    # the first maximal element takes the whole gradient (amax would split it 1 / 1)
    assert x.grad.tolist() == [[[[0., 2.], [0., 5.]]]]
    y = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    a, b = global_max_min(y)
    torch.testing.assert_close(a, y.amax((2, 3)))
    torch.testing.assert_close(b, y.amin((2, 3)))
    (a.sum() + b.sum()).backward()
    ref = y.detach().clone().requires_grad_()
    (ref.amax((2, 3)).sum() + ref.amin((2, 3)).sum()).backward()
    torch.testing.assert_close(y.grad, ref.grad)


def test_global_max_min_with_one_pool_unused_gives_that_pools_gradient_only():
    """Unused outputs get no zero-filled gradients (``set_materialize_grads(False)``): a loss of one pool alone still
    back-propagates exactly ``amax``'s (``amin``'s) gradient for distinct values."""
    torch.manual_seed(0)
    for pick in (0, 1):
        x = torch.randn(2, 3, 4, 5, requires_grad=True)
        ref = x.detach().clone().requires_grad_()
        (global_max_min(x)[pick] * 3).sum().backward()
        ((ref.amax((2, 3)), ref.amin((2, 3)))[pick] * 3).sum().backward()
        assert torch.equal(x.grad, ref.grad)


def test_fused_functions_pass_an_undefined_output_gradient_on_as_none(random_spe):
    """A custom backward upstream may return no gradient (None) for our output: the fused functions then give
    their inputs none either, instead of failing on it."""
    class NoGrad(torch.autograd.Function):
        @staticmethod
        def forward(t):
            return t.sum()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return None

    spe, bn = random_spe(4), torch.nn.BatchNorm2d(4)
    for fn in (lambda t: spe(t), lambda t: batch_norm_spe_add_relu(t, t.detach(), bn, spe)):
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        loss = NoGrad.apply(fn(x)) + 0 * x.sum()  # x stays in the graph through the second term
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))  # only the second term's (zero) gradient arrives


@pytest.mark.parametrize('hw', [(1, 1), (1, 7), (4, 5), (8, 8), (16, 16), (32, 32), (32, 64)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('values', ['ties', 'distinct'])
def test_max_min_with_indices_is_first_extremum(hw, memory_format, dtype, values):
    torch.manual_seed(0)
    if values == 'ties':
        x = torch.randint(-3, 4, (4, 5, *hw)).to(dtype)
        x[0, 0] = 7.  # all equal
        x[1, 1] = 0.
        x[1, 1, 0, -1] = -0.  # -0. == 0.: still the first zero for both
    else:
        x = torch.randn(4, 5, *hw, dtype=torch.float64).to(dtype)
    flat = x.flatten(2)
    f_max, i_max, f_min, i_min = max_min_with_indices(x.contiguous(memory_format=memory_format))
    first = lambda hits: hits.float().argmax(-1)  # index of the first True
    torch.testing.assert_close(f_max, flat.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(f_min, flat.amin(-1), rtol=0, atol=0)
    torch.testing.assert_close(i_max, first(flat == flat.amax(-1, keepdim=True)), rtol=0, atol=0)
    torch.testing.assert_close(i_min, first(flat == flat.amin(-1, keepdim=True)), rtol=0, atol=0)
    assert i_max.dtype == i_min.dtype == torch.int64


def test_scale_add_relu_matches_autograd():
    torch.manual_seed(0)
    x, s = torch.randn(3, 4, 5, 6, requires_grad=True), torch.randn(3, 4, 5, 6, requires_grad=True)
    g = torch.rand(3, 4, 1, 1, requires_grad=True)
    out = scale_add_relu(x, s, g)
    leaves = [t.detach().clone().requires_grad_() for t in (x, s, g)]
    ref = torch.relu(leaves[0] * leaves[2] + leaves[1])
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip((x, s, g), leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


class _SubclassedBN(torch.nn.BatchNorm2d):
    """Not exactly nn.BatchNorm2d: must take the unfused path."""


@pytest.mark.parametrize('formulation', ['official', 'paper'])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('bn_cls', [torch.nn.BatchNorm2d, _SubclassedBN])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_batch_norm_spe_add_relu_matches_reference(random_spe, formulation, momentum, bn_cls, memory_format):
    spe = random_spe(5, formulation=formulation).double()
    bn = bn_cls(5, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    spe_ref, bn_ref = copy.deepcopy(spe), copy.deepcopy(bn)
    c = (torch.randn(3, 5, 6, 7, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=memory_format)
    s = torch.randn_like(c)
    assert _block_tail_fusable(c, s, bn, spe) == (bn_cls is torch.nn.BatchNorm2d)
    leaves = [t.clone().requires_grad_() for t in (c, s, c, s)]
    for _ in range(2):  # twice: running statistics and num_batches_tracked as BatchNorm2d keeps them
        out = batch_norm_spe_add_relu(leaves[0], leaves[1], bn, spe)
        ref = torch.relu(reference_spe(bn_ref(leaves[2]), *spe_params(spe_ref), formulation) + leaves[3])
        torch.testing.assert_close(out, ref)
        w = torch.randn_like(out)
        (out * w).sum().backward()
        ((ref * w).sum() + spe_ref.penalty()).backward()  # the fused path adds the penalty automatically
    for a, b in zip(leaves[:2], leaves[2:]):
        torch.testing.assert_close(a.grad, b.grad)
    for (name, a), b in zip([*bn.named_parameters(), *spe.named_parameters()], [*bn_ref.parameters(), *spe_ref.parameters()]):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(bn.named_buffers(), bn_ref.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_batch_norm_spe_add_relu_falls_back_for_other_layouts_and_an_eval_mode_bn(random_spe):
    """(Under autocast it fuses: tests/unit/test_mixed_precision.py.)"""
    spe, bn = random_spe(4), torch.nn.BatchNorm2d(4)
    c = torch.randn(2, 4, 5, 5)
    assert _block_tail_fusable(c, c, bn, spe)
    assert _block_tail_fusable(c.contiguous(memory_format=torch.channels_last), c, bn, spe)
    assert not _block_tail_fusable(c.transpose(2, 3), c, bn, spe)
    assert not _block_tail_fusable(c, c, bn.eval(), spe)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_per_map_sums_are_the_sums_bn_backward_needs(memory_format, dtype):
    """Per-(n, c) sum_hw(grad) and sum_hw(grad * xhat): BN's backward kernel (NCHW) or multiply + sum (channels_last);
    and x at the given H x W positions."""
    torch.manual_seed(0)
    c = (torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 3)
    g = torch.randn_like(c)
    xc, xg = (t.to(dtype).contiguous(memory_format=memory_format) for t in (c, g))
    x, mean, invstd = torch.native_batch_norm(xc, None, None, None, None, True, 0.1, 1e-5)
    i_max, i_min = torch.randint(0, 30, (4, 3)), torch.randint(0, 30, (4, 3))
    sum_grad, sum_grad_xhat, x_max, x_min = per_map_sums(xg, xc, mean, invstd, torch.empty_like(xg), i_max, i_min)
    assert sum_grad.shape == sum_grad_xhat.shape == (4, 3)
    cd, gd = xc.double(), xg.double()
    tol = {torch.bfloat16: {'rtol': 0, 'atol': 0.1}, torch.float16: {'rtol': 0, 'atol': 0.02}}.get(
        dtype, {'rtol': 1e-5, 'atol': 1e-5})
    torch.testing.assert_close(sum_grad.double(), gd.sum((2, 3)), **tol)
    ref = (gd * (cd - mean.double().view(1, -1, 1, 1))).sum((2, 3)) * invstd.double()
    torch.testing.assert_close(sum_grad_xhat.double(), ref, **tol)
    for got, index in ((x_max, i_max), (x_min, i_min)):
        torch.testing.assert_close(got, xc.flatten(2).gather(2, index.unsqueeze(2)).squeeze(2), rtol=0, atol=0)


def test_batch_norm_spe_add_relu_float32_precision_with_large_channel_means(random_spe):
    """The fused backward works from per-map sums of grad * (c - mean) (NCHW): check float32 against float64
    when mean(c) = 20 std(c)."""
    torch.manual_seed(0)
    spe, bn = random_spe(6), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    c, s = torch.randn(8, 6, 10, 10) * 0.5 + 10, torch.randn(8, 6, 10, 10)
    w = torch.randn_like(c)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        spe_d, bn_d = copy.deepcopy(spe).to(dtype), copy.deepcopy(bn).to(dtype)
        leaves = [t.to(dtype).clone().requires_grad_() for t in (c, s)]
        assert _block_tail_fusable(*leaves, bn_d, spe_d)
        (batch_norm_spe_add_relu(*leaves, bn_d, spe_d) * w.to(dtype)).sum().backward()
        grads[dtype] = [t.grad for t in leaves] + [p.grad for p in (*bn_d.parameters(), *spe_d.parameters())]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert (g32.double() - g64).abs().max() <= 1e-5 * g64.abs().max()


def test_double_backward_through_fused_paths_raises(random_spe):
    """The custom backward passes are first-order only: asking for a gradient of a gradient must fail loudly."""
    spe, bn = random_spe(4), torch.nn.BatchNorm2d(4)
    for fn in (lambda t: spe(t), lambda t: batch_norm_spe_add_relu(t, t.detach(), bn, spe)):
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        g, = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match='once_differentiable|does not require grad|not differentiable'):
            g.sum().backward()
