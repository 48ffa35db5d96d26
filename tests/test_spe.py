"""SpeModule: both formulations against a straightforward reference, the Eq. 8 penalty, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F

from timm_spe import SpeModule, set_auto_penalty, spe_penalty
from timm_spe.spe import mix_weights


def reference_spe(x, p, w_exc, b_exc, w_rew, b_rew, formulation):
    """The formulas written out plainly, on N x C x H x W tensors (authors' code style for 'official')."""
    view = lambda t: t.view(1, -1, 1, 1)
    f_max = F.adaptive_max_pool2d(x, 1)
    f_min = x.min(dim=-1, keepdim=True).values.min(dim=-2, keepdim=True).values
    lam = p[0] ** 2 / (p[0] ** 2 + p[1] ** 2)
    if formulation == 'official':
        r_max = f_max * view(w_rew) + view(b_rew)
        r_min = f_min * view(w_rew) + view(b_rew)
        u = lam * r_max + (1 - lam) * r_min
        v_rew = torch.sigmoid(r_max + r_min)
    else:
        u = lam * f_max + (1 - lam) * f_min
        v_rew = torch.sigmoid(f_min * view(w_rew) + f_max * view(w_rew) + view(b_rew))
    v_exc = torch.sigmoid(view(w_exc) * u + view(b_exc))
    return x * v_exc * v_rew


def _randomized(channels=6, formulation='official', seed=0, **kwargs):
    torch.manual_seed(seed)
    m = SpeModule(channels, formulation=formulation, **kwargs)
    with torch.no_grad():
        for t in (m.w_exc, m.b_exc, m.w_rew, m.b_rew):
            t.normal_()
        m.p.uniform_(0.2, 1.5)
    return m


def _params(m):
    return m.p, m.w_exc, m.b_exc, m.w_rew, m.b_rew


def test_init_matches_paper():
    m = SpeModule(5)
    assert torch.equal(m.p, torch.full((2,), 0.5))
    for w in (m.w_exc, m.w_rew):
        assert torch.equal(w, torch.zeros(5))
    for b in (m.b_exc, m.b_rew):
        assert torch.equal(b, torch.full((5,), -1.))
    assert sum(t.numel() for t in m.parameters()) == 4 * 5 + 2


@pytest.mark.parametrize('formulation', ['official', 'paper'])
@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_forward_and_grads_match_reference(formulation, train, memory_format):
    m = _randomized(formulation=formulation)
    m.train(train)
    set_auto_penalty(m, False)
    x = torch.randn(4, 6, 5, 7).contiguous(memory_format=memory_format).requires_grad_()
    out = m(x)
    x_ref = x.detach().clone().requires_grad_()
    params_ref = [t.detach().clone().requires_grad_() for t in _params(m)]
    ref = reference_spe(x_ref, *params_ref, formulation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for t, t_ref in zip(_params(m), params_ref):
        torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-5, atol=1e-6)


def test_formulations_differ():
    x = torch.randn(2, 6, 4, 4)
    a, b = _randomized(formulation='official'), _randomized(formulation='paper')
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(x), b(x))


def test_official_matches_authors_expression_order():
    """The authors mix with p^2 / sum(p^2) for both weights; ours is bit-identical for normal p."""
    p = torch.tensor([0.3, 1.7])
    w = mix_weights(p)
    assert torch.equal(w, p ** 2 / (p ** 2).sum())


