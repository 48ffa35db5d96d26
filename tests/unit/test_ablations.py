"""The paper's ablations (Table 3: constant lambda; Table 4 / Fig. 4: reweight-module variants) as SpeModule options.

Each variant is checked against the formulas written out plainly, its parameter count against the paper's table
row, and that it never takes a fused training path or a CPU kernel (which serve the default variant only).
"""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import random_spe_module
from timm.models.resnet import Bottleneck

import timm_spe  # noqa: F401  (registers the models)
from benchmarks.spe_reference import reference_gate
from timm_spe import SpeModule, set_auto_penalty, spe_me, spe_penalty
from timm_spe import spe as spe_mod
from timm_spe.spe import REWEIGHTS

ABLATIONS = [dict(lam=lam) for lam in (0.1, 0.3, 0.5, 0.7, 0.9)] + [
    dict(reweight=r) for r in REWEIGHTS if r != 'sum'] + [dict(lam=0.3, reweight='product')]


def _randomized(channels=3, formulation='official', seed=0, dtype=torch.float64, **kwargs):
    return random_spe_module(channels, formulation, seed, dtype=dtype, **kwargs)


def _lam(m):
    if m.lam is not None:
        return m.lam
    p = m.p
    return p[0] ** 2 / (p[0] ** 2 + p[1] ** 2)


def _ref(m, x):
    return x * reference_gate(x, _lam(m), m.w_exc, m.b_exc, m.w_rew, m.b_rew, m.w_rew_min, m.b_rew_min,
                              m.formulation, m.reweight)


def _kwargs_id(kw):
    return '-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'


