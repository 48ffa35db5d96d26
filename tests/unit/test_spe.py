"""SpeModule: both formulations against a straightforward reference, the Eq. 8 penalty, bad input."""

import pytest
import torch

from benchmarks.spe_reference import reference_spe, spe_params
from timm_spe import SpeModule, set_auto_penalty, spe_penalty
from timm_spe.spe_math import mix_weights


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
def test_forward_and_grads_match_reference(random_spe, formulation, train, memory_format):
    m = random_spe(formulation=formulation)
    m.train(train)
    set_auto_penalty(m, False)
    x = torch.randn(4, 6, 5, 7).contiguous(memory_format=memory_format).requires_grad_()
    out = m(x)
    x_ref = x.detach().clone().requires_grad_()
    params_ref = [t.detach().clone().requires_grad_() for t in spe_params(m)]
    ref = reference_spe(x_ref, *params_ref, formulation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for t, t_ref in zip(spe_params(m), params_ref):
        torch.testing.assert_close(t.grad, t_ref.grad, rtol=1e-5, atol=1e-6)


def test_formulations_differ(random_spe):
    x = torch.randn(2, 6, 4, 4)
    a, b = random_spe(formulation='official'), random_spe(formulation='paper')
    b.load_state_dict(a.state_dict())
    assert not torch.allclose(a(x), b(x))


def test_official_matches_authors_expression_order():
    """The authors mix with p^2 / sum(p^2) for both weights; ours is bit-identical for normal p."""
    p = torch.tensor([0.3, 1.7])
    w = mix_weights(p)
    assert torch.equal(w, p ** 2 / (p ** 2).sum())


@pytest.mark.parametrize('p', [(0., 0.), (0., 1.), (1e-30, 0.), (3., 0.)])
def test_lambda_finite_at_zero(random_spe, p):
    m = random_spe()
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
def test_auto_penalty_gradient_equals_explicit_term(random_spe, formulation):
    x = torch.randn(3, 6, 4, 4)
    auto = random_spe(formulation=formulation, eta=0.1).train()
    explicit = random_spe(formulation=formulation, eta=0.1).train()

    auto(x).square().mean().backward()
    loss = explicit(x).square().mean() + spe_penalty(explicit)  # spe_penalty switches the hook off
    assert explicit.auto_penalty is False
    loss.backward()
    for a, e in zip(spe_params(auto), spe_params(explicit)):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-6, atol=1e-7)
    # and the penalty's share is exactly 2 * eta * p
    plain = random_spe(formulation=formulation, eta=0.1).train()
    set_auto_penalty(plain, False)
    plain(x).square().mean().backward()
    torch.testing.assert_close(auto.p.grad - plain.p.grad, 2 * 0.1 * auto.p.detach(), rtol=1e-5, atol=1e-7)


def test_auto_penalty_only_in_training_and_switchable(random_spe):
    x = torch.randn(2, 6, 4, 4)
    m = random_spe(eta=0.5).eval()
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


def test_output_shape_and_channels_last(random_spe):
    m = random_spe()
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


@pytest.mark.parametrize('shape, says', [
    ((2, 5, 4, 4), r'SpeModule\(6\) got an input with 5 channels'),
    ((2, 6, 0, 0), 'empty 0 x 0 feature map'),
    ((2, 6, 3, 0), 'empty 3 x 0 feature map'),
])
@pytest.mark.parametrize('train', [True, False])
def test_a_wrong_channel_count_or_an_empty_map_gets_a_readable_error_not_a_broadcast_or_index_error(shape, says, train):
    m = SpeModule(6).train(train)
    with pytest.raises(ValueError, match=says) as err:
        m(torch.randn(*shape, requires_grad=train))
    assert len(str(err.value).splitlines()) == 1


def _scripted(model):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated
        return torch.jit.script(model)


def test_a_scripted_model_refuses_to_train_without_the_penalty_and_says_how_in_one_line():
    """TorchScript cannot run the penalty's autograd.Function: a scripted training forward with the automatic
    penalty on raises (timm's train.py --torchscript would otherwise train without Eq. 8, silently)."""
    import timm
    model = timm.create_model('resnet83_spe').train()
    scripted = _scripted(model)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(Exception, match='cannot add the Eq. 8 penalty') as err:
        scripted(x)
    message = str(err.value).splitlines()[-1]
    assert 'set_auto_penalty(model, False)' in message and 'spe_penalty(model)' in message
    assert 'without --torchscript' in message
    with torch.no_grad():  # what needs no gradient runs: BN recalibration, inference
        scripted(x)
    scripted.eval()(x)


def test_a_scripted_model_trains_exactly_with_spe_penalty_in_its_loss(random_spe):
    """set_auto_penalty and spe_penalty find the layers of a scripted model (they share p and the switch with the
    eager model): the explicit term gives the eager model's automatic-penalty gradients."""
    x = torch.randn(3, 6, 4, 4)
    eager = random_spe(eta=0.1).train()
    eager(x).square().mean().backward()
    scripted = _scripted(random_spe(eta=0.1).train())
    assert set_auto_penalty(scripted, False) == 1
    (scripted(x).square().mean() + spe_penalty(scripted)).backward()
    for a, e in zip(spe_params(eager), (scripted.p, scripted.w_exc, scripted.b_exc, scripted.w_rew, scripted.b_rew)):
        torch.testing.assert_close(e.grad, a.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(spe_penalty(scripted), 0.1 * (scripted.p * scripted.p).sum())