@pytest.mark.parametrize('p', [(0., 0.), (0., 1.), (1e-30, 0.), (3., 0.)])
def test_lambda_finite_at_zero(p):
    m = _randomized()
    m.train()
    with torch.no_grad():
        m.p.copy_(torch.tensor(p))
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    out = m(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(m.p.grad).all() and torch.isfinite(x.grad).all()
    lam = m.mix_weights()
    assert torch.isfinite(lam).all() and abs(float(lam.detach().sum()) - 1) < 1e-6
    if p == (0., 0.):
        assert torch.equal(lam, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize('formulation', ['official', 'paper'])
def test_auto_penalty_gradient_equals_explicit_term(formulation):
    x = torch.randn(3, 6, 4, 4)
    auto = _randomized(formulation=formulation, eta=0.1).train()
    explicit = _randomized(formulation=formulation, eta=0.1).train()

    auto(x).square().mean().backward()
    loss = explicit(x).square().mean() + spe_penalty(explicit)  # spe_penalty switches the hook off
    assert explicit.auto_penalty is False
    loss.backward()
    for a, e in zip(_params(auto), _params(explicit)):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-6, atol=1e-7)
    # and the penalty's share is exactly 2 * eta * p
    plain = _randomized(formulation=formulation, eta=0.1).train()
    set_auto_penalty(plain, False)
    plain(x).square().mean().backward()
    torch.testing.assert_close(auto.p.grad - plain.p.grad, 2 * 0.1 * auto.p.detach(), rtol=1e-5, atol=1e-7)


def test_auto_penalty_only_in_training_and_switchable():
    x = torch.randn(2, 6, 4, 4)
    m = _randomized(eta=0.5).eval()
    m(x).sum().backward()
    g_eval = m.p.grad.clone()
    m.p.grad = None
    set_auto_penalty(m, False)
    m.train()
    m(x).sum().backward()
    torch.testing.assert_close(m.p.grad, g_eval)  # no penalty either way
    m.p.grad = None
    assert set_auto_penalty(m, True, eta=0.25) == 1
    m(x).sum().backward()
    torch.testing.assert_close(m.p.grad - g_eval, 0.5 * m.p.detach())


def test_spe_penalty_sums_layers():
    model = torch.nn.Sequential(SpeModule(4, eta=0.1), torch.nn.ReLU(), SpeModule(8, eta=0.2))
    with torch.no_grad():
        model[0].p.copy_(torch.tensor([1., 2.]))
        model[2].p.copy_(torch.tensor([3., 0.]))
    torch.testing.assert_close(spe_penalty(model), torch.tensor(0.1 * 5 + 0.2 * 9))
    assert not any(m.auto_penalty for m in model if isinstance(m, SpeModule))
    assert float(spe_penalty(torch.nn.Linear(2, 2))) == 0.


def test_timm_factory_kwargs():
    m = SpeModule(3, device='cpu', dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in m.parameters())
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    assert m(x).dtype == torch.float64


def test_output_shape_and_channels_last():
    m = _randomized()
    x = torch.randn(2, 6, 5, 5)
    out = m(x)
    assert out.shape == x.shape
    out_cl = m(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out)


@pytest.mark.parametrize('shape', [(6, 4, 4), (2, 6, 4), (2, 6, 4, 4, 1)])
def test_non_4d_input_is_rejected(shape):
    with pytest.raises(Exception, match='N x C x H x W'):
        SpeModule(6)(torch.randn(*shape))


def test_bad_arguments():
    with pytest.raises(ValueError, match="formulation must be one of"):
        SpeModule(4, formulation='eq7')
    with pytest.raises(ValueError, match='positive'):
        SpeModule(0)
    with pytest.raises(ValueError, match='eta'):
        SpeModule(4, eta=-1)


def test_timm_attention_kwargs_are_accepted_others_rejected():
    m = SpeModule(8, act_layer=torch.nn.ReLU, rd_ratio=0.25)
    assert m(torch.randn(1, 8, 2, 2)).shape == (1, 8, 2, 2)
    with pytest.raises(TypeError, match="formulaton"):
        SpeModule(8, formulaton='paper')


def test_global_max_min_gradient_and_ties():
    from timm_spe.spe import global_max_min
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


@pytest.mark.parametrize('hw', [(1, 1), (1, 7), (4, 5), (8, 8), (16, 16), (32, 32), (32, 64)])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('values', ['ties', 'distinct'])
def test_max_min_with_indices_is_first_extremum(hw, memory_format, dtype, values):
    from timm_spe.spe import max_min_with_indices
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
    from timm_spe.spe import scale_add_relu
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
def test_batch_norm_spe_add_relu_matches_reference(formulation, momentum, bn_cls, memory_format):
    from timm_spe.spe import _fusable, batch_norm_spe_add_relu
    spe = _randomized(5, formulation=formulation).double()
    bn = bn_cls(5, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    spe_ref, bn_ref = copy.deepcopy(spe), copy.deepcopy(bn)
    c = (torch.randn(3, 5, 6, 7, dtype=torch.float64) * 2 + 0.5).contiguous(memory_format=memory_format)
    s = torch.randn_like(c)
    assert _fusable(c, s, bn, spe) == (bn_cls is torch.nn.BatchNorm2d)
    leaves = [t.clone().requires_grad_() for t in (c, s, c, s)]
    for _ in range(2):  # twice: running statistics and num_batches_tracked as BatchNorm2d keeps them
        out = batch_norm_spe_add_relu(leaves[0], leaves[1], bn, spe)
        ref = torch.relu(reference_spe(bn_ref(leaves[2]), *_params(spe_ref), formulation) + leaves[3])
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


def test_batch_norm_spe_add_relu_falls_back_under_autocast():
    from timm_spe.spe import _fusable
    spe, bn = _randomized(4), torch.nn.BatchNorm2d(4)
    c = torch.randn(2, 4, 5, 5)
    assert _fusable(c, c, bn, spe)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not _fusable(c, c, bn, spe)
    assert _fusable(c.contiguous(memory_format=torch.channels_last), c, bn, spe)
    assert not _fusable(c.transpose(2, 3), c, bn, spe)
    assert not _fusable(c, c, bn.eval(), spe)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_per_map_sums(memory_format, dtype):
    """Per-(n, c) sum_hw(grad) and sum_hw(grad * xhat): BN's backward kernel (NCHW) or multiply + sum (channels_last)."""
    from timm_spe.spe import _per_map_sums
    torch.manual_seed(0)
    c = (torch.randn(4, 3, 5, 6, dtype=torch.float64) * 2 + 3)
    g = torch.randn_like(c)
    xc, xg = (t.to(dtype).contiguous(memory_format=memory_format) for t in (c, g))
    x, mean, invstd = torch.native_batch_norm(xc, None, None, None, None, True, 0.1, 1e-5)
    sum_grad, sum_grad_xhat = _per_map_sums(xg, xc, mean, invstd, torch.empty_like(xg))
    assert sum_grad.shape == sum_grad_xhat.shape == (4, 3)
    cd, gd = xc.double(), xg.double()
    tol = {'rtol': 0, 'atol': 0.1} if dtype == torch.bfloat16 else {'rtol': 1e-5, 'atol': 1e-5}
    torch.testing.assert_close(sum_grad.double(), gd.sum((2, 3)), **tol)
    ref = (gd * (cd - mean.double().view(1, -1, 1, 1))).sum((2, 3)) * invstd.double()
    torch.testing.assert_close(sum_grad_xhat.double(), ref, **tol)


def test_batch_norm_spe_add_relu_float32_precision_with_large_channel_means():
    """The fused backward works from per-map sums of grad * (c - mean) (NCHW): check float32 against float64
    when mean(c) = 20 std(c)."""
    from timm_spe.spe import _fusable, batch_norm_spe_add_relu
    torch.manual_seed(0)
    spe, bn = _randomized(6), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    c, s = torch.randn(8, 6, 10, 10) * 0.5 + 10, torch.randn(8, 6, 10, 10)
    w = torch.randn_like(c)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        spe_d, bn_d = copy.deepcopy(spe).to(dtype), copy.deepcopy(bn).to(dtype)
        leaves = [t.to(dtype).clone().requires_grad_() for t in (c, s)]
        assert _fusable(*leaves, bn_d, spe_d)
        (batch_norm_spe_add_relu(*leaves, bn_d, spe_d) * w.to(dtype)).sum().backward()
        grads[dtype] = [t.grad for t in leaves] + [p.grad for p in (*bn_d.parameters(), *spe_d.parameters())]
    for g32, g64 in zip(grads[torch.float32], grads[torch.float64]):
        assert (g32.double() - g64).abs().max() <= 1e-5 * g64.abs().max()


def test_double_backward_through_fused_paths_raises():
    """The custom backward passes are first-order only: asking for a gradient of a gradient must fail loudly."""
    from timm_spe.spe import batch_norm_spe_add_relu
    spe, bn = _randomized(4), torch.nn.BatchNorm2d(4)
    for fn in (lambda t: spe(t), lambda t: batch_norm_spe_add_relu(t, t.detach(), bn, spe)):
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        g, = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match='once_differentiable|does not require grad|not differentiable'):
            g.sum().backward()