@pytest.mark.parametrize('kwargs', ABLATIONS + [dict()], ids=_kwargs_id)
@pytest.mark.parametrize('formulation', ['official', 'paper'])
@pytest.mark.parametrize('train', [False, True])
def test_each_variant_equals_its_formula_in_output_and_gradients(kwargs, formulation, train):
    m = _randomized(formulation=formulation, **kwargs)
    m.train(train)
    set_auto_penalty(m, False)  # the reference has no Eq. 8 term
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = m(x)
    ref = _ref(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [t for t in m.parameters()]
    got = torch.autograd.grad(out, [x] + params, g)
    want = torch.autograd.grad(ref, [x] + params, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the inference path too
        torch.testing.assert_close(m(x), ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('formulation', ['official', 'paper'])
def test_constant_lambda_with_sum_is_spe_with_lambda_frozen(formulation):
    """Table 3's row lambda = c is SPE with p fixed so that lambda = c (here: p = (sqrt(c), sqrt(1 - c)))."""
    c = 0.7
    ablation = _randomized(formulation=formulation, lam=c)
    full = SpeModule(3, formulation=formulation, dtype=torch.float64).eval()
    with torch.no_grad():
        for name in ('w_exc', 'b_exc', 'w_rew', 'b_rew'):
            getattr(full, name).copy_(getattr(ablation, name))
        full.p.copy_(torch.tensor([c, 1 - c], dtype=torch.float64).sqrt())
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(ablation.eval()(x), full(x), rtol=1e-12, atol=1e-12)


def test_constant_lambda_has_no_p_and_no_penalty():
    m = SpeModule(4, lam=0.3)
    assert m.p is None and 'p' not in m.state_dict()
    assert sum(t.numel() for t in m.parameters()) == 4 * 4  # w_exc, b_exc, w_rew, b_rew
    assert m.penalty().item() == 0.
    model = torch.nn.Sequential(SpeModule(4, lam=0.3), SpeModule(4))
    assert set_auto_penalty(model, False) == 1  # only the learned-lambda layer has a penalty
    assert set_auto_penalty(torch.nn.Sequential(SpeModule(4, lam=0.5)), True) == 0
    only_const = torch.nn.Sequential(SpeModule(4, lam=0.5), SpeModule(4, lam=0.9))
    assert spe_penalty(only_const).item() == 0.
    torch.testing.assert_close(spe_penalty(model), model[1].penalty())
    # the constant follows the module's dtype and is not learned
    assert SpeModule(4, lam=0.25).double().mix_weights().tolist() == [0.25, 0.75]


def test_parameters_of_each_reweight_variant():
    c = 5
    names = lambda **kw: sorted(n for n, _ in SpeModule(c, **kw).named_parameters())
    assert names() == ['b_exc', 'b_rew', 'p', 'w_exc', 'w_rew']
    assert names(reweight='unshared') == ['b_exc', 'b_rew', 'b_rew_min', 'p', 'w_exc', 'w_rew', 'w_rew_min']
    assert names(reweight='none') == ['b_exc', 'p', 'w_exc']
    for r in ('no_sigmoid', 'product', 'sigmoid_sum', 'sigmoid_product', 'max', 'min'):
        assert names(reweight=r) == names()


def test_init_follows_paper_in_every_variant():
    m = SpeModule(3, reweight='unshared', lam=0.5)
    for w in (m.w_exc, m.w_rew, m.w_rew_min):
        assert torch.equal(w, torch.zeros(3))
    for b in (m.b_exc, m.b_rew, m.b_rew_min):
        assert torch.equal(b, torch.full((3,), -1.))


def test_extra_repr_shows_non_default_options_only():
    assert repr(SpeModule(4)) == "SpeModule(4, formulation='official', eta=0.1, auto_penalty=True)"
    assert repr(SpeModule(4, lam=0.3)) == "SpeModule(4, formulation='official', lam=0.3)"
    assert repr(SpeModule(4, reweight='max')) == (
        "SpeModule(4, formulation='official', eta=0.1, auto_penalty=True, reweight='max')")


@pytest.mark.parametrize('bad', [dict(lam=1.5), dict(lam=-0.1), dict(lam=True), dict(lam='0.5'),
                                 dict(reweight='mean'), dict(reweight=None)])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        SpeModule(4, **bad)


def test_default_variant_flag():
    assert SpeModule(4).default_variant and SpeModule(4, formulation='paper').default_variant
    assert not any(SpeModule(4, **kw).default_variant for kw in ABLATIONS)


# ---- parameter counts: ResNet164 on CIFAR-10 / CIFAR-100, rounded to 0.01M as the paper does

# Table 3 has no parameter column: a constant lambda drops the 2 p's of each of the 54 layers (108 parameters),
# which rounds to the full model's 1.74M / 1.76M (Table 1, Table 4 "Ours").
TABLE3 = {f'lambda={lam}': (dict(lam=lam), '1.74M', '1.76M') for lam in (0.1, 0.3, 0.5, 0.7, 0.9)}
TABLE3['learned lambda (ours)'] = (dict(), '1.74M', '1.76M')
TABLE4 = {
    '(a)': (dict(reweight='unshared'), '1.75M', '1.78M'),
    '(b)': (dict(reweight='no_sigmoid'), '1.74M', '1.76M'),
    '(c)': (dict(reweight='product'), '1.74M', '1.76M'),
    '(d)': (dict(reweight='sigmoid_sum'), '1.74M', '1.76M'),
    '(e)': (dict(reweight='sigmoid_product'), '1.74M', '1.76M'),
    '(f)': (dict(reweight='max'), '1.74M', '1.76M'),
    '(g)': (dict(reweight='min'), '1.74M', '1.76M'),
    'without RM': (dict(reweight='none'), '1.72M', '1.74M'),
    'ours': (dict(), '1.74M', '1.76M'),
}
# exact counts (docs/design_space.md); full SPE = 1,736,518 / 1,759,648
EXACT = {
    (): (1736518, 1759648), ('lam',): (1736410, 1759540), ('unshared',): (1752646, 1775776),
    ('none',): (1720390, 1743520),
}


def _count(attn_kwargs, num_classes):
    model = timm.create_model('resnet164_spe', num_classes=num_classes, attn_kwargs=attn_kwargs)
    return sum(p.numel() for p in model.parameters())


def _check_row(attn_kwargs, paper10, paper100):
    key = ('lam',) if 'lam' in attn_kwargs else (
        (attn_kwargs['reweight'],) if attn_kwargs.get('reweight') in ('unshared', 'none') else ())
    for num_classes, paper in ((10, paper10), (100, paper100)):
        n = _count(attn_kwargs, num_classes)
        assert f'{n / 1e6:.2f}M' == paper, (attn_kwargs, num_classes, n)
        assert n == EXACT[key][num_classes == 100]


@pytest.mark.parametrize('row', list(TABLE3))
def test_table3_row_parameter_count_matches_paper(row):
    _check_row(*TABLE3[row])


@pytest.mark.parametrize('row', list(TABLE4))
def test_table4_row_parameter_count_matches_paper(row):
    _check_row(*TABLE4[row])


# ---- no fused path and no CPU kernel for the ablations

@pytest.fixture()
def fused_paths_forbidden(monkeypatch):
    """Every fused training function and CPU-kernel entry for the SPE gate raises if called."""
    calls = []

    def forbid(owner, name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f'{name} used by an ablation variant')
        monkeypatch.setattr(owner, name, fail)

    for cls in ('_SpeScale', '_BatchNormSpeAddReLU', '_GlobalMaxMin', '_ScaleAddReLU'):
        forbid(getattr(spe_me, cls), 'apply')
    # the gate's pooling: its only ways into the CPU kernels (the block's no-grad inference tail, scale_add_relu_,
    # does not depend on the variant and may use its kernel)
    forbid(spe_me, 'max_min_with_indices')
    forbid(spe_mod, 'max_min')
    return calls


@pytest.mark.parametrize('kwargs', ABLATIONS, ids=_kwargs_id)
def test_ablation_layer_takes_plain_autograd_ops_only(kwargs, fused_paths_forbidden):
    m = _randomized(dtype=torch.float32, **kwargs)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    for train in (True, False):
        m.train(train)
        m(x).sum().backward()
        with torch.no_grad():
            m(x)
        m.attn_map(x.detach())
    assert fused_paths_forbidden == []


def test_default_variant_still_takes_the_fused_paths(monkeypatch):
    """Positive control for the test above: the default SPE layer and block still use the fused functions."""
    used = []
    for cls in ('_SpeScale', '_BatchNormSpeAddReLU'):
        klass = getattr(spe_me, cls)
        original = klass.apply
        monkeypatch.setattr(klass, 'apply', lambda *a, _o=original, _n=cls: used.append(_n) or _o(*a))
    m = SpeModule(3).train()
    m(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    model = timm.create_model('resnet83_spe', num_classes=10).train()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    assert '_SpeScale' in used and '_BatchNormSpeAddReLU' in used


class _ReferenceSpe(torch.nn.Module):
    """The plain formulas with the parameters of an SpeModule (shared, so gradients land on them)."""

    def __init__(self, spe):
        super().__init__()
        self.spe = spe

    def forward(self, x):
        m = self.spe
        return x * reference_gate(x, _lam(m), m.w_exc, m.b_exc, m.w_rew, m.b_rew, m.w_rew_min, m.b_rew_min,
                                  m.formulation, m.reweight)


def _plain_reference_model(model):
    """A copy whose SPE blocks are timm's own Bottleneck (bn3 -> se -> add -> act3) with the formula above as se."""
    ref = copy.deepcopy(model)
    for blk in ref.modules():
        if isinstance(getattr(blk, 'se', None), SpeModule):
            blk.__class__ = Bottleneck
            blk.se = _ReferenceSpe(blk.se)
    return ref


def _train_step_matches_plain_reference(kwargs):
    """timm.create_model('resnet83_spe', attn_kwargs=...): loss, every gradient, the SGD step, BN statistics and
    eval logits equal those of the same network built from timm's Bottleneck and the plain formulas (float64)."""
    torch.manual_seed(0)
    model = timm.create_model('resnet83_spe', num_classes=10, attn_kwargs=kwargs).double()
    assert all(m.lam == kwargs.get('lam') and m.reweight == kwargs.get('reweight', 'sum')
               and m.formulation == kwargs.get('formulation', 'official')
               for m in model.modules() if isinstance(m, SpeModule))
    with torch.no_grad():  # away from the init, where every gate is equal
        for m in model.modules():
            if isinstance(m, SpeModule):
                for t in m.parameters():
                    t.normal_(0, 0.5)
    set_auto_penalty(model, False)
    ref = _plain_reference_model(model)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 7])
    for net in (model, ref):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        net.loss = loss.detach()
    # float64; not bit-equal (the block's addcmul vs timm's multiply and add; BN over 2 x 2 x 2 values in the last
    # stage amplifies rounding differences)
    torch.testing.assert_close(model.loss, ref.loss, rtol=1e-12, atol=0)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        q = ref_params[name.replace('.se.', '.se.spe.')]
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-11)
    for name, b in model.named_buffers():  # BN running statistics
        torch.testing.assert_close(b, dict(ref.named_buffers())[name.replace('.se.', '.se.spe.')])
    model.eval(), ref.eval()
    with torch.no_grad():  # inference: the block's in-place tail on the variant's gate
        torch.testing.assert_close(model(x), ref(x), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize('kwargs', [dict(reweight='unshared'), dict(reweight='none'), dict(lam=0.3),
                                    dict(reweight='sigmoid_product', lam=0.7)], ids=_kwargs_id)
def test_resnet83_with_ablation_trains_a_step_like_plain_reference(kwargs, fused_paths_forbidden):
    """... and no fused function or CPU kernel of the gate is used."""
    _train_step_matches_plain_reference(kwargs)
    assert fused_paths_forbidden == []


@pytest.mark.parametrize('formulation', ['official', 'paper'])
def test_resnet83_default_spe_still_matches_plain_reference(formulation):
    """The default variant (fused paths) against the same reference: 'sum' with a learned lambda is SPE."""
    _train_step_matches_plain_reference(dict(formulation=formulation))


@pytest.mark.parametrize('kwargs', ABLATIONS, ids=_kwargs_id)
def test_each_variant_scripts_with_torchscript(kwargs):
    m = _randomized(dtype=torch.float32, **kwargs).eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(torch.jit.script(m)(x), m(x))
